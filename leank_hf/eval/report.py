"""Showing `evaluate`'s rows (a Markdown table and a PNG of each metric against the keep ratio) and `evaluate_ruler`'s
(a table and a PNG per family and length)."""

from __future__ import annotations

import itertools
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


def format_ruler_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of `evaluate_ruler` rows: a line per length, method and keep ratio, a column per family. The
    full cache's cells give the tasks it solves ("k/n"); a method's the share of those it solves too, and the count."""
    families = list(dict.fromkeys(row["family"] for row in rows))
    lines = ["| tokens | method | keep ratio | " + " | ".join(families) + " |", "|---" * (3 + len(families)) + "|"]
    by_line: dict[tuple, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_line.setdefault((row["tokens"], row["method"], row["keep_ratio"]), {})[row["family"]] = row
    for (tokens, method, ratio), cells in by_line.items():
        lines.append(f"| {tokens} | {method} | {ratio:.2f} | " + " | ".join(_ruler_cell(cells.get(f)) for f in families)
                     + " |")  # fmt: skip
    return "\n".join(lines)


def _ruler_cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return ""
    if "full_cache_solved" in row:
        return row["full_cache_solved"]
    return "n/a" if row["kept"] is None else f"{row['kept']:.2f} ({row['solved']}/{row['tasks']})"


def plot_ruler(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """Write `ruler_png` to `path` (atomically)."""
    atomic_write_bytes(path, ruler_png(rows))


def ruler_png(rows: Sequence[dict[str, Any]]) -> bytes:
    """PNG bytes: for each length (a row of panels) and family (a column), the share of the full cache's solved
    tasks each method keeps against the keep ratio (on a `Figure` of its own, as `accuracy_png`)."""
    from matplotlib.figure import Figure

    lengths = list(dict.fromkeys(row["tokens"] for row in rows))
    families = list(dict.fromkeys(row["family"] for row in rows))
    methods = [m for m in dict.fromkeys(row["method"] for row in rows) if m != FULL_CACHE]
    figure = Figure(figsize=(2.8 * len(families), 2.6 * len(lengths)), layout="constrained")
    axes = figure.subplots(len(lengths), len(families), squeeze=False, sharey=True)
    for (i, tokens), (j, family) in itertools.product(enumerate(lengths), enumerate(families)):
        axis = axes[i][j]
        here = [row for row in rows if row["tokens"] == tokens and row["family"] == family]
        for method in methods:
            mine = [r for r in here if r["method"] == method and r["kept"] is not None]
            points = sorted((r["keep_ratio"], r["kept"]) for r in mine)
            if points:
                axis.plot(*zip(*points, strict=True), marker="o", label=method)
        axis.axhline(1.0, color="grey", linestyle="--", linewidth=1, label=FULL_CACHE)
        full = next((r["full_cache_solved"] for r in here if r["method"] == FULL_CACHE), "?")
        axis.set(title=f"{family}, {tokens} tokens\n(full cache solves {full})", ylim=(-0.05, 1.05))
        axis.title.set_fontsize(9)
        axis.grid(alpha=0.3)
        if i == len(lengths) - 1:
            axis.set_xlabel("key channels kept")
        if j == 0:
            axis.set_ylabel("solved tasks kept")
    axes[0][0].legend(fontsize=7)
    return figure_png(figure, dpi=100)
