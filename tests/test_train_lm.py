"""tritium train --model mamba|rwkv|xlstm|gpt: the byte-level LM recipe on the standard library's sources (the
corpus split, a tiny configuration trained for a few steps through the command line: the loss falls and the
held-out bits per byte are reported)."""
from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

import pytest
import torch

from tritium.cli import main as cli_main
from tritium.cli import train_lm


def test_corpus_is_the_stdlib_split_by_file_deterministically():
    files = train_lm.stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [p.relative_to(root).as_posix() for p in files]
    assert rel == sorted(rel) and len(rel) > 100
    assert not any("site-packages" in r for r in rel)
    train, held, info = train_lm.corpus()
    held_files = files[::train_lm.HELD_OUT_EVERY]
    assert info["held_out_files"] == len(held_files) and info["files"] == len(files)
    # every held-out file's bytes are in the held-out text, the sizes add up (files joined by a blank line)
    sizes = [p.stat().st_size for p in files]
    n_held = len(held_files)
    assert len(held) == sum(sizes[::train_lm.HELD_OUT_EVERY]) + 2 * (n_held - 1)
    assert len(train) == sum(sizes) - sum(sizes[::train_lm.HELD_OUT_EVERY]) + 2 * (len(files) - n_held - 1)
    assert bytes(held[:64].tolist()) == held_files[0].read_bytes()[:64]
    again = train_lm.corpus()
    assert torch.equal(again[0], train) and torch.equal(again[1], held)


def test_bits_per_byte_of_a_uniform_model_is_eight():
    class Uniform(torch.nn.Module):
        def forward(self, ids):
            return torch.zeros(*ids.shape, train_lm.VOCAB)

    data = torch.randint(0, 256, (1000,), dtype=torch.uint8)
    assert train_lm.bits_per_byte(Uniform(), data, 16, 10) == pytest.approx(8.0, rel=1e-6)


@pytest.mark.parametrize("model", ["mamba", "rwkv", "xlstm"])
def test_tiny_training_run_lowers_the_loss_and_reports_bits_per_byte(model, tmp_path, capsys):
    out = tmp_path / "run.json"
    rc = cli_main(["train", "--model", model, "--size", "tiny", "--steps", "40", "--batch", "8", "--context", "64",
                   "--no-progress", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "bits per byte" in printed
    r = json.loads(out.read_text())
    assert r["model"] == model and r["steps"] == 40 and r["size"] == "tiny"
    steps = [s for s, _ in r["curve"]]
    assert steps[0] == 0 and steps[-1] == 40
    first, last = r["curve"][0][1], r["curve"][-1][1]
    assert f"{last:.3f} bits per byte" in printed
    # an untrained model is near uniform (8 bits); 40 steps learn at least the byte frequencies of Python source
    assert first > 7.0 and last < first - 1.5, r["curve"]
    assert r["final_loss"] < math.log(256) - 1.0


def test_bad_arguments_are_usage_errors(capsys):
    assert cli_main(["train", "--model", "rwkv", "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert cli_main(["train", "--model", "rwkv", "--size", "huge"]) == 2
    assert cli_main(["train", "--model", "nonesuch"]) == 2
