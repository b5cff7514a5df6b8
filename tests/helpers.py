"""Helpers shared by several test files: masks, a driven cache layer, generate inputs and comparisons, a stand-in
for `HfApi`, and calibration scores computed independently of the library."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from huggingface_hub import RepoUrl
from transformers import DynamicCache
from transformers.masking_utils import sdpa_mask
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from leank_hf import LeanKCache, LeanKMasks, ModelSpec
from leank_hf.cache.attention import leank_attention_forward
from leank_hf.cache.layer import LeanKLayer
from leank_hf.compat import cache_kwargs
from leank_hf.kernels import ChannelLayout, PrunedKV, leank_attention_reference

from .dense_reference import dense_leank_attention, window_sizes

# ../shared/reference_masks beside the checkout, or wherever LEANK_REFERENCE_MASKS points (e.g. on a GPU machine).
REFERENCE_MASKS = Path(
    os.environ.get("LEANK_REFERENCE_MASKS", Path(__file__).resolve().parents[2] / "shared" / "reference_masks")
)


KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton's interpreter emulates bf16 through numpy, which has none: on the CPU its bf16 results are garbage (seen
# with Triton 3.9: errors ~1e9 where fp16 is within 5e-4), so bf16 is checked only with the compiled kernel.
KERNEL_DTYPES = [torch.float16] + ([torch.bfloat16] if KERNEL_DEVICE == "cuda" else [])


def aligned_mask(layers=2, heads=3, head_dim=32, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(layers, heads, head_dim, dtype=torch.bool)
    for layer in range(layers):
        for head in range(heads):
            count = 16 * int(torch.randint(0, 3, (1,), generator=generator))
            mask[layer, head, torch.randperm(head_dim, generator=generator)[:count]] = True
    return mask


class FakeAttention(torch.nn.Module):
    """What transformers' SDPA function reads from an attention module."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def random_mask(heads: int, head_dim: int, align: int, generator: torch.Generator, prune_head: int | None = 0):
    """Random keep-mask with aligned per-head counts (0 to head_dim) and optionally one fully pruned head."""
    mask = torch.zeros(heads, head_dim, dtype=torch.bool)
    for h in range(heads):
        units = int(torch.randint(0, head_dim // align + 1, (1,), generator=generator))
        if h == prune_head:
            units = 0
        elif units == 0:
            units = 1
        mask[h, torch.randperm(head_dim, generator=generator)[: units * align]] = True
    return mask


def drive_layer(
    layer: LeanKLayer,
    step_lengths: list[int],
    left_pad: list[int],
    num_q_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    skip_causal_mask: bool = True,
):
    """Feed random steps through `layer` via the attention function; yield (step, output, expected, query_valid).

    Masks are what transformers builds for SDPA: None where causality alone describes the step and nothing is padded
    (`skip_causal_mask`, as in `generate`), else a boolean mask."""
    batch, heads = len(left_pad), layer.channel_mask.shape[0]
    total = sum(step_lengths)
    keys = torch.randn(batch, heads, total, head_dim, generator=generator).to(device, dtype)
    values = torch.randn(batch, heads, total, head_dim, generator=generator).to(device, dtype)
    queries = torch.randn(batch, num_q_heads, total, head_dim, generator=generator).to(device, dtype)
    valid = torch.ones(batch, total, dtype=torch.bool, device=device)
    for row, pad in enumerate(left_pad):
        valid[row, :pad] = False
    module = FakeAttention(num_q_heads // heads)
    scaling = head_dim**-0.5
    start = 0
    windows = window_sizes(step_lengths, layer.recent, layer.block_size)
    for index, (n, window) in enumerate(zip(step_lengths, windows, strict=True)):
        end = start + n
        step, _ = layer.update(keys[:, :, start:end], values[:, :, start:end], 0)
        mask = sdpa_mask(
            batch_size=batch, q_length=n, kv_length=end, q_offset=start, attention_mask=valid[:, :end],
            allow_is_causal_skip=skip_causal_mask, device=device,
        )  # fmt: skip
        output, weights = leank_attention_forward(module, queries[:, :, start:end], step, step, mask, scaling=scaling)
        assert weights is None
        expected = dense_leank_attention(
            queries[:, :, start:end], keys[:, :, :end], values[:, :, :end], valid[:, :end], start, window,
            layer.channel_mask.to(device), layer.sink, scaling,
        )  # fmt: skip
        yield index, output.transpose(1, 2), expected, valid[:, start:end]
        start = end


def tensors_held(layer) -> dict[str, list[torch.Tensor]]:
    """Every tensor `layer` holds for its tokens, by kind ("keys", "values", "other"), found by walking its attributes
    and those of every object of `leank_hf.cache.stores` it reaches (not the list `memory` counts): the mask and its
    layout, fixed per layer, are left out."""
    held = {"keys": [], "values": [], "other": []}

    def walk(owner) -> None:
        for name, value in vars(owner).items():
            if isinstance(value, torch.Tensor) and name != "channel_mask":
                # A quantized middle's scales and zeros count with what they scale (key_scales, value_zeros, ...).
                kind = next((k for k in ("keys", "values") if name.endswith(k) or name.startswith(k[:-1] + "_")),
                            "other")  # fmt: skip
                held[kind].append(value)
            elif type(value).__module__.startswith("leank_hf.cache.stores."):
                walk(value)

    walk(layer)
    return held


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors`."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


# Small windows so that a few dozen tokens cross many flush boundaries.
WINDOWS = {"sink": 4, "recent": 8, "block_size": 4}


def keep_all(model, **windows) -> LeanKMasks:
    spec = ModelSpec.from_config(model.config)
    mask = torch.ones(spec.num_layers, spec.num_kv_heads, spec.head_dim, dtype=torch.bool)
    return LeanKMasks(mask, layer_types=spec.layer_types, **{**WINDOWS, **windows})


def pruned(model, seed: int = 0) -> LeanKMasks:
    spec = ModelSpec.from_config(model.config)
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(spec.num_layers, spec.num_kv_heads, spec.head_dim, dtype=torch.bool)
    for layer in spec.leank_layers:
        mask[layer] = random_mask(spec.num_kv_heads, spec.head_dim, 16, generator)
    return LeanKMasks(mask, layer_types=spec.layer_types, **WINDOWS)


def left_padded_batch(lengths: list[int], vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    attention_mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        input_ids[row, width - n :] = torch.randint(3, vocab, (n,), generator=generator)
        attention_mask[row, width - n :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def answer_batch(vocab: int, prompt_lengths: list[int], answer: int, pad_left: bool, seed: int = 0) -> dict:
    """Padded rows of random prompts followed by `answer` labelled tokens (labels -100 elsewhere)."""
    generator = torch.Generator().manual_seed(seed)
    total = max(prompt_lengths) + answer
    ids = torch.zeros(len(prompt_lengths), total, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, length in enumerate(prompt_lengths):
        tokens = torch.randint(3, vocab, (length + answer,), generator=generator)
        span = slice(total - length - answer, total) if pad_left else slice(0, length + answer)
        ids[row, span], mask[row, span] = tokens, 1
        labels[row, span.start + length : span.start + length + answer] = tokens[length:]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def generate_both(model, masks, inputs, **kwargs):
    """(DynamicCache output, LeanKCache output, the LeanK cache) of the same generate call."""
    common = {"max_new_tokens": 24, "do_sample": False, "pad_token_id": 0, **kwargs}
    dense = model.generate(**inputs, **cache_kwargs(DynamicCache(config=model.config)), **common)
    cache = LeanKCache(masks, model)
    leank = model.generate(**inputs, **cache_kwargs(cache), **common)
    return dense, leank, cache


def assert_pruned_path_ran(cache: LeanKCache) -> None:
    leank_layers = [layer for layer in cache.layers if isinstance(layer, LeanKLayer)]
    assert leank_layers, "no LeanK layer"
    assert all(layer.view().middle_len > 0 for layer in leank_layers), "no token reached the middle store"


class RecordingApi:
    """Stands in for `HfApi`, recording each call, the tokens it was made with, and what the uploaded folder held.

    `install(monkeypatch)` puts it in place of every `HfApi` a push makes: ModelHubMixin's and the one that creates
    branches."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.uploaded: dict[str, bytes] = {}
        self.tokens: list[str | None] = []

    def install(self, monkeypatch) -> RecordingApi:
        def make(token=None):
            self.tokens.append(token)
            return self

        monkeypatch.setattr("huggingface_hub.hub_mixin.HfApi", make)
        monkeypatch.setattr("leank_hf.masks.repo_mixin.HfApi", make)
        return self

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", {k: v for k, v in kwargs.items() if k != "folder_path"}))
        self.uploaded = {p.name: p.read_bytes() for p in Path(kwargs["folder_path"]).iterdir()}

        class Commit:
            commit_url = f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"
            pr_url = None

        return Commit()


def independent_scores(model, input_ids, attention_mask) -> torch.Tensor:
    """Post-RoPE |q| (group-averaged) and |k| means over real tokens, recomputed from each layer's projections."""
    captured = {}

    def capture(module, args, kwargs):
        captured[module.layer_idx] = (kwargs["hidden_states"], kwargs["position_embeddings"])

    handles = [layer.self_attn.register_forward_pre_hook(capture, with_kwargs=True) for layer in model.model.layers]
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask)
    for handle in handles:
        handle.remove()
    config = model.config
    scores = []
    real = attention_mask.bool()
    for index, layer in enumerate(model.model.layers):
        hidden, (cos, sin) = captured[index]
        attn = layer.self_attn
        batch, tokens, _ = hidden.shape
        q = attn.q_proj(hidden).view(batch, tokens, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(hidden).view(batch, tokens, -1, attn.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        group = config.num_attention_heads // config.num_key_value_heads
        abs_q = q.abs().reshape(batch, config.num_key_value_heads, group, tokens, -1).mean(2)
        mean_q = abs_q.permute(0, 2, 1, 3)[real].mean(0)  # [H, D]
        mean_k = k.abs().permute(0, 2, 1, 3)[real].mean(0)
        scores.append(mean_q * mean_k)
    return torch.stack(scores)


def random_cache(
    batch: int, heads: int, head_dim: int, align: int, sink: int, middle: int, window: int, dtype: torch.dtype,
    seed: int, prune_head: int | None = 0,
) -> PrunedKV:  # fmt: skip
    """A pruned cache with ragged sink lengths, ragged starts of the real middle tokens (left padding), holes in
    the window, and one fully pruned head."""
    gen = torch.Generator().manual_seed(seed)
    mask = random_mask(heads, head_dim, align, gen, prune_head=prune_head)
    layout = ChannelLayout.from_mask(mask, KERNEL_DEVICE)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(KERNEL_DEVICE, dtype)

    sink_lengths = torch.randint(0, sink + 1, (batch,), generator=gen)
    if sink:
        sink_lengths[0] = sink
    middle_start = torch.randint(0, middle // 2 + 1, (batch,), generator=gen)
    middle_start[0] = 0
    middle_valid = torch.arange(middle) >= middle_start[:, None]
    window_valid = torch.rand(batch, window, generator=gen) > 0.2
    window_valid[:, -1] = True  # this step's own token
    return PrunedKV(
        sink_keys=rand(batch, heads, sink, head_dim),
        sink_values=rand(batch, heads, sink, head_dim),
        sink_lengths=sink_lengths.to(KERNEL_DEVICE),
        middle_keys=rand(*layout.middle_key_shape(batch, middle)),
        middle_values=rand(batch, len(layout.value_heads), middle, head_dim),
        middle_valid=middle_valid.to(KERNEL_DEVICE),
        middle_start=middle_start.to(KERNEL_DEVICE),
        recent_keys=rand(batch, heads, window, head_dim),
        recent_values=rand(batch, heads, window, head_dim),
        recent_valid=window_valid.to(KERNEL_DEVICE),
        layout=layout,
    )


def reference(query: torch.Tensor, cache: PrunedKV, scaling: float) -> torch.Tensor:
    """The PyTorch reference on fp32 copies of the inputs."""
    upcast = cache._replace(
        **{f: getattr(cache, f).float() for f in PrunedKV._fields if is_float_tensor(getattr(cache, f))}
    )
    return leank_attention_reference(query.float(), upcast, scaling)


def is_float_tensor(value) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()
