"""Turns the lines of bench/node-bench.sh and bench/e2e.sh into
bench/results/RESULTS.md (min/median/max, ratios to plain CRIU and to the raw
storage bound, image sizes, end-to-end downtime in Slurm) and a PNG plot."""
import statistics
import sys
from collections import defaultdict

raw_path, out_dir, machine = sys.argv[1], sys.argv[2], sys.argv[3]
runs = defaultdict(list)      # (size, op, kind) -> seconds
sizes = {}                    # (size, kind) -> image bytes
cycles = defaultdict(list)    # size -> [(kind, job, t0, t1, t2, t3)]
signals = defaultdict(list)   # job -> [epoch of each SIGTERM slurmd sent]
for line in open(raw_path):
    f = line.split()
    if len(f) < 4:
        continue
    size = int(f[0])
    if f[1] == "size":
        sizes[(size, f[2])] = int(f[3])
    elif f[1] == "e2e-cycle":
        cycles[size].append((f[2], f[3], *map(float, f[4:8])))
    elif f[1] == "e2e-signal":
        signals[f[2]].append(float(f[3]))
    else:
        runs[(size, f[1], f[2])].append(float(f[3]))

# One end-to-end cycle, split at the SIGTERM slurmd sent to the step.
for size, cs in cycles.items():
    for kind, job, t0, t1, t2, t3 in cs:
        sig = min((s for s in signals[job] if s >= t0), default=t0)
        runs[(size, "e2e", kind, "preempt (Slurm)")].append(sig - t0)
        runs[(size, "e2e", kind, "checkpoint")].append(t1 - sig)
        runs[(size, "e2e", kind, "requeue to run (Slurm)")].append(t2 - t1)
        runs[(size, "e2e", kind, "restore")].append(t3 - t2)
        runs[(size, "e2e", kind, "downtime (ours)")].append((t1 - sig) + (t3 - t2))

med = statistics.median


def cell(values):
    return f"{min(values):.2f} / {med(values):.2f} / {max(values):.2f}"


def mib(b):
    return f"{b / 1048576:.0f} MiB" if b else ""


all_sizes = sorted({k[0] for k in runs})
kinds = ["ours", "ours-zstd", "ours-staged", "periodic", "plain", "raw"]
rows = ["| size | op | kind | seconds min / med / max | ÷ plain CRIU | ÷ raw bound | raw bound ÷ this | image |",
        "|---|---|---|---|---|---|---|---|"]
for size in all_sizes:
    for op in ("dump", "frozen", "restore"):
        plain, rawb = runs.get((size, op, "plain")), runs.get((size, op, "raw"))
        for kind in kinds:
            v = runs.get((size, op, kind))
            if not v:
                continue
            vs_plain = f"{med(v) / med(plain):.2f}" if plain and kind not in ("plain", "raw") else ""
            rawb = rawb if op != "frozen" else runs.get((size, "dump", "raw"))
            vs_raw = f"{med(v) / med(rawb):.2f}" if rawb and kind != "raw" else ""
            of_raw = f"{med(rawb) / med(v):.0%}" if rawb and kind != "raw" else ""
            image = mib(sizes.get((size, kind), 0)) if op == "dump" else ""
            rows.append(f"| {size / 1024:g} GiB | {op} | {kind} | {cell(v)} | {vs_plain} | {vs_raw} | {of_raw} | {image} |")
table = "\n".join(rows)

e2e_rows = ["| size | kind | phase | seconds min / med / max |", "|---|---|---|---|"]
for size in all_sizes:
    for kind in ("ours", "ours-staged"):
        for phase in ("preempt (Slurm)", "checkpoint", "requeue to run (Slurm)", "restore", "downtime (ours)"):
            v = runs.get((size, "e2e", kind, phase))
            if v:
                e2e_rows.append(f"| {size / 1024:g} GiB | {kind} | {phase} | {cell(v)} |")
e2e = "\n".join(e2e_rows)

with open(f"{out_dir}/RESULTS.md", "w") as f:
    f.write(f"# Benchmark results\n\nMachine: {machine}.\n\n{table}\n\n"
            f"## Preempt -> requeue -> restore in Slurm\n\n{e2e}\n")
print(table)
print()
print(e2e)

try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("(matplotlib not installed: no plot)", file=sys.stderr)
    sys.exit(0)
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for ax, op in zip(axes, ("dump", "restore")):
    for kind in kinds:
        pts = [(s / 1024, med(runs[(s, op, kind)])) for s in all_sizes if runs.get((s, op, kind))]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=kind)
    ax.set_title(f"{op} (median seconds)")
    ax.set_xlabel("container memory (GiB)")
    ax.legend()
fig.tight_layout()
fig.savefig(f"{out_dir}/plot.png")
