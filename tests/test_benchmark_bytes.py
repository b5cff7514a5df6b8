"""The bytes `benchmarks/decode_attention.py` says a layer's cache holds (its byte floor and bandwidth columns divide by
them), counted here from the layout by hand: the sink and window at full width, the kept middle keys, the middle values
of heads that keep a channel, the flags, and for a quantized middle its codes with one fp16 scale and zero per key
channel and block of 64 tokens and per value token and group of 64 channels."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")  # the script imports it at the top

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "decode_attention.py"


@pytest.fixture(scope="module")
def decode_attention():
    spec = importlib.util.spec_from_file_location("decode_attention", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_cache_bytes(decode_attention, bits):
    heads, head_dim = decode_attention.KV_HEADS, decode_attention.HEAD_DIM
    counts = [32, 0, 64, 16, 0, head_dim, 48, 16][:heads]  # two heads fully pruned, a chunk of 16 channels
    mask = torch.arange(head_dim) < torch.tensor(counts)[:, None]
    batch, context, sink, recent = 2, 300, 8, 20
    window, middle = recent + 1, context - sink - recent - 1  # 271 middle tokens: the last key block is partial
    kept, value_rows = sum(counts), sum(count > 0 for count in counts)

    cache, nbytes = decode_attention.leank_cache(
        mask, batch, context, sink, recent, bits, device="cpu", dtype=torch.float16
    )

    full_width = 2 * batch * heads * (sink + window) * head_dim * 2  # keys and values, fp16
    flags = batch * (8 + middle + 8 + window)  # int64 sink lengths, middle flags, int64 middle start, window flags
    if bits is None:
        middle_bytes = batch * middle * (kept + value_rows * head_dim) * 2
    else:
        codes = batch * middle * (kept + value_rows * head_dim) * bits // 8
        key_grids = 2 * batch * kept * math.ceil(middle / decode_attention.KEY_BLOCK) * 2  # scales and zeros, fp16
        value_grids = 2 * batch * value_rows * middle * (head_dim // decode_attention.VALUE_GROUP) * 2
        middle_bytes = codes + key_grids + value_grids
    assert nbytes == decode_attention.cache_bytes(cache) == full_width + flags + middle_bytes
