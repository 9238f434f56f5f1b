"""tritium.models.load on broken checkpoints: the tiny Llama of tests/models/checkpoints.py as GGUF files (float32,
and Q8_0/Q4_0 served natively) and as a Hugging Face directory, cut at every section boundary and at random
points, with random byte flips in the header, metadata and tensor table (GGUF) or the JSON header (safetensors),
and with absurd counts, wrong types, missing tensors and wrong shapes written on purpose.

Every case either loads a model whose forward pass gives finite logits of the right shape, or raises ValueError
or FileNotFoundError whose message names the file. None may crash the interpreter, hang (each case runs under an
alarm) or make the process's peak memory grow by more than a small bound (an allocation sized from a corrupt
count would)."""
import json
import os
import random
import resource
import shutil
import signal
import struct

import numpy as np
import pytest
import torch

import gguf
import tritium.models
from tritium.models import load

from .checkpoints import rewrite_gguf, write_tiny_gguf, write_tiny_hf_dir

V = gguf.GGUFValueType
Q = gguf.GGMLQuantizationType
CASE_SECONDS = 10            # a case taking longer is a hang
PEAK_GROWTH = 64 * 2**20     # the whole fuzz's files and models are ~1 MiB each; a corrupt count would ask for GiBs


@pytest.fixture(autouse=True)
def _fast_load(monkeypatch):
    # load() ends with a full gc.collect + malloc_trim to hand the load's garbage back to the OS: memory hygiene for
    # a serving process, and most of a tiny load's time
    monkeypatch.setattr(tritium.models, "_release_freed_memory", lambda: None)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    return {"f32": write_tiny_gguf(d / "f32.gguf"), "q8": write_tiny_gguf(d / "q8.gguf", quantized=True),
            "hf": write_tiny_hf_dir(d / "hf")}


def _alarm(signum, frame):
    raise TimeoutError(f"a case took more than {CASE_SECONDS} s")


def outcome(path, weights="float", names=None) -> str:
    """"ran" when path loads into a model whose forward pass gives finite logits of the right shape, else the
    error (a ValueError or FileNotFoundError naming the file: its base name, or one of names)."""
    names = names or [os.path.basename(os.path.normpath(path))]
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_SECONDS)
    try:
        try:
            model, tok = load(str(path), weights=weights)
        except (ValueError, FileNotFoundError) as e:
            assert any(n in str(e) for n in names), f"the error does not name {names}: {e}"
            return str(e)
        v = model.config.vocab_size
        tok.decode(tok.encode("hello <|im_end|>"))
        ids = torch.randint(0, v, (2, 5))
        with torch.no_grad():
            logits = model(ids)
        assert logits.shape == (2, 5, v) and torch.isfinite(logits).all()
        return "ran"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(autouse=True)
