"""Which quantization of the middle stores to ship: attention error of KIVI's recipe (keys per channel over flush
blocks, values per token) against keys per token, at 8 and 4 bits (issue 24).

Two key sets, each attended by the PyTorch reference with the middle dequantized, against the same cache unquantized
(relative L2 error of the attention output, all heads and queries together):

- synthetic: N(0, 1) keys with a few channels of large pre-RoPE offset, then RoPE (so the outliers are nearly
  constant in low-frequency channel pairs and swing between +-offset in high-frequency ones, as post-RoPE keys do),
  every channel kept;
- SmolLM2: the embedded SmolLM2-135M-Instruct's post-RoPE queries and keys and its values on the shipped book's
  held-out chapters, every layer, with the shipped `smollm2-135m-instruct` masks and windows.

The last `--queries` tokens attend as one step: over the middle alone (sink and window emptied, so nothing dilutes
the middle's error) and over the whole cache (the first `sink` tokens and the window at full width, as LeanK holds
them). Bytes are per middle token, codes plus fp16 scales and zeros, against 2 in bf16.

    python benchmarks/quantization_error.py --tokens 2048
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from leank_hf.kernels import ChannelLayout, PrunedKV, leank_attention_reference, quantization
from leank_hf.kernels.quantization import dequantize_keys, dequantize_values, quantize_keys, quantize_values

BLOCK_SIZE = 64  # the cache's flush block (LeanK's default): one key grid per channel per flush


@dataclass(frozen=True)
class Scheme:
    """A way to quantize a cache's middle.

    Attributes:
        keys: "channel" (per channel over blocks of `key_group` tokens, 0: `BLOCK_SIZE`), "token" (per token in groups
            of `key_group` kept channels, 0: a group per chunk of the store, 16 to 64 channels of one head), or None
            (kept as is).
        value_group: values per token in groups of this many channels; None: kept as is.
        metadata: dtype of scales and zeros.
    """

    keys: str | None
    key_group: int = 0
    value_group: int | None = 32
    metadata: torch.dtype = torch.float16

    @property
    def name(self) -> str:
        keys = {"channel": f"keys per channel (block {self.key_group or BLOCK_SIZE})", None: "keys unquantized"}.get(
            self.keys, f"keys per token ({f'group {self.key_group}' if self.key_group else 'a group per chunk'})"
        )
        values = f"values per token (group {self.value_group})" if self.value_group else "values unquantized"
        dtype = "" if self.metadata == torch.float16 else f", {str(self.metadata).removeprefix('torch.')} scales"
        return f"{keys}, {values}{dtype}"

    def apply(self, cache: PrunedKV, bits: int) -> PrunedKV:
        """`cache` with its middle quantized and dequantized again (fp32)."""
        valid = cache.middle_valid[:, None, :]
        keys, values = cache.middle_keys, cache.middle_values
        # The module has one metadata dtype; it is swapped here to measure another.
        previous, quantization.METADATA_DTYPE = quantization.METADATA_DTYPE, self.metadata
        try:
            if self.keys == "channel":
                keys = dequantize_keys(quantize_keys(keys, bits, self.key_group or BLOCK_SIZE, valid))
            elif self.keys == "token":
                keys = dequantize_values(quantize_values(keys, bits, self.key_group or cache.layout.chunk, valid))
            if self.value_group:
                values = dequantize_values(quantize_values(values, bits, self.value_group, valid))
        finally:
            quantization.METADATA_DTYPE = previous
        return cache._replace(middle_keys=keys, middle_values=values)

    def bytes(self, bits: int) -> tuple[str, str]:
        """Bytes per middle token per kept key channel and per value channel (codes, scales and zeros)."""
        code, meta = bits / 8, 2 * self.metadata.itemsize
        if self.keys is None:
            keys = "2"
        elif self.keys == "channel" or self.key_group:
            keys = f"{code + meta / (self.key_group or BLOCK_SIZE):.4g}"
        else:
            keys = f"{code + meta / 64:.4g} to {code + meta / 16:.4g}"
        return keys, f"{code + meta / self.value_group:.4g}" if self.value_group else "2"


SCHEMES = [
    Scheme("channel"),  # KIVI
    Scheme("channel", value_group=64),
    Scheme("channel", key_group=32),  # two key grids per flush block
    Scheme("channel", key_group=16),
    Scheme("channel", metadata=torch.bfloat16),
    Scheme("token", key_group=16),
    Scheme("token"),
    Scheme("channel", value_group=None),
    Scheme(None),
]


class Layer:
    """One layer's queries `[1, Hq, Q, D]` (the last Q tokens'), keys and values `[1, H, T, D]` and keep-mask."""

    def __init__(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> None:
        self.query, self.keys, self.values, self.mask = query.float(), keys.float(), values.float(), mask.bool()

    def cache(self, sink: int, window: int, middle_only: bool) -> PrunedKV:
        """The layer's pruned cache: `sink` first tokens, `window` last (this step's queries' tokens among them),
        the middle between; sink and window flagged empty when `middle_only`."""
        layout = ChannelLayout.from_mask(self.mask)
        keys, values = self.keys, self.values
        batch, tokens = keys.shape[0], keys.shape[2]
        middle = slice(sink, tokens - window)
        lengths = torch.full((batch,), 0 if middle_only else sink)
        return PrunedKV(
            keys[:, :, :sink], values[:, :, :sink], lengths,
            layout.pruned_keys(keys[:, :, middle]), values[:, layout.value_heads, middle],
            torch.ones(batch, tokens - sink - window, dtype=torch.bool), torch.zeros(batch, dtype=torch.long),
            keys[:, :, -window:], values[:, :, -window:],
            torch.full((batch, window), not middle_only), layout,
        )  # fmt: skip


def relative_errors(layers: list[Layer], sink: int, window: int, middle_only: bool, bits: int) -> dict[str, float]:
    """Per scheme, ||out - exact|| / ||exact|| over every layer's attention outputs."""
    squared = dict.fromkeys((scheme.name for scheme in SCHEMES), 0.0)
    norm = 0.0
    for layer in layers:
        cache = layer.cache(sink, window, middle_only)
        scaling = layer.keys.shape[-1] ** -0.5
        exact = leank_attention_reference(layer.query, cache, scaling)
        norm += float(exact.norm()) ** 2
        for scheme in SCHEMES:
            error = leank_attention_reference(layer.query, scheme.apply(cache, bits), scaling) - exact
            squared[scheme.name] += float(error.norm()) ** 2
    return {name: math.sqrt(value / norm) for name, value in squared.items()}


