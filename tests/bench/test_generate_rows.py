"""`tritium bench generate`'s argument parsing, peer pairing and row building, on fake timings (nothing is timed
and llama-cpp-python is not needed)."""
import argparse

import pytest

from tritium.bench import generate as g
from tritium.models import WEIGHT_MODES


def test_defaults_parse():
    p = argparse.ArgumentParser()
    g.add_arguments(p)
    args = p.parse_args([])
    assert (args.weights, args.int8_act, args.no_peer) == ("native,float", "two-term", False)
    assert g.parse_plan(args.weights, args.dtypes, args.int8_act, WEIGHT_MODES) == [
        ("native", "float32", 2), ("native", "bfloat16", 2), ("float", "float32", 0), ("float", "bfloat16", 0)]


def test_plan_float_weights_take_no_int8_activations():
    plan = g.parse_plan("float,int8", "bfloat16", "off,on,two-term", WEIGHT_MODES)
    assert plan == [("float", "bfloat16", 0), ("int8", "bfloat16", 0), ("int8", "bfloat16", 1), ("int8", "bfloat16", 2)]


def test_plan_takes_llama_cpp_variant_files():
    assert g.parse_plan("native:Q4_0", "float32", "on", WEIGHT_MODES) == [("native:Q4_0", "float32", 1)]


@pytest.mark.parametrize("weights,act", [("int3", "off"), ("native", "yes"), ("native:Q3_K", "off")])
def test_plan_rejects_unknown_values(weights, act):
    with pytest.raises(ValueError):
        g.parse_plan(weights, "float32", act, WEIGHT_MODES)


def test_peer_pairs():
    assert g.peer_pairs("float", "float32") == ["F32"]
    assert g.peer_pairs("float", "bfloat16") == ["F16"]
    assert g.peer_pairs("native", "bfloat16") == ["file", "Q4_0"]
    assert g.peer_pairs("int8", "float32") == ["Q8_0"]
    assert g.peer_pairs("int4", "float32") == ["Q4_0"]
    assert g.peer_pairs("native:Q4_0", "bfloat16") == ["Q4_0"]
    assert {k for w in WEIGHT_MODES for d in ("float32", "bfloat16") for k in g.peer_pairs(w, d)} == set(
        g.PEER_VARIANTS)


def test_alternate_interleaves_and_takes_medians():
    calls = []

    def fake(name, times):
        it = iter(times)
        return lambda: calls.append(name) or next(it)

    out = g._alternate([fake("ours", [3.0, 1.0, 2.0]), fake("peer", [5.0, 9.0, 4.0])], 3)
    assert out == [2.0, 5.0]
    assert calls == ["ours", "peer"] * 3


def test_make_row_ratios_and_weight_stream():
    bw = 10e9
    row = g.make_row("native", "bfloat16", False, "decode batch 1", 1, 1, t_tritium=0.02, t_eager=0.04,
                     weight_bytes=100_000_000, bw=bw, peer_s={"Q4_1 (file)": 0.025, "Q4_0": 0.01})
    assert row["tritium_tok_s"] == pytest.approx(50.0)
    assert row["speedup"] == pytest.approx(2.0)
    assert row["tritium_weight_bw_frac"] == pytest.approx(0.5)      # 100 MB in 20 ms = 5 GB/s of 10
    assert row["beyond_weights_frac"] == pytest.approx(0.5)         # 10 ms of the 20 ms step is the stream
    assert row["llama_cpp_tok_s"] == pytest.approx({"Q4_1 (file)": 40.0, "Q4_0": 100.0})
    assert row["vs_llama_cpp"] == pytest.approx({"Q4_1 (file)": 1.25, "Q4_0": 0.5})
    prefill = g.make_row("native", "bfloat16", False, "prefill 512", 1, 512, t_tritium=0.5, t_eager=1.0,
                         weight_bytes=100_000_000, bw=bw)
    assert prefill["tritium_tok_s"] == pytest.approx(1024.0)
    assert prefill["tritium_weight_bw_frac"] is None and prefill["vs_llama_cpp"] == {}
    # the keys tools/readme_table.py renders stay in every row
    assert {"dtype", "case", "tritium_tok_s", "eager_tok_s", "speedup", "scaling_vs_batch1"} <= set(prefill)


def test_peer_source(tmp_path):
    assert g.peer_source(str(tmp_path)) is None                     # a Hugging Face directory: no peer
    assert g.peer_source("/x/m.Q8_0.gguf") == "/x/m.Q8_0.gguf"
