"""Small checkpoints for the loader's error tests (tests/models/test_load_fuzz.py, tests/test_cli_errors.py): a tiny
Llama written as a GGUF file (tests/models/test_llama.py's write_gguf: llama.cpp's layout and a byte-level BPE
tokenizer of 261 tokens) or as a Hugging Face directory, and ``rewrite_gguf``, which copies a GGUF file with
chosen metadata values and tensors changed or dropped (through gguf's own reader and writer)."""
from __future__ import annotations

import json
import os

import numpy as np
import torch

import gguf
from tritium.models import LlamaConfig, build

from .test_llama import byte_tokenizer_meta, write_gguf

TINY = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128, vocab_size=262,
                   max_seq_len=64, tie_embeddings=False)


def tiny_model():
    return build(TINY).init_random(generator=torch.Generator().manual_seed(0))


def write_tiny_gguf(path, quantized: bool = False) -> str:
    """The tiny model as a GGUF file: float32 tensors, or (quantized) Q8_0 projections with Q4_0 attention
    queries (llama.cpp's Q/K row permutation on quantized rows) and a float32 embedding."""
    def qtype_of(name):
        if not quantized or "embed" in name:
            return "F32"
        return "Q4_0" if "q_proj" in name else "Q8_0"

    write_gguf(path, tiny_model(), qtype_of)
    return str(path)


def write_tiny_hf_dir(path) -> str:
    """The tiny model as a Hugging Face directory: config.json, model.safetensors, tokenizer.json and
    tokenizer_config.json."""
    from safetensors.torch import save_file

    from tritium.models.tokenizer import Tokenizer

    os.makedirs(path, exist_ok=True)
    c = TINY
    save_file({k: v.contiguous() for k, v in tiny_model().hf_state_dict().items()},
              os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "llama", "hidden_size": c.dim, "num_hidden_layers": c.n_layers,
                   "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
                   "intermediate_size": c.ffn_dim, "vocab_size": c.vocab_size, "rms_norm_eps": c.norm_eps,
                   "rope_theta": c.rope_base, "max_position_embeddings": c.max_seq_len,
                   "tie_word_embeddings": False}, f)
    Tokenizer.from_gguf_metadata(byte_tokenizer_meta())._tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|im_end|>"}, f)
    return str(path)


def rewrite_gguf(src, dst, fields=None, tensors=None) -> str:
    """dst: a copy of the GGUF file src with metadata and tensors edited. fields: key -> None (dropped) or
    (value, gguf.GGUFValueType[, the element type of an array]); tensors: name -> None (dropped) or (numpy array,
    its gguf.GGMLQuantizationType or None to take the array's dtype)."""
    fields, tensors = fields or {}, tensors or {}
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), "llama")
    w.kv_data[0].clear()                     # the writer's own general.architecture: copied below like the rest
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name in fields:
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(f.name, f.contents(), f.types[0], sub)
    for key, value in fields.items():
        if value is not None:
            w.add_key_value(key, *value)
    for t in r.tensors:
        new = tensors.get(t.name, (np.array(t.data), t.tensor_type))
        if new is None:
            continue
        data, qtype = new if isinstance(new, tuple) else (new, None)
        w.add_tensor(t.name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(dst)