def synthetic_layers(tokens: int, queries: int, count: int, outliers: int = 4, seed: int = 0) -> list[Layer]:
    """`count` layers of 3 KV heads (9 query heads), head_dim 64, every channel kept: N(0, 1) queries and keys, the
    keys with `outliers` channels per head offset by 10 before RoPE (base 10000), values N(0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    heads, q_heads, head_dim = 3, 9, 64
    half = head_dim // 2
    angle = torch.arange(tokens)[:, None] * 10000 ** (-torch.arange(half) / half)  # [T, D / 2]
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)

    def rope(x: torch.Tensor) -> torch.Tensor:  # transformers' rotate_half layout
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    layers = []
    for _ in range(count):
        keys = torch.randn(1, heads, tokens, head_dim, generator=generator)
        for head in range(heads):
            keys[0, head, :, torch.randperm(head_dim, generator=generator)[:outliers]] += 10.0
        query = rope(torch.randn(1, q_heads, tokens, head_dim, generator=generator))[:, :, -queries:]
        values = torch.randn(1, heads, tokens, head_dim, generator=generator)
        layers.append(Layer(query, rope(keys), values, torch.ones(heads, head_dim, dtype=torch.bool)))
    return layers


def smollm2_layers(tokens: int, queries: int) -> tuple[list[Layer], int, int, float]:
    """The embedded SmolLM2's layers on `tokens` tokens of held-out prose, its shipped masks' sink and window, and
    the largest |key| or |value| seen (fp16 scales saturate beyond 65504)."""
    from leank_hf import LeanKMasks
    from leank_hf.cache.attention import observing
    from leank_hf.embedded import load_embedded_model
    from leank_hf.eval.prose import prose_text

    model, tokenizer = load_embedded_model()
    masks = LeanKMasks.from_pretrained("smollm2-135m-instruct")
    ids = tokenizer(prose_text("heldout"), return_tensors="pt").input_ids[:, :tokens]
    if ids.shape[1] < tokens:
        raise SystemExit(f"the held-out text has only {ids.shape[1]} tokens; ask for fewer")
    attended: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    values: dict[int, torch.Tensor] = {}

    class Observer:
        def add(self, layer: int, query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor | None) -> None:
            attended[layer] = (query[:, :, -queries:].detach(), key.detach())

    def keep_values(index: int, attention: torch.nn.Module) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            values[index] = output.detach().unflatten(-1, (-1, attention.head_dim)).transpose(1, 2)

        return hook

    handles = [layer.self_attn.v_proj.register_forward_hook(keep_values(i, layer.self_attn))
               for i, layer in enumerate(model.model.layers)]  # fmt: skip
    try:
        with torch.no_grad(), observing(model, Observer()):
            model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    dense = masks.to_dense()
    layers = [Layer(*attended[i], values[i], dense[i]) for i in sorted(attended)]
    largest = max(float(t.abs().max()) for layer in layers for t in (layer.keys, layer.values))
    return layers, masks.sink, masks.recent, largest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--queries", type=int, default=64, help="the last tokens whose queries attend")
    parser.add_argument("--synthetic-layers", type=int, default=8)
    args = parser.parse_args()

    synthetic = synthetic_layers(args.tokens, args.queries, args.synthetic_layers)
    smollm2, sink, recent, largest = smollm2_layers(args.tokens, args.queries)
    window = recent + args.queries  # the window as a step attends: `recent` earlier tokens and the step's own
    columns = {
        "synthetic, middle only": (synthetic, 0, window, True),
        "SmolLM2, middle only": (smollm2, sink, window, True),
        f"SmolLM2, sink {sink} + middle + window {recent}": (smollm2, sink, window, False),
    }
    print(f"{args.tokens} tokens, the last {args.queries} attending; SmolLM2's largest |key| or |value|: "
          f"{largest:.1f}\n")  # fmt: skip
    print("| scheme | bits | B/token per kept key channel | B/token per value channel | " + " | ".join(columns) + " |")
    print("|---|---|---|---|" + "---|" * len(columns))
    for bits in (8, 4):
        errors = {name: relative_errors(*column[:3], column[3], bits) for name, column in columns.items()}
        for scheme in SCHEMES:
            key_bytes, value_bytes = scheme.bytes(bits)
            cells = " | ".join(f"{errors[name][scheme.name]:.4f}" for name in columns)
            print(f"| {scheme.name} | {bits} | {key_bytes} | {value_bytes} | {cells} |")


if __name__ == "__main__":
    main()
