"""Inference building blocks: the paged KV cache (block allocator, block tables), its kernels, and sampling.

    from tritium.inference import PagedKVCache, append_kv, paged_attention_decode, sample, SamplingParams
"""
from ..ops.paged import append_kv, paged_attention_decode  # noqa: F401
from ..ops.sampling import SamplingParams, sample, seeded_uniform  # noqa: F401
from .cache import BlockAllocator, CacheFullError, PagedKVCache  # noqa: F401
from .engine import Engine, GenerationResult  # noqa: F401,E402

__all__ = ["PagedKVCache", "BlockAllocator", "CacheFullError", "append_kv", "paged_attention_decode", "sample",
           "SamplingParams", "seeded_uniform", "Engine", "GenerationResult"]
