"""Sampling for the engine: ``sample`` and ``SamplingParams`` (defined with their op in tritium.ops.sampling)."""
from ..ops.sampling import SamplingParams, sample, seeded_uniform  # noqa: F401

__all__ = ["SamplingParams", "sample", "seeded_uniform"]
