"""tritium on torch.distributed: context-parallel (ring) attention over tritium's flash attention ops.

``ring_attention`` splits one attention over the sequence across the ranks of a process group (gloo on CPUs,
NCCL on GPUs); ``zigzag_shard`` / ``zigzag_gather`` convert a full sequence to and from the load-balanced layout
causal ring attention takes. See docs/distributed.md.
"""
from .ring import (RingStats, collect_stats, ring_attention, zigzag_gather, zigzag_lengths,  # noqa: F401
                   zigzag_local_lengths, zigzag_shard, zigzag_unshard)

__all__ = ["ring_attention", "zigzag_lengths", "zigzag_local_lengths", "zigzag_shard", "zigzag_unshard",
           "zigzag_gather", "collect_stats", "RingStats"]
