"""Memory accounting of a LeanK cache against what transformers' `DynamicCache` would hold."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def held_bytes(*tensors: torch.Tensor | None) -> int:
    """Bytes of the storages behind `tensors` (allocated capacity, not just the live slice)."""
    return sum(t.untyped_storage().nbytes() for t in tensors if t is not None)


@dataclass(frozen=True)
class LayerMemory:
    """Bytes one cache layer holds.

    Attributes:
        layer: layer index.
        kind: ``"leank"`` for a pruned layer, or the transformers layer class it kept (e.g. a sliding layer).
        key_bytes: allocated bytes of stored keys.
        value_bytes: allocated bytes of stored values.
        other_bytes: bookkeeping (validity flags, sink lengths).
        reserved_bytes: part of the above that is allocated capacity not yet holding tokens.
        dense_bytes: what a `DynamicCache` layer of the same kind would hold for the same tokens.
    """

    layer: int
    kind: str
    key_bytes: int
    value_bytes: int
    other_bytes: int
    reserved_bytes: int
    dense_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.key_bytes + self.value_bytes + self.other_bytes


@dataclass(frozen=True)
class MemoryReport:
    """Per-layer and total bytes held by a cache versus a `DynamicCache` holding the same tokens."""

    layers: tuple[LayerMemory, ...]

    @property
    def total_bytes(self) -> int:
        return sum(layer.total_bytes for layer in self.layers)

    @property
    def key_bytes(self) -> int:
        return sum(layer.key_bytes for layer in self.layers)

    @property
    def value_bytes(self) -> int:
        return sum(layer.value_bytes for layer in self.layers)

    @property
    def reserved_bytes(self) -> int:
        return sum(layer.reserved_bytes for layer in self.layers)

    @property
    def dense_bytes(self) -> int:
        return sum(layer.dense_bytes for layer in self.layers)

    @property
    def saved_fraction(self) -> float:
        """Share of the `DynamicCache` bytes that this cache does not hold (0.4 = 40 % less memory)."""
        return 1.0 - self.total_bytes / self.dense_bytes if self.dense_bytes else 0.0

    def to_markdown(self) -> str:
        """A markdown table, one row per layer plus the total, in MiB."""
        rows = [
            "| layer | kind | K MiB | V MiB | total MiB | DynamicCache MiB | saved |",
            "|---|---|---|---|---|---|---|",
        ]
        for m in self.layers:
            rows.append(_row(str(m.layer), m.kind, m.key_bytes, m.value_bytes, m.total_bytes, m.dense_bytes))
        rows.append(_row("all", "", self.key_bytes, self.value_bytes, self.total_bytes, self.dense_bytes))
        return "\n".join(rows)

    def __str__(self) -> str:
        mib = 2**20
        return (
            f"LeanK cache: {self.total_bytes / mib:.2f} MiB "
            f"(K {self.key_bytes / mib:.2f}, V {self.value_bytes / mib:.2f})"
            f" vs DynamicCache {self.dense_bytes / mib:.2f} MiB: {self.saved_fraction:.1%} saved"
        )


def _row(layer: str, kind: str, key: int, value: int, total: int, dense: int) -> str:
    mib = 2**20
    saved = f"{1 - total / dense:.1%}" if dense else "-"
    return (
        f"| {layer} | {kind} | {key / mib:.3f} | {value / mib:.3f} | {total / mib:.3f} | {dense / mib:.3f} | {saved} |"
    )
