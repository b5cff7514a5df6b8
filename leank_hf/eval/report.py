"""Showing `evaluate`'s rows: a Markdown table and a PNG of each metric against the keep ratio."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ..masks.card import figure_png
from ..masks.io import atomic_write_bytes
from .evaluation import FULL_CACHE


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of `evaluate` rows."""
    lines = ["| method | keep ratio | KL | top-1 agreement | retrieval (of full cache's) |", "|---|---|---|---|---|"]
    for row in rows:
        retrieval = "n/a" if row["retrieval"] is None else f"{row['retrieval']:.2f}"
        retrieval += f" ({row['full_cache_solved']} solved)" if "full_cache_solved" in row else ""
        lines.append(
            f"| {row['method']} | {row['keep_ratio']:.2f} | {row['kl']:.4f} | {row['top1']:.3f} | {retrieval} |"
        )
    return "\n".join(lines)


def plot_accuracy(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """Write `accuracy_png` to `path` (atomically)."""
    atomic_write_bytes(path, accuracy_png(rows))


def accuracy_png(rows: Sequence[dict[str, Any]]) -> bytes:
    """PNG bytes: top-1 agreement, KL and retrieval against keep ratio, one line per method (on a `Figure` of its
    own: the user's matplotlib backend and pyplot state stay as they are)."""
    from matplotlib.figure import Figure

    metrics = [
        ("top1", "top-1 agreement with full cache"),
        ("kl", "KL(full ‖ method)"),
        ("retrieval", "retrieval kept"),
    ]
    figure = Figure(figsize=(5 * len(metrics), 4), layout="constrained")
    axes = figure.subplots(1, len(metrics))
    methods = [m for m in dict.fromkeys(row["method"] for row in rows) if m != FULL_CACHE]
    for axis, (key, title) in zip(axes, metrics, strict=True):
        for method in methods:
            points = sorted(
                (row["keep_ratio"], row[key]) for row in rows if row["method"] == method and row[key] is not None
            )
            if points:
                axis.plot(*zip(*points, strict=True), marker="o", label=method)
        if key != "kl":
            axis.axhline(1.0, color="grey", linestyle="--", linewidth=1, label=FULL_CACHE)
        else:
            axis.set_yscale("log")
        axis.set(xlabel="key channels kept", title=title)
        axis.grid(alpha=0.3)
    axes[0].legend()
    return figure_png(figure, dpi=120)