def _bounded_peak_memory():
    """The process's peak resident size grows by at most PEAK_GROWTH over a test (it only ever grows, so this
    bounds the largest allocation any case made)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    yield
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    assert grown <= PEAK_GROWTH, f"peak memory grew by {grown / 2**20:.0f} MiB"


# ---- GGUF ----------------------------------------------------------------------------------------------------
def _sections(path):
    """The offsets where each part of a GGUF file starts: the header's counts, every metadata entry, every
    tensor-table entry, every tensor's data, and where the last tensor's data ends."""
    r = gguf.GGUFReader(path)
    starts = [f.offset for f in r.fields.values()] + [t.field.offset for t in r.tensors]
    data = [t.data_offset for t in r.tensors] + [t.data_offset + t.n_bytes for t in r.tensors]
    return sorted(set(starts + data)), max(data)


@pytest.mark.parametrize("kind", ["f32", "q8"])
def test_gguf_cut_at_every_section_boundary_and_at_random(files, tmp_path, kind):
    src = files[kind]
    data = open(src, "rb").read()
    bounds, end = _sections(src)
    rng = random.Random(19)
    cuts = sorted({c for b in bounds for c in (b - 1, b, b + 1) if 0 <= c <= len(data)}
                  | {rng.randrange(len(data)) for _ in range(60)})
    cut = tmp_path / "cut.gguf"
    weights = "native" if kind == "q8" else "float"
    for n in cuts:
        cut.write_bytes(data[:n])
        got = outcome(cut, weights)
        # the file ends in the writer's padding after the last tensor's data: a cut there loses nothing
        assert (got == "ran") == (n >= end), (n, got)
    assert len(cuts) > 150


@pytest.mark.parametrize("kind", ["f32", "q8"])
def test_gguf_random_byte_flips_in_header_metadata_and_tensor_table(files, tmp_path, kind):
    src = files[kind]
    data = open(src, "rb").read()
    r = gguf.GGUFReader(src)
    table, start = min(t.field.offset for t in r.tensors), min(t.data_offset for t in r.tensors)
    # each flip lands in one of the three parts, chosen evenly (the metadata, mostly the tokenizer's strings,
    # would otherwise take nearly all of them)
    parts = [(0, 24), (24, table), (table, start)]
    rng = random.Random(1900 + len(kind))
    bad = tmp_path / "flip.gguf"
    results = []
    for _ in range(150):
        d = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            d[rng.randrange(*rng.choice(parts))] = rng.randrange(256)
        bad.write_bytes(bytes(d))
        results.append(outcome(bad, "native" if kind == "q8" else "float"))
    ran = results.count("ran")
    assert 0 < ran < len(results), ran    # some flips only change a value that may take any value; most do not


def _key(name: str) -> bytes:
    """How GGUF spells a string: its uint64 length, then its bytes."""
    return struct.pack("<Q", len(name.encode())) + name.encode()


# (id, where the uint64 to overwrite starts: (a string the file holds, bytes after it) or an absolute offset)
ABSURD = [
    ("tensor-count", 8, 10**12),
    ("metadata-count", 16, 2**60),
    ("first-key-length", 24, 2**62),
    ("tokens-count", (_key("tokenizer.ggml.tokens"), 8), 2**40),          # after the value type and element type
    ("merges-count", (_key("tokenizer.ggml.merges"), 8), 10**15),
    ("q-dim", (_key("blk.0.attn_q.weight"), 4), 10**12),                     # after the dims count
    ("embedding-rows", (_key("token_embd.weight"), 12), 2**50),
    ("norm-offset", (_key("blk.1.ffn_norm.weight"), 4 + 8 + 4), 2**60),    # dims count, one dim, type
]


@pytest.mark.parametrize("kind", ["f32", "q8"])
@pytest.mark.parametrize("case", ABSURD, ids=[a[0] for a in ABSURD])
def test_gguf_absurd_counts(files, tmp_path, kind, case):
    _, at, value = case
    data = open(files[kind], "rb").read()
    i = at if isinstance(at, int) else data.index(at[0]) + len(at[0]) + at[1]
    bad = tmp_path / "absurd.gguf"
    bad.write_bytes(data[:i] + struct.pack("<Q", value) + data[i + 8:])
    got = outcome(bad, "native" if kind == "q8" else "float")
    assert got.startswith("absurd.gguf: "), got


def _q8_with_scale(a: np.ndarray, scale: float) -> np.ndarray:
    raw = gguf.quants.quantize(a, Q.Q8_0)
    raw.reshape(-1, 34)[0, :2] = np.frombuffer(np.float16(scale).tobytes(), np.uint8)
    return raw


# (id, weights mode, source file, metadata edits, tensor edits, what the error must say; None: loads and runs)
EDITS = [
    ("no-architecture", "float", "f32", {"general.architecture": None}, {}, "general.architecture is missing"),
    ("architecture-gpt2", "float", "f32", {"general.architecture": ("gpt2", V.STRING)}, {},
     "architecture 'gpt2' is not supported"),
    ("architecture-int", "float", "f32", {"general.architecture": (7, V.UINT32)}, {}, "architecture 7"),
    ("no-head-count", "float", "f32", {"llama.attention.head_count": None}, {},
     "llama.attention.head_count is missing"),
    ("head-count-0", "float", "f32", {"llama.attention.head_count": (0, V.UINT32)}, {},
     "llama.attention.head_count must be a positive integer, got 0"),
    ("head-count-string", "float", "f32", {"llama.attention.head_count": ("four", V.STRING)}, {},
     "got 'four'"),
    ("head-count-float", "float", "f32", {"llama.attention.head_count": (4.0, V.FLOAT32)}, {},
     "must be a positive integer, got 4.0"),
    ("head-count-array", "float", "f32", {"llama.attention.head_count": ([4, 4], V.ARRAY, V.UINT32)}, {},
     "got [4, 4]"),
    ("head-count-5", "float", "f32", {"llama.attention.head_count": (5, V.UINT32)}, {},
     "llama.attention.head_count_kv (2) must divide llama.attention.head_count (5)"),
    ("head-count-6", "float", "f32", {"llama.attention.head_count": (6, V.UINT32)}, {},
     "llama.embedding_length (64) must be a multiple of llama.attention.head_count (6)"),
    ("head-count-8", "float", "f32", {"llama.attention.head_count": (8, V.UINT32)}, {},
     "the rotary dimension 16 (llama.rope.dimension_count) must be even and in [2, the head dim 8]"),
    ("head-count-8-rotary-8", "float", "f32", {"llama.attention.head_count": (8, V.UINT32),
                                               "llama.rope.dimension_count": (8, V.UINT32)}, {},
     "tensor blk.0.attn_k.weight has shape [64, 32], the config (dim 64, 2 kv heads x 8) implies [64, 16]"),
    ("kv-heads-3", "float", "f32", {"llama.attention.head_count_kv": (3, V.UINT32)}, {},
     "llama.attention.head_count_kv (3) must divide llama.attention.head_count (4)"),
    ("block-count-1e9", "float", "f32", {"llama.block_count": (10**9, V.UINT32)}, {},
     "tensor blk.2.attn_norm.weight is missing (the config has 1000000000 layers)"),
    ("block-count-1", "float", "f32", {"llama.block_count": (1, V.UINT32)}, {}, None),   # extra layers unused
    ("dim-1e12", "float", "f32", {"llama.embedding_length": (10**12, V.UINT64)}, {},
     "tensor token_embd.weight has shape [64, 262], the config (vocab 262, dim 1000000000000) implies "
     "[1000000000000, 262]"),
    ("ffn-100", "float", "f32", {"llama.feed_forward_length": (100, V.UINT32)}, {},
     "tensor blk.0.ffn_gate.weight has shape [64, 128], the config (dim 64, ffn 100) implies [64, 100]"),
    ("context-2e40", "float", "f32", {"llama.context_length": (2**40, V.UINT64)}, {},
     "llama.context_length 1099511627776 is more than the 1048576 positions"),
    ("rotary-7", "float", "f32", {"llama.rope.dimension_count": (7, V.UINT32)}, {},
     "the rotary dimension 7 (llama.rope.dimension_count) must be even"),
    ("rotary-32", "float", "f32", {"llama.rope.dimension_count": (32, V.UINT32)}, {}, "the head dim 16"),
    ("eps-nan", "float", "f32", {"llama.attention.layer_norm_rms_epsilon": (float("nan"), V.FLOAT32)}, {},
     "llama.attention.layer_norm_rms_epsilon must be a positive number, got nan"),
    ("rope-base-negative", "float", "f32", {"llama.rope.freq_base": (-1.0, V.FLOAT32)}, {},
     "llama.rope.freq_base must be a positive number"),
    ("rope-scaling-0", "float", "f32", {"llama.rope.scaling.type": ("linear", V.STRING),
                                        "llama.rope.scaling.factor": (0.0, V.FLOAT32)}, {},
     "llama.rope.scaling.factor"),
    ("tokens-ints", "float", "f32", {"tokenizer.ggml.tokens": ([1, 2, 3], V.ARRAY, V.INT32)}, {},
     "metadata tokenizer.ggml.tokens must be a list of strings"),
    ("no-tokens", "float", "f32", {"tokenizer.ggml.tokens": None}, {}, "tokenizer.ggml.tokens is missing"),
    ("tokenizer-llama", "float", "f32", {"tokenizer.ggml.model": ("llama", V.STRING)}, {},
     "only byte-level BPE"),
    ("eos-1e6", "float", "f32", {"tokenizer.ggml.eos_token_id": (10**6, V.UINT32)}, {},
     "tokenizer.ggml.eos_token_id is 1000000, not one of the 261 tokens"),
    ("merge-unknown", "float", "f32", {"tokenizer.ggml.merges": (["h e", "zz qq"], V.ARRAY, V.STRING)}, {},
     "does not make a BPE tokenizer"),
    ("merge-no-space", "float", "f32", {"tokenizer.ggml.merges": (["he"], V.ARRAY, V.STRING)}, {},
     "an entry without a space"),
    ("pre-unknown", "float", "f32", {"tokenizer.ggml.pre": ("nonesuch", V.STRING)}, {}, "'nonesuch'"),
    ("token-types-short", "float", "f32", {"tokenizer.ggml.token_type": ([3, 3], V.ARRAY, V.INT32)}, {},
     "has 2 entries for 261 tokens"),
    ("no-ffn-down", "float", "f32", {}, {"blk.1.ffn_down.weight": None}, "tensor blk.1.ffn_down.weight is missing"),
    ("no-embedding", "float", "f32", {}, {"token_embd.weight": None}, "tensor token_embd.weight is missing"),
    ("no-output", "float", "f32", {}, {"output.weight": None}, None),    # tied to the embedding then
    ("q-wrong-shape", "float", "f32", {}, {"blk.1.attn_q.weight": np.zeros((100, 64), np.float32)},
     "tensor blk.1.attn_q.weight has shape [64, 100], the config (dim 64, 4 heads x 16) implies [64, 64]"),
    ("down-transposed", "float", "f32", {}, {"blk.0.ffn_down.weight": np.zeros((128, 64), np.float32)},
     "tensor blk.0.ffn_down.weight has shape [64, 128], the config (dim 64, ffn 128) implies [128, 64]"),
    ("embedding-1d", "float", "f32", {}, {"token_embd.weight": np.zeros(64 * 262, np.float32)},
     "tensor token_embd.weight has shape [16768]"),
    ("norm-int32", "float", "f32", {}, {"blk.0.attn_norm.weight": np.ones(64, np.int32)},
     "tensor blk.0.attn_norm.weight has type I32, which the loader cannot dequantise"),
    ("norm-f16", "float", "f32", {}, {"blk.0.attn_norm.weight": np.ones(64, np.float16)}, None),
    ("norm-nan", "float", "f32", {}, {"output_norm.weight": np.full(64, np.nan, np.float32)},
     "tensor output_norm.weight has NaN or infinite values"),
    ("q5_0-native", "native", "q8", {}, {"blk.0.attn_v.weight": (
        gguf.quants.quantize(np.zeros((32, 64), np.float32), Q.Q5_0), Q.Q5_0)},
     "tensor blk.0.attn_v.weight has type Q5_0: native weights serve"),
    ("q5_0-float", "float", "q8", {}, {"blk.0.attn_v.weight": (
        gguf.quants.quantize(np.zeros((32, 64), np.float32), Q.Q5_0), Q.Q5_0)}, None),
    ("q8-scale-inf", "native", "q8", {}, {"blk.1.attn_output.weight": (
        _q8_with_scale(np.ones((64, 64), np.float32), np.inf), Q.Q8_0)},
     "tensor blk.1.attn_output.weight has a NaN or infinite block scale"),
    ("q8-scale-inf-float", "float", "q8", {}, {"blk.1.attn_output.weight": (
        _q8_with_scale(np.ones((64, 64), np.float32), np.inf), Q.Q8_0)},
     "tensor blk.1.attn_output.weight has NaN or infinite values"),
]


@pytest.mark.parametrize("case", EDITS, ids=[e[0] for e in EDITS])
def test_gguf_written_wrong(files, tmp_path, case):
    name, weights, src, fields, tensors, want = case
    path = rewrite_gguf(files[src], tmp_path / f"{name}.gguf", fields, tensors)
    got = outcome(path, weights)
    if want is None:
        assert got == "ran", got
    else:
        assert got.startswith(f"{name}.gguf: ") and want in got, got


# ---- Hugging Face directories ----------------------------------------------------------------------------------
HF = "ckpt-hf"     # the directory's name: every error names it (with the file inside it)


def _hf_copy(files, tmp_path, config=None, tensors=None):
    """A copy of the tiny Hugging Face directory with config.json's keys edited (None: dropped) and tensors of
    model.safetensors replaced (None: dropped)."""
    from safetensors.torch import load_file, save_file

    d = tmp_path / HF
    shutil.copytree(files["hf"], d)
    if config:
        c = json.loads((d / "config.json").read_text())
        c.update(config)
        (d / "config.json").write_text(json.dumps({k: v for k, v in c.items() if v is not None}))
    if tensors:
        w = load_file(str(d / "model.safetensors"))
        w.update(tensors)
        save_file({k: v for k, v in w.items() if v is not None}, str(d / "model.safetensors"))
    return d


def _hf_outcome(d):
    return outcome(d, names=[f"{HF}/", HF + ":"])


def test_safetensors_cut_at_every_boundary_and_at_random(files, tmp_path):
    d = _hf_copy(files, tmp_path)
    st = d / "model.safetensors"
    data = st.read_bytes()
    base = 8 + struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:base])
    bounds = {0, 8, base, len(data)} | {base + o for k, v in header.items() if k != "__metadata__"
                                        for o in v["data_offsets"]}
    rng = random.Random(1919)
    cuts = sorted({c for b in bounds for c in (b - 1, b, b + 1) if 0 <= c <= len(data)}
                  | {rng.randrange(len(data)) for _ in range(60)})
    for n in cuts:
        st.write_bytes(data[:n])
        got = _hf_outcome(d)
        assert (got == "ran") == (n == len(data)), (n, got)
    assert len(cuts) > 100


def test_safetensors_random_byte_flips_in_the_header(files, tmp_path):
    d = _hf_copy(files, tmp_path)
    st = d / "model.safetensors"
    data = st.read_bytes()
    base = 8 + struct.unpack("<Q", data[:8])[0]
    rng = random.Random(19)
    for _ in range(120):
        b = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(base)] = rng.randrange(256)
        st.write_bytes(bytes(b))
        _hf_outcome(d)


# (id, config.json edits, model.safetensors edits, what the error must say; None: loads and runs)
HF_EDITS = [
    ("no-hidden-size", {"hidden_size": None}, {}, "config.json: hidden_size is missing"),
    ("heads-0", {"num_attention_heads": 0}, {}, "config.json: num_attention_heads must be a positive integer, got 0"),
    ("heads-string", {"num_attention_heads": "4"}, {}, "got '4'"),
    ("heads-bool", {"num_attention_heads": True}, {}, "got True"),
    ("layers-1e30", {"num_hidden_layers": 10**30}, {},
     "tensor model.layers.2.input_layernorm.weight is missing (the config has 1" + "0" * 30 + " layers)"),
    ("vocab-300", {"vocab_size": 300}, {},
     "tensor model.embed_tokens.weight has shape [262, 64], the config (vocab 300, dim 64) implies [300, 64]"),
    ("context-1e9", {"max_position_embeddings": 10**9}, {}, "more than the 1048576 positions"),
    ("eps-negative", {"rms_norm_eps": -1e-5}, {}, "rms_norm_eps must be a positive number"),
    ("eps-infinite", {"rms_norm_eps": float("inf")}, {}, "rms_norm_eps must be a positive number, got inf"),
    ("rotary-0.1", {"partial_rotary_factor": 0.1}, {}, "the rotary dimension 1 (partial_rotary_factor)"),
    ("rotary-0.5", {"partial_rotary_factor": 0.5}, {}, None),
    ("rope-scaling-unknown", {"rope_scaling": {"type": "nonesuch", "factor": 2.0}}, {}, "unknown scaling type"),
    ("rope-scaling-no-factor", {"rope_scaling": {"rope_type": "linear"}}, {}, "KeyError"),
    ("rope-scaling-zero", {"rope_scaling": {"rope_type": "linear", "factor": 0}}, {}, "rope_scaling"),
    ("rope-scaling-list", {"rope_scaling": [1]}, {}, "rope_scaling must be a dict"),
    ("rope-scaling-llama3", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 32}},
     {}, None),
    ("model-type-qwen2", {"model_type": "qwen2"}, {}, "model_type 'qwen2' is not supported"),
    ("tie-string", {"tie_word_embeddings": "no"}, {}, "tie_word_embeddings must be true or false"),
    ("no-q", {}, {"model.layers.1.self_attn.q_proj.weight": None},
     "tensor model.layers.1.self_attn.q_proj.weight is missing"),
    ("no-lm-head", {}, {"lm_head.weight": None}, None),      # tied to the embedding then
    ("k-wrong-shape", {}, {"model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 64)},
     "model.safetensors: tensor model.layers.0.self_attn.k_proj.weight has shape [16, 64], the config "
     "(dim 64, 2 kv heads x 16) implies [32, 64]"),
    ("norm-int32", {}, {"model.norm.weight": torch.ones(64, dtype=torch.int32)},
     "model.safetensors: tensor model.norm.weight has dtype I32"),
    ("norm-nan", {}, {"model.norm.weight": torch.full((64,), float("nan"))},
     "tensor model.norm.weight has NaN or infinite values"),
    ("norm-bf16", {}, {"model.norm.weight": torch.ones(64, dtype=torch.bfloat16)}, None),
]


@pytest.mark.parametrize("case", HF_EDITS, ids=[e[0] for e in HF_EDITS])
def test_hf_written_wrong(files, tmp_path, case):
    _, config, tensors, want = case
    got = _hf_outcome(_hf_copy(files, tmp_path, config, tensors))
    if want is None:
        assert got == "ran", got
    else:
        assert got.startswith(f"{HF}/") and want in got, got


# (id, file in the directory, its new bytes (None: removed), what the error must say)
HF_FILES = [
    ("config-not-json", "config.json", b"{hidden_size: 64", "ckpt-hf/config.json: not valid JSON"),
    ("config-list", "config.json", b"[64, 2]", "ckpt-hf/config.json: must hold a JSON object, got list"),
    ("config-binary", "config.json", bytes(range(256)), "ckpt-hf/config.json: not valid JSON"),
    ("no-config", "config.json", None, "ckpt-hf/config.json: not found"),
    ("no-weights", "model.safetensors", None, "ckpt-hf: no *.safetensors file"),
    ("weights-text", "model.safetensors", b"not a safetensors file at all",
     "ckpt-hf/model.safetensors: not a readable safetensors file"),
    ("weights-empty", "model.safetensors", b"", "ckpt-hf/model.safetensors: not a readable safetensors file"),
    ("tokenizer-garbage", "tokenizer.json", b'{"model": 3}', "ckpt-hf/tokenizer.json: not a tokenizer"),
    ("no-tokenizer", "tokenizer.json", None, "ckpt-hf/tokenizer.json: not found"),
    ("tokenizer-config-not-json", "tokenizer_config.json", b"{", "ckpt-hf/tokenizer_config.json: not valid JSON"),
    ("tokenizer-config-template-list", "tokenizer_config.json", b'{"chat_template": [{"name": "x"}]}',
     "ckpt-hf/tokenizer_config.json: must be a JSON object whose chat_template"),
]


@pytest.mark.parametrize("case", HF_FILES, ids=[e[0] for e in HF_FILES])
def test_hf_files_broken(files, tmp_path, case):
    _, name, content, want = case
    d = _hf_copy(files, tmp_path)
    if content is None:
        (d / name).unlink()
    else:
        (d / name).write_bytes(content)
    got = _hf_outcome(d)
    assert got.startswith(want), got
