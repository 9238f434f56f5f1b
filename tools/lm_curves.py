"""Train the byte LMs of ``tritium train`` (mamba, rwkv, xlstm, gpt) at their default recipe and record their held-out
curves: bench/results/train-lm-<machine kind>.json (every run's result, curve included) and a PNG of bits per
byte against step.

    .venv/bin/python tools/lm_curves.py [--steps N] [--model M ...] [--add] [--out bench/results/train-lm-amd-avx512]

--add keeps the runs already recorded there for the models not run now (one model's curve added to the plot
without re-running the others: bits per byte against step does not depend on the machine's load).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from tritium.bench.common import machine_info
from tritium.cli.train_lm import LM_MODELS, train

LABELS = {"mamba": "Mamba (tritium.models.ssm)", "rwkv": "RWKV-7 (tritium.models.rwkv)",
          "xlstm": "xLSTM, mLSTM blocks (tritium.models.xlstm)",
          "gpt": "causal Transformer (classic blocks)"}


def plot(runs: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in runs:
        steps, bpb = zip(*r["curve"])
        ax.plot(steps, bpb, marker="o", ms=3, label=f"{LABELS[r['model']]}, {r['params'] / 1e6:.2f}M params")
    ax.set_xlabel("optimizer step (batch 16 x 128 bytes)")
    ax.set_ylabel("held-out bits per byte")
    ax.set_title("Byte LMs on the Python standard library (tritium train)")
    ax.set_ylim(top=min(8.5, max(b for r in runs for _, b in r["curve"]) + 0.2))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int)
    p.add_argument("--model", action="append", choices=LM_MODELS)
    p.add_argument("--out", help="path without suffix (default: bench/results/train-lm-<machine kind>)")
    p.add_argument("--add", action="store_true",
                   help="keep the recorded runs of the models not run now (add a curve without re-running the rest)")
    args = p.parse_args()
    machine = machine_info("cpu")
    out = Path(args.out or f"bench/results/train-lm-{machine['machine_kind']}")
    record = {"machine": machine, "suite": "train-lm"}
    kept = []
    if args.add and out.with_suffix(".json").exists():
        old = json.loads(out.with_suffix(".json").read_text())
        kept = [r for r in old["rows"] if r["model"] not in (args.model or LM_MODELS)]
        if kept:  # their timings (seconds) are the earlier machine's
            record["kept_rows_machine"] = old.get("kept_rows_machine", old["machine"])
    runs = [train(m, "tritium", args.steps, progress=False) for m in (args.model or LM_MODELS)]
    for r in runs:
        print(f"{r['model']}: {r['bits_per_byte']:.3f} bits/byte after {r['steps']} steps, {r['seconds']:.0f} s")
    runs = sorted(kept + runs, key=lambda r: LM_MODELS.index(r["model"]))
    out.with_suffix(".json").write_text(json.dumps({**record, "rows": runs}, indent=1) + "\n")
    plot(runs, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
