"""LeanK attention over a pruned cache in plain PyTorch: the CPU path and the source of truth for the kernels."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .layout import PrunedKV, QuantizedPrunedKV
from .quantization import dequantize_keys, dequantize_values


def leank_attention_reference(query: torch.Tensor, cache: PrunedKV | QuantizedPrunedKV, scaling: float) -> torch.Tensor:
    """Attention of this step's `Q` queries over a pruned cache whose window ends with this step's `Q` tokens.

    Keys are the union of: the sink and window tokens at full width (the last `Q` window tokens are this step's own
    and are seen causally: query `i` sees them up to itself), and the middle tokens on their kept channels only
    (heads that keep no channel skip their middle tokens: no weight at all, not a score of 0). Invalid slots get no
    weight; a query with no valid key returns zeros. Scores follow eager attention's precision: products in the
    input dtype, softmax in fp32.

    A quantized middle (`QuantizedPrunedKV`) is read in tiles of `_DEQUANTIZED_TOKENS` middle slots, each dequantized
    to fp32 and dropped after use (no dequantized copy of the whole middle, as the decode kernel dequantizes in
    registers); its products are in fp32 whatever the query dtype: this is the quantized kernel's oracle.

    Args:
        query: `[B, Hq, Q, D]`; the `Hq / H` query heads of a KV head are consecutive (GQA).
        cache: the stored tokens plus this step's, see `PrunedKV` (or `QuantizedPrunedKV`).
        scaling: multiplier of q·k (1/sqrt(D) for most models).

    Returns:
        `[B, Hq, Q, D]` attention output in the query dtype.
    """
    # Multi-token steps (chunked prefill) attend in blocks of queries, so the fp32 scores stay under
    # _SCORE_ELEMENTS instead of growing with Q x context.
    batch, num_q_heads, q_len, _ = query.shape
    stored = cache.cache if isinstance(cache, QuantizedPrunedKV) else cache
    keys = stored.sink_keys.shape[2] + stored.middle_len + stored.recent_keys.shape[2]
    block = max(1, _SCORE_ELEMENTS // max(1, batch * num_q_heads * keys))
    outputs = [
        _attend_block(query[:, :, start : start + block], start, q_len, cache, scaling)
        for start in range(0, q_len, block)
    ]
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)


# 2^26 fp32 scores = 256 MiB per block of queries.
_SCORE_ELEMENTS = 1 << 26
# Middle slots dequantized at a time (rounded up to whole key blocks): a tile of 8K slots of a Llama-3.1-8B layer's
# middle (317 kept channels, 7 value heads) is ~37 MiB of fp32.
_DEQUANTIZED_TOKENS = 8192


def _middle_tiles(cache: PrunedKV | QuantizedPrunedKV, part: str) -> Iterator[tuple[int, torch.Tensor]]:
    """(first slot, tensor) of consecutive runs of the middle's `part` ("keys" or "values"): the stored tensor
    itself, or a quantized middle's tiles dequantized to fp32 one at a time."""
    stored = getattr(cache, f"middle_{part}")
    if not isinstance(cache, QuantizedPrunedKV):
        yield 0, stored
        return
    dequantize = dequantize_keys if part == "keys" else dequantize_values
    tile = -(-_DEQUANTIZED_TOKENS // cache.block_size) * cache.block_size
    for start in range(0, max(cache.cache.middle_len, 1), tile):  # (an empty middle: one empty tile)
        yield start, dequantize(stored.tokens(start, min(start + tile, cache.cache.middle_len)))


def _attend_block(
    query: torch.Tensor, first: int, q_len: int, stored: PrunedKV | QuantizedPrunedKV, scaling: float
) -> torch.Tensor:
    """`leank_attention_reference` for the step's queries `[first, first + query.shape[2])` out of `q_len`."""
    cache = stored.cache if isinstance(stored, QuantizedPrunedKV) else stored
    batch, num_q_heads, block, head_dim = query.shape
    num_heads = cache.recent_keys.shape[1]
    group = num_q_heads // num_heads
    layout = cache.layout
    # Queries of one KV head as rows g * block + i, so every K/V segment is read once per KV head.
    q = query.reshape(batch, num_heads, group * block, head_dim)
    device = query.device

    sink_slots, window = cache.sink_keys.shape[2], cache.recent_keys.shape[2]
    sink_valid = torch.arange(sink_slots, device=device) < cache.sink_lengths.to(device).unsqueeze(1)
    query_pos = first + torch.arange(group * block, device=device) % block  # [GQ], index within the step
    causal = torch.arange(window, device=device) <= (window - q_len + query_pos).unsqueeze(1)  # [GQ, W]
    window_ok = causal & cache.recent_valid[:, None, :]  # [B, GQ, W]

    sink_scores = _masked(q @ cache.sink_keys.transpose(-1, -2), sink_valid[:, None, None, :])
    window_scores = _masked(q @ cache.recent_keys.transpose(-1, -2), window_ok[:, None])
    middle_len = cache.middle_len
    # Each chunk of kept channels scores against its own head's queries only (no products with zeros), then the
    # chunks of a head add up. Heads that keep nothing get -inf: their middle tokens get no weight at all.
    q_by_channel = q.transpose(1, 2).reshape(batch, group * block, num_heads * head_dim)
    q_chunks = q_by_channel.index_select(-1, layout.packed_index).view(batch, group * block, -1, layout.chunk)
    q_chunks = q_chunks.transpose(1, 2)  # [B, chunks, GQ, chunk]
    middle_scores = query.new_zeros(batch, num_heads, group * block, middle_len, dtype=torch.float32)
    for start, keys in _middle_tiles(stored, "keys"):
        # (A dequantized middle is fp32: its products are too.)
        chunk_scores = q_chunks.to(keys.dtype) @ keys.transpose(-1, -2)  # [B, chunks, GQ, tile]
        middle_scores[..., start : start + keys.shape[2]].index_add_(1, layout.chunk_heads, chunk_scores.float())
    pruned_heads = layout.offsets_table.diff() == 0
    middle_scores = middle_scores.masked_fill(pruned_heads[:, None, None], -torch.inf)
    middle_scores = _masked(middle_scores, cache.middle_valid[:, None, None, :])

    scores = torch.cat([sink_scores, middle_scores, window_scores], dim=-1) * scaling
    # A query row with no valid key (e.g. padding queries) would give NaN from softmax: give it zero weights.
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(scores.amax(-1, keepdim=True) > -torch.inf, probs, 0.0)
    p_sink, p_mid, p_window = probs.split([sink_slots, middle_len, window], dim=-1)

    dtype = cache.recent_values.dtype
    out = p_sink.to(dtype) @ cache.sink_values + p_window.to(dtype) @ cache.recent_values
    if len(layout.value_heads):
        p_mid = p_mid.index_select(1, layout.value_heads)
        tiles = ((p_mid[..., start : start + values.shape[2]].to(values.dtype) @ values).float()
                 for start, values in _middle_tiles(stored, "values"))  # fmt: skip
        out.index_add_(1, layout.value_heads, sum(tiles).to(dtype))
    return out.reshape(batch, num_q_heads, block, head_dim).to(query.dtype)


def _masked(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """fp32 scores with invalid slots at -inf."""
    return scores.float().masked_fill(~valid, -torch.inf)
