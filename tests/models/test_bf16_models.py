"""16-bit models against a float64 baseline: the tritium Llama in bfloat16 and its plain-PyTorch eager twin in
bfloat16, both measured against the eager twin in float64 on the same (bfloat16-rounded) weights; tritium's
error is at most 2x the twin's (tests/util.py's rule). The twin keeps its RoPE frequencies in float32 (as
Hugging Face does, and as tritium's tables are): rounding them to bfloat16 would be an error of the baseline
model, not of torch's ops."""
import pytest
import torch

from tests.util import assert_within_torch_error
from tritium.models import build
from tritium.models.eager import EagerLlama

TINY = ["tiny", "tiny-mha-untied", "tiny-partial-rotary"]


def _eager(model, dtype):
    """model's eager twin in dtype, on model's weights (exact in dtype when rounded already)."""
    twin = EagerLlama(model.config)
    inv_freq = twin.inv_freq
    twin = twin.to(dtype).load_weights({k: v.to(dtype) for k, v in model.hf_state_dict().items()})
    twin.inv_freq = inv_freq.to(torch.float64 if dtype == torch.float64 else torch.float32)
    return twin


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", TINY)
def test_16bit_model_within_twice_torchs_error(name, dtype):
    g = torch.Generator().manual_seed(0)
    model = build(name, torch.float32).init_random(generator=g).to(dtype)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=g)
    with torch.no_grad():
        ours = model(ids)
        theirs = _eager(model, dtype)(ids)
        ref = _eager(model, torch.float64)(ids)
    assert ours.dtype == dtype and model.rope_cos.dtype == torch.float32  # .to(dtype) keeps the RoPE tables exact
    assert_within_torch_error(ours, theirs, ref, f"{name} {dtype} logits")
