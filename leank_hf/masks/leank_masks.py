"""`LeanKMasks`: the static per-layer, per-KV-head key-channel masks and the window settings that go with them.

A validated value: its fields, what follows from them, its config dict and whether it fits a model. Saving, loading
and pushing a mask repo are inherited from `MaskRepoMixin` (`repo_mixin`); the ways masks are made live in
`leank_hf.methods` and `leank_hf.training`, which build this class.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..architectures import LEANK_LAYER_TYPE, SUPPORTED_MODEL_TYPES, ModelSpec
from ..windows import DEFAULT_WINDOWS, WindowConfig
from .repo_files import FORMAT_VERSION
from .repo_mixin import MaskRepoMixin
from .selection import DEFAULT_ALIGN

if TYPE_CHECKING:
    pass


@dataclass(frozen=True, eq=False)
class LeanKMasks(MaskRepoMixin):
    """Binary keep-masks over the post-RoPE key channels of every layer and KV head, plus the cache windows.

    At decode, the first `sink` tokens and the latest `recent` tokens of a sequence keep full keys and values;
    tokens in between keep only the masked-in key channels. A head with no kept channel drops its middle tokens
    (keys and values) entirely. Tokens leave the recent window in blocks of `block_size`.

    Args:
        channel_mask: `[layers, kv_heads, head_dim]` bool (or 0/1 integer) tensor, True = keep. The channel index
            is that of transformers' `rotate_half` layout after RoPE (channel `i` pairs with `i + head_dim/2`).
        sink: leading tokens per sequence that keep full keys.
        recent: latest tokens per sequence that keep full keys.
        block_size: tokens moved from the recent window to the pruned store at a time. (The defaults of the three,
            and why: `WindowConfig`.)
        align: every head keeps a multiple of this many channels (the decode kernel reads channel tiles of it).
        layer_types: per layer, transformers' layer type; only ``"full_attention"`` layers are pruned, others
            (e.g. Gemma3's sliding layers) keep their own cache and must keep every channel. `None` = all full.
        model_type: transformers `model_type` of that model (e.g. ``"llama"``), if known; checked when loading.
        base_model: Hub id of the model the masks were made for, if known.
        base_model_revision: its revision, if known.
        method: how the masks were made (``{"name": "calibration", ...}``), stored in the mask repo.
        evaluation: rows of an evaluation table (dicts with the same keys), shown on the model card.
    """

    channel_mask: torch.Tensor
    sink: int = DEFAULT_WINDOWS.sink
    recent: int = DEFAULT_WINDOWS.recent
    block_size: int = DEFAULT_WINDOWS.block_size
    align: int = DEFAULT_ALIGN
    layer_types: tuple[str, ...] | None = None
    model_type: str | None = None
    base_model: str | None = None
    base_model_revision: str | None = None
    method: dict[str, Any] = field(default_factory=dict)
    evaluation: tuple[dict[str, Any], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mask", _as_keep_mask(self.channel_mask))
        for name in ("model_type", "base_model", "base_model_revision"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a string or None, got {value!r}")
        if self.model_type is not None and self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {self.model_type!r} is not one LeanK supports ({', '.join(SUPPORTED_MODEL_TYPES)}); "
                "set the model_type of the model the masks were made for, or None if unknown"
            )
        if not isinstance(self.method, Mapping):
            raise ValueError(f"method must be a dict (how the masks were made), got {self.method!r:.80}")
        object.__setattr__(self, "method", dict(self.method))
        evaluation = self.evaluation
        if not isinstance(evaluation, (list, tuple)) or not all(isinstance(row, Mapping) for row in evaluation):
            raise ValueError(f"evaluation must be a list of dicts (table rows), got {evaluation!r:.80}")
        object.__setattr__(self, "evaluation", tuple(dict(row) for row in evaluation))
        WindowConfig(self.sink, self.recent, self.block_size)  # refuses windows out of range
        self._validate_alignment()
        self._validate_layer_types()

    def _validate_layer_types(self) -> None:
        layer_types = self.layer_types
        if layer_types is None:
            return
        if not isinstance(layer_types, (list, tuple)) or not all(isinstance(t, str) for t in layer_types):
            raise ValueError(
                f"layer_types must be a list of layer type names (e.g. {LEANK_LAYER_TYPE!r}) or None, "
                f"got {layer_types!r:.80}"
            )
        layer_types = tuple(layer_types)
        object.__setattr__(self, "layer_types", layer_types)
        if len(layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(layer_types)} entries but the mask has {self.num_layers} layers")
        unpruned = [i for i, t in enumerate(layer_types) if t != LEANK_LAYER_TYPE and not self.channel_mask[i].all()]
        if unpruned:
            raise ValueError(
                f"layers {unpruned} are not full-attention layers ({layer_types[unpruned[0]]!r}); LeanK leaves "
                "their cache alone, so their masks must keep every channel"
            )

    def _validate_alignment(self) -> None:
        if isinstance(self.align, bool) or not isinstance(self.align, int) or self.align <= 0:
            raise ValueError(f"align must be a positive integer, got {self.align!r}")
        if self.head_dim % self.align:
            # Powers of two suit the decode kernel's channel tiles; 1 divides every head_dim.
            divisors = [str(d) for d in (128, 64, 32, 16, 8, 4, 2, 1) if self.head_dim % d == 0][:3]
            raise ValueError(
                f"head_dim {self.head_dim} is not divisible by the alignment {self.align}; use an align that "
                f"divides head_dim, such as {', '.join(divisors)}"
            )
        counts = self.kept_counts
        bad = (counts % self.align != 0).nonzero()
        if len(bad):
            layer, head = bad[0].tolist()
            raise ValueError(
                f"layer {layer} head {head} keeps {int(counts[layer, head])} channels, not a multiple of the "
                f"alignment {self.align}; re-select the masks with this alignment (see leank_hf.select_channels)"
            )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LeanKMasks):
            return NotImplemented
        return self.to_config_dict() == other.to_config_dict() and torch.equal(self.channel_mask, other.channel_mask)

    __hash__ = object.__hash__

    # ----------------------------------------------------------------------------------------------- shape
    @property
    def num_layers(self) -> int:
        return self.channel_mask.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.channel_mask.shape[1]

    @property
    def head_dim(self) -> int:
        return self.channel_mask.shape[2]

    @property
    def pruned_layers(self) -> list[int]:
        """Layers whose cache LeanK prunes."""
        if self.layer_types is None:
            return list(range(self.num_layers))
        return [i for i, t in enumerate(self.layer_types) if t == LEANK_LAYER_TYPE]

    @property
    def kept_counts(self) -> torch.Tensor:
        """`[layers, kv_heads]` number of kept channels."""
        return self.channel_mask.sum(-1)

    @property
    def keep_ratio(self) -> float:
        """Share of key channels kept over the pruned layers."""
        pruned = self.channel_mask[self.pruned_layers]
        return float(pruned.float().mean()) if pruned.numel() else 1.0

    def kept_channels(self, layer: int, head: int) -> torch.Tensor:
        """Sorted indices of the key channels that `head` of `layer` keeps."""
        return self.channel_mask[layer, head].nonzero().flatten()

    def to_dense(self) -> torch.BoolTensor:
        """`[layers, kv_heads, head_dim]` boolean keep-mask (True = kept)."""
        return self.channel_mask.clone()

    @classmethod
    def from_dense(cls, mask: torch.Tensor, **config: Any) -> LeanKMasks:
        """Build masks from a `[layers, kv_heads, head_dim]` keep-mask; `config` sets the other fields."""
        return cls(channel_mask=mask, **config)

    def replace(self, **changes: Any) -> LeanKMasks:
        """A copy with some fields changed (e.g. ``masks.replace(recent=768)``), validated again."""
        return dataclasses.replace(self, **changes)

    def check_compatible(self, spec: ModelSpec, model_name: str | None = None) -> None:
        """Raise a `ValueError` naming both sides if these masks do not fit the model described by `spec`.

        A different base-model id (when `model_name` is a Hub id) only warns: masks may transfer to fine-tunes.
        """
        if self.model_type is not None and self.model_type != spec.model_type:
            raise ValueError(
                f"these LeanK masks were made for a {self.model_type!r} model ({self.base_model or 'unknown'}) but "
                f"{spec.architecture} is a {spec.model_type!r} model; use masks made for this model"
            )
        if self.base_model and model_name and model_name != self.base_model and not Path(model_name).exists():
            warnings.warn(
                f"these LeanK masks were made for {self.base_model} but are used with {model_name}; check that "
                "they fit (e.g. a fine-tune of the same base) or calibrate/learn masks for it",
                stacklevel=3,
            )
        expected = (spec.num_layers, spec.num_kv_heads, spec.head_dim)
        if tuple(self.channel_mask.shape) != expected:
            raise ValueError(
                f"these LeanK masks have shape [layers, kv_heads, head_dim] = {list(self.channel_mask.shape)} but "
                f"{spec.architecture} has {list(expected)}; use masks made for this model "
                f"(base model of these masks: {self.base_model or 'unknown'})"
            )
        if self.layer_types is not None and tuple(self.layer_types) != tuple(spec.layer_types):
            raise ValueError(
                f"these LeanK masks were made for layer types {list(self.layer_types)} but {spec.architecture} "
                f"has {list(spec.layer_types)}; use masks made for this model"
            )
        sliding_pruned = [
            i for i, t in enumerate(spec.layer_types) if t != LEANK_LAYER_TYPE and not self.channel_mask[i].all()
        ]
        if sliding_pruned:
            raise ValueError(
                f"layers {sliding_pruned} of {spec.architecture} are {spec.layer_types[sliding_pruned[0]]!r} layers, "
                "which keep their own cache; their masks must keep every channel"
            )

    # ------------------------------------------------------------------------------------------ creation
    # ---------------------------------------------------------------------------------------------- config
    def to_config_dict(self) -> dict[str, Any]:
        """The `leank_config.json` content (without the checksum of the masks file)."""
        return {
            "format_version": FORMAT_VERSION,
            "model_type": self.model_type,
            "base_model": self.base_model,
            "base_model_revision": self.base_model_revision,
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "layer_types": list(self.layer_types) if self.layer_types is not None else None,
            "sink": self.sink,
            "recent": self.recent,
            "block_size": self.block_size,
            "align": self.align,
            "keep_ratio": round(self.keep_ratio, 6),
            "method": self.method,
            "evaluation": list(self.evaluation),
        }


def _as_keep_mask(mask: object) -> torch.Tensor:
    """`mask` as a contiguous CPU bool tensor; refuse shapes and values that are not a 0/1 keep-mask."""
    if not isinstance(mask, torch.Tensor) or mask.ndim != 3:
        shape = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"channel_mask must be a [layers, kv_heads, head_dim] tensor, got {shape}")
    if 0 in mask.shape:
        raise ValueError(f"channel_mask has shape {list(mask.shape)}; it needs at least one layer, KV head and channel")
    if mask.dtype != torch.bool:
        stray = mask[(mask != 0) & (mask != 1)]  # NaN included
        if stray.numel():
            raise ValueError(
                f"channel_mask must be boolean or hold only 0 and 1 (1 = keep the channel), found {stray[0].item()}; "
                "threshold scores into a 0/1 mask first (see leank_hf.select_channels)"
            )
        mask = mask != 0
    return mask.detach().cpu().contiguous()
