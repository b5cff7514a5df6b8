"""Memory accounting of a LeanK cache against what transformers' `DynamicCache` would hold."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kv_quantization import DEFAULT_KV_QUANTIZATION, KVQuantization
from .windows import DEFAULT_WINDOWS


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
        dense_bytes: what the stock layer would hold: a `DynamicCache` layer for the same tokens, or a `StaticCache`
            layer of the same `max_cache_len`.
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


def _summed(name: str) -> property:
    """A property of `MemoryReport`: the `LayerMemory` field `name`, summed over its layers."""
    return property(lambda report: sum(getattr(layer, name) for layer in report.layers), doc=f"`{name}` of all layers")


@dataclass(frozen=True)
class MemoryReport:
    """Per-layer and total bytes held by a cache versus the stock cache it replaces (`baseline`): a `DynamicCache`
    holding the same tokens, or a `StaticCache` of the same `max_cache_len`."""

    layers: tuple[LayerMemory, ...]
    baseline: str = "DynamicCache"

    total_bytes = _summed("total_bytes")
    key_bytes = _summed("key_bytes")
    value_bytes = _summed("value_bytes")
    other_bytes = _summed("other_bytes")
    reserved_bytes = _summed("reserved_bytes")
    dense_bytes = _summed("dense_bytes")

    @property
    def saved_fraction(self) -> float:
        """Share of the baseline's bytes that this cache does not hold (0.4 = 40 % less memory)."""
        return 1.0 - self.total_bytes / self.dense_bytes if self.dense_bytes else 0.0

    def to_markdown(self) -> str:
        """A markdown table, one row per layer plus the total, in MiB."""
        rows = [
            f"| layer | kind | K MiB | V MiB | total MiB | {self.baseline} MiB | saved |",
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
            f" vs {self.baseline} {self.dense_bytes / mib:.2f} MiB: {self.saved_fraction:.1%} saved"
        )


def _row(layer: str, kind: str, key: int, value: int, total: int, dense: int) -> str:
    mib = 2**20
    saved = f"{1 - total / dense:.1%}" if dense else "-"
    return (
        f"| {layer} | {kind} | {key / mib:.3f} | {value / mib:.3f} | {total / mib:.3f} | {dense / mib:.3f} | {saved} |"
    )


def estimate_memory(
    channel_mask: torch.Tensor,
    pruned_layers: list[int],
    sink: int,
    recent: int,
    context_length: int,
    batch_size: int = 1,
    bytes_per_value: int = 2,
    quantization: KVQuantization = DEFAULT_KV_QUANTIZATION,
    block_size: int = DEFAULT_WINDOWS.block_size,
) -> MemoryReport:
    """Bytes a LeanK cache holds for `context_length` tokens per row, from the masks alone (no reserved capacity).

    Args:
        channel_mask: `[layers, kv_heads, head_dim]` keep-mask.
        pruned_layers: layers LeanK prunes; the others hold what a `DynamicCache` holds.
        sink, recent: full-width tokens at the start and end of each row.
        context_length: tokens per row.
        batch_size: rows.
        bytes_per_value: 2 for bf16/fp16, 4 for fp32.
        quantization: how the middle tokens are stored (with `kv_bits`: codes, scales and zeros; see
            `KVQuantization.middle_bytes`).
        block_size: tokens per key-scale block when quantized (the window's flush).
    """
    _, heads, head_dim = channel_mask.shape
    full = min(context_length, sink + recent)
    middle = context_length - full
    per_token = batch_size * bytes_per_value
    layers = []
    for index, layer_mask in enumerate(channel_mask):
        dense = 2 * per_token * context_length * heads * head_dim
        if index not in pruned_layers:
            layers.append(LayerMemory(index, "unpruned", dense // 2, dense // 2, 0, 0, dense))
            continue
        kept = int(layer_mask.sum())
        value_channels = int(layer_mask.any(-1).sum()) * head_dim
        middle_keys = quantization.middle_bytes(kept, 0, head_dim, block_size, bytes_per_value)
        middle_values = quantization.middle_bytes(0, value_channels, head_dim, block_size, bytes_per_value)
        key_bytes = round(per_token * full * heads * head_dim + batch_size * middle * middle_keys)
        value_bytes = round(per_token * full * heads * head_dim + batch_size * middle * middle_values)
        layers.append(LayerMemory(index, "leank", key_bytes, value_bytes, 0, 0, dense))
    return MemoryReport(tuple(layers))
