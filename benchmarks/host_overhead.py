"""Host time of one decode layer step: a LeanK layer against a DynamicLayer with SDPA, and the parts of the LeanK step.

Eager `generate` launches every kernel of every layer from Python, and on the lent H100 machine a decode step of the
Llama-3.1-8B config is host-bound at every batch and context that fits (BENCHMARKS.md, section 2): tokens per second
follow host time per layer, not GPU time. This measures that host time per layer step, one layer of the
Llama-3.1-8B geometry (32 query heads, 8 KV heads, head_dim 128; the paper's mask of layer `--layer`), as the mean of
`--steps` back-to-back steps (the GPU work of a step is shorter than its host work at these sizes), the minimum over
`--rounds` rounds. Layers are refilled every round so the context stays near `--context`.

    python benchmarks/host_overhead.py [--context 4096] [--batch 1]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from decode_attention import HEAD_DIM, KV_HEADS, Q_HEADS
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from leank_hf import LeanKMasks
from leank_hf.cache.attention import leank_attention_forward
from leank_hf.cache.layer import LeanKLayer
from leank_hf.kernels import NewTokens
from leank_hf.kernels.decode import leank_decode_triton


class AttentionModule(torch.nn.Module):
    """What transformers' attention functions read from the attention module."""

    is_causal = True
    num_key_value_groups = Q_HEADS // KV_HEADS
    layer_idx = 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layer", type=int, default=15, help="whose mask of the paper's Llama-3.1-8B masks")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    masks = LeanKMasks.from_pretrained("llama-3.1-8b-instruct")
    module = AttentionModule()
    scaling = HEAD_DIM**-0.5

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype)

    batch, context = args.batch, args.context
    query, key, value = (randn(batch, heads, 1, HEAD_DIM) for heads in (Q_HEADS, KV_HEADS, KV_HEADS))

    def filled_leank_layer() -> LeanKLayer:
        layer = LeanKLayer(masks.channel_mask[args.layer], masks.sink, masks.recent, masks.block_size)
        keys, values = layer.update(*(randn(batch, KV_HEADS, context, HEAD_DIM) for _ in range(2)))
        leank_attention_forward(module, randn(batch, Q_HEADS, context, HEAD_DIM), keys, values, None, scaling=scaling)
        return layer

    def filled_dense_layer() -> DynamicLayer:
        layer = DynamicLayer()
        layer.update(*(randn(batch, KV_HEADS, context, HEAD_DIM) for _ in range(2)))
        return layer

    def leank_step(layer: LeanKLayer) -> None:
        keys, values = layer.update(key, value)
        leank_attention_forward(module, query, keys, values, None, scaling=scaling)

    def dense_step(layer: DynamicLayer) -> None:
        keys, values = layer.update(key, value)
        sdpa_attention_forward(module, query, keys, values, None, scaling=scaling)

    def attention_only(layer: LeanKLayer, version: bool) -> None:
        # The window's last stored token stands in for this step's, so the window never flushes.
        new = NewTokens(key, value, None)
        layer.attention(query, layer.view(), scaling, new, layer.store.version if version else None)

    setups: list[tuple[str, Callable, Callable, SDPBackend]] = [
        ("LeanK layer step (update + attention)", filled_leank_layer, leank_step, SDPBackend.FLASH_ATTENTION),
        ("DynamicLayer + SDPA, flash", filled_dense_layer, dense_step, SDPBackend.FLASH_ATTENTION),
    ]
    if device == "cuda":
        setups += [
            ("DynamicLayer + SDPA, cuDNN", filled_dense_layer, dense_step, SDPBackend.CUDNN_ATTENTION),
            ("  LeanK part: view", filled_leank_layer, LeanKLayer.view, SDPBackend.FLASH_ATTENTION),
            ("  LeanK part: view + attention writing the new token (kept decoder, stores' version given)",
             filled_leank_layer, lambda layer: attention_only(layer, True), SDPBackend.FLASH_ATTENTION),
            ("  LeanK part: the same, stores' strides read every call", filled_leank_layer,
             lambda layer: attention_only(layer, False), SDPBackend.FLASH_ATTENTION),
            ("  for comparison: leank_decode_triton (set up every call)", filled_leank_layer,
             lambda layer: leank_decode_triton(query, layer.view(), scaling), SDPBackend.FLASH_ATTENTION),
        ]  # fmt: skip

    def synchronize() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    results = {}
    for name, make_layer, step, backend in setups:
        best = float("inf")
        with sdpa_kernel(backend) if device == "cuda" else torch.no_grad():
            for _ in range(args.rounds):
                layer = make_layer()
                for _ in range(20):  # warm-up: compilation and the first flushes
                    step(layer)
                synchronize()
                start = time.perf_counter()
                for _ in range(args.steps):
                    step(layer)
                synchronize()
                best = min(best, (time.perf_counter() - start) / args.steps * 1e6)
        results[name] = best
        print(f"{name}: {best:.1f} us", flush=True)

    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"\n{name}; torch {torch.__version__}; batch {batch}, context {context}, layer {args.layer}'s mask; "
          f"host+GPU time per step, mean of {args.steps} steps, min of {args.rounds} rounds\n")  # fmt: skip
    dense = results["DynamicLayer + SDPA, flash"]
    print("| step | us per step | vs DynamicLayer + SDPA flash |")
    print("|---|---|---|")
    for name, micros in results.items():
        print(f"| {name.strip()} | {micros:.1f} | {micros / dense:.2f}x |")


if __name__ == "__main__":
    main()
