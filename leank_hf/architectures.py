"""Which models LeanK supports, and the few facts about a model that the cache and the masks need."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from transformers import PretrainedConfig, PreTrainedModel

# Decoder families whose attention hands post-RoPE keys straight from `past_key_values.update` to the
# `AttentionInterface` function, which is what LeanK hooks into. Keys are `model_type`s of the text config.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3")

# Layer types that LeanK prunes; every other type (sliding) keeps transformers' own cache layer.
LEANK_LAYER_TYPE = "full_attention"


@dataclass(frozen=True)
class ModelSpec:
    """The attention geometry of a decoder, read from its config.

    Attributes:
        model_type: `model_type` of the text config, e.g. ``"llama"``.
        architecture: class name used in error messages, e.g. ``"LlamaForCausalLM"``.
        num_layers: decoder layers.
        num_kv_heads: key/value heads per layer.
        head_dim: channels per head.
        layer_types: per layer, transformers' layer type (``"full_attention"``, ``"sliding_attention"``, ...).
        sliding_window: window of the sliding layers, if any.
    """

    model_type: str
    architecture: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    layer_types: tuple[str, ...]
    sliding_window: int | None = None

    @classmethod
    def from_config(cls, config: PretrainedConfig, architecture: str | None = None) -> ModelSpec:
        """Read the spec of `config` (or of its text config); raise a `ValueError` for unsupported models.

        `architecture` names the model in error messages (default: the config's `architectures` or class).
        """
        text = config.get_text_config(decoder=True)
        architecture = architecture or (getattr(config, "architectures", None) or [type(config).__name__])[0]
        if text.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"LeanK does not support the architecture {architecture} (model_type={text.model_type!r}). "
                f"Supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}."
            )
        num_q_heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_q_heads
        layer_types = getattr(text, "layer_types", None) or _inferred_layer_types(text)
        if getattr(text, "attn_logit_softcapping", None) is not None:
            raise ValueError(
                f"LeanK does not support attention logit soft-capping ({architecture} sets "
                f"attn_logit_softcapping={text.attn_logit_softcapping}); set it to None to use LeanK."
            )
        return cls(
            model_type=text.model_type,
            architecture=architecture,
            num_layers=text.num_hidden_layers,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or num_q_heads,
            head_dim=head_dim,
            layer_types=tuple(layer_types),
            sliding_window=getattr(text, "sliding_window", None),
        )

    @classmethod
    def from_model(cls, model: PreTrainedModel) -> ModelSpec:
        """`from_config` of the model's config, naming the model's class in errors."""
        return cls.from_config(model.config, type(model).__name__)

    @property
    def leank_layers(self) -> list[int]:
        """Indices of the layers that LeanK prunes (full-attention layers)."""
        return [i for i, t in enumerate(self.layer_types) if t == LEANK_LAYER_TYPE]


def warn_if_nothing_is_pruned(spec: ModelSpec, what: str) -> None:
    """Say why `what` (masks, a cache) prunes nothing when the model has no full-attention layer, e.g. a Mistral whose
    config sets `sliding_window`: transformers then keeps every layer in a sliding-window cache, which LeanK leaves
    alone."""
    if spec.leank_layers:
        return
    kinds = ", ".join(sorted(set(spec.layer_types)))
    warnings.warn(
        f"{spec.architecture} has no full-attention layer to prune (its {spec.num_layers} layers are {kinds}"
        f"{f', sliding_window={spec.sliding_window}' if spec.sliding_window else ''}): transformers keeps them in its "
        f"own sliding-window cache, so {what} prune nothing. Set sliding_window=None in the model's config (if it was "
        "trained for full attention) to let LeanK prune every layer.",
        stacklevel=3,
    )


def _inferred_layer_types(config: PretrainedConfig) -> list[str]:
    """Layer types of a config without `layer_types`, inferred the way transformers' `DynamicCache` does (none of
    the supported families has chunked attention)."""
    if getattr(config, "sliding_window", None) is not None:
        return ["sliding_attention"] * config.num_hidden_layers
    return [LEANK_LAYER_TYPE] * config.num_hidden_layers
