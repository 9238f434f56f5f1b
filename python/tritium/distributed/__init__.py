"""tritium on torch.distributed: context-parallel (ring) attention over tritium's flash attention ops, and
tensor-parallel Llama decoding.

``ring_attention`` splits one attention over the sequence across the ranks of a process group (gloo on CPUs,
NCCL on GPUs); ``zigzag_shard`` / ``zigzag_gather`` convert a full sequence to and from the load-balanced layout
causal ring attention takes. ``shard_llama`` gives each rank its Megatron-style shard of a Llama (``TPLlama``,
served by ``TPEngine``), with ``vocab_parallel_cross_entropy`` / ``vocab_parallel_sample`` on its slice of the
logits; ``count_comm`` counts the bytes its collectives move. ``finetune_ddp`` is the LoRA fine-tune on N
processes (DDP over the adapters; ``finetune_fsdp``: FSDP2, the frozen base sharded too). ``init_distributed``
starts a torchrun rank's process group with the backend of its device (NCCL on a GPU, gloo on the CPU). See
docs/distributed.md.
"""
from .comm import CommStats, count_comm  # noqa: F401
from .launch import init_distributed, pick_backend  # noqa: F401
from .lora import finetune_ddp, finetune_fsdp  # noqa: F401
from .ring import (RingStats, collect_stats, ring_attention, zigzag_gather, zigzag_lengths,  # noqa: F401
                   zigzag_local_lengths, zigzag_shard, zigzag_unshard)
from .tp import (TPEngine, TPLlama, gather_vocab, shard_from_state_dict, shard_llama, tp_shards,  # noqa: F401
                 vocab_parallel_beam_candidates, vocab_parallel_cross_entropy, vocab_parallel_sample,
                 vocab_parallel_top_logprobs)

__all__ = ["ring_attention", "zigzag_lengths", "zigzag_local_lengths", "zigzag_shard", "zigzag_unshard",
           "zigzag_gather", "collect_stats", "RingStats", "shard_llama", "shard_from_state_dict", "TPLlama",
           "TPEngine", "tp_shards", "gather_vocab", "vocab_parallel_cross_entropy", "vocab_parallel_sample",
           "vocab_parallel_top_logprobs", "vocab_parallel_beam_candidates", "count_comm", "CommStats", "finetune_ddp",
           "finetune_fsdp", "init_distributed", "pick_backend"]
