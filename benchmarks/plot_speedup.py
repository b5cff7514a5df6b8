"""Plot LeanK decode-attention speedup over SDPA against context length from benchmark CSVs.

python benchmarks/plot_speedup.py benchmarks/results/*.csv --out benchmarks/speedup_vs_context.png
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

# Curve label -> CSV column of `benchmarks/decode_attention.py`, and its line style.
TIMINGS = {
    "CUDA graph, clean L2": "speedup",
    "layers back to back in one CUDA graph": "step_speedup",
    "CUDA graph, dirty L2 (do_bench's flush)": "dirty_speedup",
    "eager launch": "eager_speedup",
}
STYLES = dict(zip(TIMINGS, ["-o", "-^", "-.s", "--x"], strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csvs", nargs="+")
    parser.add_argument("--out", default="benchmarks/speedup_vs_context.png")
    parser.add_argument("--window", default="64/256", help="SINK/RECENT rows to plot")
    args = parser.parse_args()

    series = defaultdict(dict)  # (batch, timing) -> {context: speedup}
    floor = defaultdict(dict)
    for path in args.csvs:
        with open(path) as f:
            for row in csv.DictReader(f):
                if f"{row['sink']}/{row['recent']}" != args.window:
                    continue
                batch, context = int(row["batch"]), int(row["context"])
                for timing, column in TIMINGS.items():
                    if row.get(column):  # CSVs from before a column existed lack it
                        series[(batch, timing)][context] = float(row[column])
                floor[batch][context] = float(row["floor_ratio"])
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = {batch: f"C{index}" for index, batch in enumerate(sorted(floor))}  # one color per batch
    for (batch, timing), points in sorted(series.items()):
        xs = sorted(points)
        style = STYLES[timing]
        ax.plot(xs, [points[x] for x in xs], style, color=colors[batch], label=f"batch {batch}, {timing}")
    for batch, points in sorted(floor.items()):
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], ":", color=colors[batch], alpha=0.5, label=f"byte floor, batch {batch}")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set(xscale="log", xlabel="context tokens per row", ylabel="speedup over SDPA (x)",
           title=f"LeanK decode attention vs SDPA, Llama-3.1-8B layer, H100, sink/recent {args.window}")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
