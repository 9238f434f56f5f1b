"""Data-parallel LoRA fine-tuning (tritium.distributed.finetune_ddp: DDP over the adapters only) on 2 gloo processes
against tritium.finetune.finetune in one process on the same examples: the same loss curve and adapters (the
tolerance rule: float32 against the one-process float64 run), the frozen weights untouched, a last batch with
fewer rows than ranks."""
from __future__ import annotations

import torch

from tests.distributed.spawn import spawn
from tests.util import assert_within_torch_error
from tritium import finetune as ft
from tritium.distributed import finetune_ddp
from tritium.models import LlamaConfig, build

CFG = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=64, vocab_size=257,
                  max_seq_len=256, tie_embeddings=True)
# 29 examples in batches of 7: the last batch has one row, so rank 1 has none of it
TUNE = ft.FinetuneConfig(r=4, alpha=8, epochs=1, lr=1e-2, batch_size=7, dropout=0.0, targets=["q_proj", "v_proj",
                                                                                                "down_proj"])


class ByteTok:
    """A byte tokenizer with a ChatML template, for tiny models (as tests/test_finetune.py's)."""
    bos_id, eos_id, add_bos = None, 256, False

    def encode(self, text, add_bos=None):
        return list(text.encode())

    def apply_chat_template(self, messages, add_generation_prompt=True):
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def _model(dtype=torch.float32):
    return build(CFG, torch.float32).init_random(generator=torch.Generator().manual_seed(0)).to(dtype)


def _adapters(model):
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _check(rank, world):
    examples = ft.dates_task(29, 0)
    single, single64, model = _model(), _model(torch.float64), _model()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    want = torch.tensor(ft.finetune(single, ByteTok(), examples, TUNE), dtype=torch.float32)
    want64 = torch.tensor(ft.finetune(single64, ByteTok(), examples, TUNE), dtype=torch.float64)
    got = torch.tensor(finetune_ddp(model, ByteTok(), examples, TUNE), dtype=torch.float32)
    what = f"LoRA DDP rank {rank}/{world}"
    assert len(got) == 5, got
    assert_within_torch_error(got, want, want64, what + " loss curve")
    mine, ref, ref64 = _adapters(model), _adapters(single), _adapters(single64)
    assert mine.keys() == ref.keys() and len(mine) == 2 * 3 * CFG.n_layers, sorted(mine)
    for n in ref:
        assert_within_torch_error(mine[n], ref[n], ref64[n], f"{what} {n}")
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), f"{what}: frozen {n} changed"
    return "ok"


def test_lora_ddp_matches_one_process(tmp_path):
    results = spawn(tmp_path, 2, _check)
    assert results == ["'ok'"] * 2, "\n".join(results)
