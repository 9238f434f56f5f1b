"""Render bench/results/ops-headline.json as the README's "Recorded run" table, in place.

The README block starts at the line beginning "Recorded " under "### Recorded run" and ends before the first
blank line after the table. Run after `tritium bench ops --headline --json bench/results/ops-headline.json`.
"""
import json
import pathlib
import sys

root = pathlib.Path(__file__).resolve().parent.parent
data = json.loads((root / "bench/results/ops-headline.json").read_text())
m = data["machine"]
lines = [
    f"Recorded {m['time']} on {m['cpu']} ({m['cores']} cores, torch {m['torch']}, measured copy bandwidth "
    f"{m['copy_bandwidth_GBps']:.2f} GB/s); `tritium bench ops --headline`.",
    "",
    "| op | shape | dtype | mode | eager ms | compile ms | tritium ms | x eager | x compile | GB/s |",
    "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
]


def f(v, fmt):
    return "-" if v is None or v != v else format(v, fmt)


for r in data["rows"]:
    shape = "x".join(str(s) for s in r["shape"])
    lines.append(f"| {r['op']} | {shape} | {r['dtype']} | {r['mode']} | {f(r['eager_ms'], '.1f')} | "
                 f"{f(r['compile_ms'], '.1f')} | {f(r['tritium_ms'], '.1f')} | {f(r['speedup_eager'], '.2f')} | "
                 f"{f(r['speedup_compile'], '.2f')} | {f(r['GBps'], '.1f')} |")

readme = root / "README.md"
text = readme.read_text().split("\n")
start = next(i for i, line in enumerate(text) if line.startswith("Recorded ") and "bench ops" in line)
end = start + 2
while end < len(text) and text[end].startswith("|"):
    end += 1
text[start:end] = lines
readme.write_text("\n".join(text))
print(f"README table: {len(data['rows'])} rows", file=sys.stderr)
