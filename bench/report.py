"""Turns bench/node-bench.sh lines (SIZE_MIB OP KIND SECONDS) into a markdown
table of min/median/max and the ratios ours/plain CRIU and ours/raw bound,
and a PNG plot when matplotlib is available."""
import statistics
import sys
from collections import defaultdict

raw_path, out_dir, machine = sys.argv[1], sys.argv[2], sys.argv[3]
runs = defaultdict(list)
for line in open(raw_path):
    size, op, kind, secs = line.split()
    runs[(int(size), op, kind)].append(float(secs))

def cell(values):
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"

rows = ["| size | op | ours (s) min/med/max | plain CRIU (s) | raw bound (s) | ours ÷ plain | ours ÷ raw |",
        "|---|---|---|---|---|---|---|"]
for size in sorted({k[0] for k in runs}):
    for op in ("dump", "restore"):
        ours, plain, rawb = (runs.get((size, op, k), [float("nan")]) for k in ("ours", "plain", "raw"))
        m = statistics.median
        rows.append(f"| {size // 1024} GiB | {op} | {cell(ours)} | {cell(plain)} | {cell(rawb)} | "
                    f"{m(ours) / m(plain):.2f} | {m(ours) / m(rawb):.2f} |")
table = "\n".join(rows)
with open(f"{out_dir}/RESULTS.md", "w") as f:
    f.write(f"# Benchmark results\n\nMachine: {machine}.\n\n{table}\n")
print(table)

try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("(matplotlib not installed: no plot)", file=sys.stderr)
    sys.exit(0)
fig, axes = plt.subplots(1, 2, figsize=(10, 4))
sizes = sorted({k[0] for k in runs})
for ax, op in zip(axes, ("dump", "restore")):
    for kind in ("ours", "plain", "raw"):
        ys = [statistics.median(runs.get((s, op, kind), [float("nan")])) for s in sizes]
        ax.plot([s / 1024 for s in sizes], ys, marker="o", label=kind)
    ax.set_title(f"{op} (median seconds)")
    ax.set_xlabel("container memory (GiB)")
    ax.legend()
fig.tight_layout()
fig.savefig(f"{out_dir}/plot.png")
