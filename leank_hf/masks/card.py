"""Model cards and mask heatmaps for mask repos."""

from __future__ import annotations

import io
import json
import os
from importlib import resources
from string import Template
from typing import TYPE_CHECKING

from huggingface_hub import ModelCardData

from ..memory import estimate_memory
from .hub import as_hub_id
from .io import atomic_write_bytes

if TYPE_CHECKING:
    from .leank_masks import LeanKMasks

# Context length at which the card quotes memory savings: long enough that sink + recent are a small share.
CARD_CONTEXT = 32768

CITATION = """## Citation

```bibtex
@article{leank2025,
  title   = {LeanK: Learnable K Cache Channel Pruning for Efficient Decoding},
  journal = {arXiv preprint arXiv:2508.02215},
  year    = {2025}
}
```"""


def render_card(masks: LeanKMasks, repo_id: str | None = None) -> str:
    """The README.md of a mask repo, from `hub_cards/model_card.md`."""
    template = Template((resources.files("leank_hf.hub_cards") / "model_card.md").read_text(encoding="utf-8"))
    hub_id = as_hub_id(masks.base_model)  # a local path (masks made from a model folder) is no model to link
    base_model = hub_id or "unknown"
    metadata = ModelCardData(
        base_model=hub_id,
        library_name="leank-hf",
        pipeline_tag="text-generation",
        tags=["leank", "kv-cache", "kv-cache-compression", "long-context"],
    ).to_yaml()
    estimate = estimate_memory(masks.channel_mask, masks.pruned_layers, masks.sink, masks.recent, CARD_CONTEXT)
    dense_half = estimate.dense_bytes / 2
    pruned_heads = int((masks.kept_counts[masks.pruned_layers] == 0).sum())
    total_heads = len(masks.pruned_layers) * masks.num_kv_heads
    method = masks.method or {}
    return template.substitute(
        metadata=metadata,
        base_model=base_model,
        base_model_link=f"[{hub_id}](https://huggingface.co/{hub_id})" if hub_id else base_model,
        sink=masks.sink,
        recent=masks.recent,
        block_size=masks.block_size,
        align=masks.align,
        keep_ratio=f"{masks.keep_ratio:.1%}",
        pruned_heads=f"{pruned_heads} of {total_heads}",
        shape=f"{masks.num_layers} / {masks.num_kv_heads} / {masks.head_dim}",
        context=CARD_CONTEXT,
        k_saved=f"{1 - estimate.key_bytes / dense_half:.1%}",
        v_saved=f"{1 - estimate.value_bytes / dense_half:.1%}",
        kv_saved=f"{estimate.saved_fraction:.1%}",
        method=describe_method(method),
        repo_name=repo_id or "path/to/this/mask/repo",
        evaluation=_evaluation_table(masks.evaluation),
        source="\n\n".join(filter(None, [method.get("source", ""), CITATION])),
    )


def describe_method(method: dict) -> str:
    """One line on how masks were made (their `method` minus the long provenance text)."""
    if not method:
        return "not recorded"
    details = {k: v for k, v in method.items() if k not in ("name", "source")}
    return f"{method.get('name', 'unknown')}" + (f" (`{json.dumps(details, sort_keys=True)}`)" if details else "")


# Columns of `leank_hf.eval` rows come first, in this order; any others follow in the order they first appear.
_EVALUATION_COLUMNS = ["method", "keep_ratio", "kl", "top1", "retrieval"]


def _evaluation_table(rows: tuple[dict, ...]) -> str:
    if not rows:
        return "No evaluation recorded for these masks yet."
    keys = list(dict.fromkeys(key for row in rows for key in row))
    columns = [c for c in _EVALUATION_COLUMNS if c in keys] + [k for k in keys if k not in _EVALUATION_COLUMNS]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def heatmap_png(masks: LeanKMasks) -> bytes:
    """PNG bytes: every kept channel (left) and the kept share per layer and KV head (right). Drawn on a
    `matplotlib.figure.Figure` of its own: no pyplot state, and the user's matplotlib backend stays as it is."""
    from matplotlib.figure import Figure

    mask = masks.channel_mask.float()
    fig = Figure(figsize=(12, 0.18 * masks.num_layers + 2), layout="tight")
    channels, shares = fig.subplots(1, 2, gridspec_kw={"width_ratios": [4, 1]})
    channels.imshow(mask.reshape(masks.num_layers, -1).numpy(), aspect="auto", cmap="Greys", interpolation="nearest")
    channels.set(title="kept key channels (black), KV heads side by side", xlabel="KV head x channel", ylabel="layer")
    for head in range(1, masks.num_kv_heads):
        channels.axvline(head * masks.head_dim - 0.5, color="tab:red", linewidth=0.5)
    image = shares.imshow(mask.mean(-1).numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    shares.set(title="kept share", xlabel="KV head")
    fig.colorbar(image, ax=shares)
    model = as_hub_id(masks.base_model) or "unknown model"
    fig.suptitle(f"LeanK masks for {model}: {masks.keep_ratio:.1%} of key channels kept")
    return figure_png(fig, dpi=100)


def figure_png(fig, dpi: int) -> bytes:
    """The PNG bytes of a matplotlib `Figure`."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def plot_masks(masks: LeanKMasks, path: str | os.PathLike) -> None:
    """Write `heatmap_png` to `path` (atomically)."""
    atomic_write_bytes(path, heatmap_png(masks))
