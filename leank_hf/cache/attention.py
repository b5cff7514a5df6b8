"""The ``"leank"`` attention implementation: exact attention for prefill, pruned attention once a LeanK layer holds
tokens, and for everything else the model's own implementation, untouched.

It is registered with transformers' `AttentionInterface`, with a mask function under the same name in
`AttentionMaskInterface`. A model switched to it keeps the implementation it had before (eager or SDPA) as its
fallback: calls that do not come from a `LeanKLayer` (sliding layers, other caches, no cache) run that implementation
with the mask it takes, so the same model with a `DynamicCache` gives exactly what it gave before.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Protocol

import torch
from transformers import AttentionInterface, PretrainedConfig, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

from .layer import PendingStep

ATTN_IMPLEMENTATION = "leank"

# Implementations a model may fall back to for calls LeanK does not handle. Others (flash, flex) read the
# implementation's name elsewhere in transformers' model code, so a model switched away from them would not run them
# as they expect; such models fall back to SDPA, as they would after `set_attn_implementation("sdpa")`.
_FALLBACKS = ("eager", "sdpa")


class _Switch:
    """What switching a model to "leank" changed: the implementation it had (`original`) and the one that runs the
    calls LeanK does not handle (`fallback`), whether a `LeanKCache` needs the switch to stay (`kept`), and how many
    `observing` blocks borrow it meanwhile."""

    __slots__ = ("borrowers", "configs", "fallback", "kept", "original")

    def __init__(self, configs: list[PretrainedConfig], original: str) -> None:
        self.configs = [weakref.ref(config) for config in configs]
        self.original, self.fallback = original, original if original in _FALLBACKS else "sdpa"
        self.kept, self.borrowers = False, 0


# The switch of each config of a model switched to "leank", by `id` (configs define `__eq__`, so they cannot be dict
# keys); the weak references tell a live config from a new one that reuses a freed one's id.
_switches: dict[int, _Switch] = {}
_switching = threading.Lock()


class AttentionObserver(Protocol):
    """What `observing` feeds: every attention call's post-RoPE queries and keys, in the observing context only."""

    def add(self, layer: int, query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor | None) -> None: ...


_observer: contextvars.ContextVar[AttentionObserver | None] = contextvars.ContextVar("leank_observer", default=None)


def register_implementation(name: str, attention_function, mask_function=sdpa_mask) -> None:
    """Register `attention_function` under `name`, with `mask_function` under the same name (by default SDPA's
    boolean mask, so that padding reaches it); safe to call repeatedly."""
    AttentionInterface.register(name, attention_function)
    AttentionMaskInterface.register(name, mask_function)


def register() -> None:
    """Register the ``"leank"`` attention and mask functions with transformers (safe to call repeatedly)."""
    register_implementation(ATTN_IMPLEMENTATION, leank_attention_forward, leank_mask)


def enable(model: PreTrainedModel) -> None:
    """Make `model` attend through LeanK for good (what a `LeanKCache` needs). With caches other than `LeanKCache` it
    behaves exactly as before: its previous implementation (eager or SDPA; others fall back to SDPA, with a warning)
    runs those calls."""
    with _switching:
        _switch(model).kept = True


def _switch(model: PreTrainedModel) -> _Switch:
    """The switch of `model` to "leank", made now if it was not (call with `_switching` held)."""
    register()
    switch = _switch_of(model.config)
    if switch is not None:
        return switch
    original = model.config._attn_implementation
    if original not in _FALLBACKS:
        warnings.warn(
            f"{type(model).__name__} uses attn_implementation={original!r}; with LeanK it attends through SDPA for "
            "caches other than LeanKCache. Load it with attn_implementation='sdpa' or 'eager' to keep one of those.",
            stacklevel=4,
        )
    for key in [key for key, switch in _switches.items() if switch.configs[0]() is None]:
        del _switches[key]  # models since freed
    configs = _configs(model)
    switch = _Switch(configs, original)
    for config in configs:
        _switches[id(config)] = switch
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return switch


def _switch_of(config: PretrainedConfig) -> _Switch | None:
    switch = _switches.get(id(config))
    if switch is None or not any(ref() is config for ref in switch.configs):
        return None
    return switch


def fallback_implementation(config: PretrainedConfig) -> str:
    """The implementation `config`'s model had before it was switched to LeanK (SDPA if it never was)."""
    switch = _switch_of(config)
    return switch.fallback if switch is not None else "sdpa"


def _configs(model: PreTrainedModel) -> list[PretrainedConfig]:
    """The configs the attention and mask functions of `model` receive: its own and its modules'."""
    configs = {id(model.config): model.config}
    for module in model.modules():
        config = getattr(module, "config", None)
        if isinstance(config, PretrainedConfig):
            configs.setdefault(id(config), config)
    return list(configs.values())


@contextlib.contextmanager
def observing(model: PreTrainedModel, observer: AttentionObserver) -> Iterator[AttentionObserver]:
    """Within the block, and in this thread or task only, every attention call of `model` hands its post-RoPE
    queries and keys to `observer.add` before it attends as usual. Other threads using the model see no change, and
    afterwards the model has the implementation it had (unless a `LeanKCache` was built for it meanwhile)."""
    with _switching:
        switch = _switch(model)
        switch.borrowers += 1
    token = _observer.set(observer)
    try:
        yield observer
    finally:
        _observer.reset(token)
        with _switching:
            switch.borrowers -= 1
            if not switch.kept and not switch.borrowers:
                for ref in switch.configs:
                    _switches.pop(id(ref()), None)
                model.set_attn_implementation(switch.original)


@contextlib.contextmanager
def attending_with(model: PreTrainedModel, implementation: str) -> Iterator[None]:
    """Within the block `model` attends with `implementation` (a registered name); afterwards it has the one it had.

    For code that drives the model itself, a forward at a time (mask learning's student). Not for two threads that
    use one model at once: the implementation is the model's, not the thread's (see `observing` for that)."""
    original = model.config._attn_implementation
    if original == implementation:
        yield
        return
    model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        model.set_attn_implementation(original)


def leank_mask(*args, config: PretrainedConfig, **kwargs):
    """The mask the fallback implementation takes (eager: additive float; SDPA: boolean), which LeanK's own path
    reads too (`new_token_validity`)."""
    return ALL_MASK_ATTENTION_FUNCTIONS[fallback_implementation(config)](*args, config=config, **kwargs)


def leank_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor | PendingStep,
    value: torch.Tensor | PendingStep,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers attention function; returns `([B, Q, Hq, D], weights or None)` like the other integrations."""
    keys = key.keys if isinstance(key, PendingStep) else key
    observer = None if torch.compiler.is_compiling() else _observer.get()  # dynamo cannot trace a ContextVar
    if observer is not None:
        valid = new_token_validity(attention_mask, keys.shape[2], keys.shape[0])
        observer.add(module.layer_idx, query, keys, valid)
    if not isinstance(key, PendingStep):
        fallback = _fallback_function(module)
        return fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if kwargs.get("output_attentions"):
        raise ValueError(
            "output_attentions=True is not supported with LeanKCache: LeanK never materialises attention weights; "
            "drop output_attentions, or inspect weights with a DynamicCache and attn_implementation='eager'."
        )
    step, layer = key, key.layer
    valid = new_token_validity(attention_mask, step.keys.shape[2], step.keys.shape[0])
    if layer.stored_tokens == 0:
        # Prefill: the model's own exact attention, so the first generated token is unchanged.
        output, _ = _fallback_function(module)(
            module, query, step.keys, step.values, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
        layer.commit(step, valid)
        return output, None
    output = layer.attend(query, step, valid, scaling if scaling is not None else query.shape[-1] ** -0.5)
    return output.transpose(1, 2).contiguous(), None


def _fallback_function(module: torch.nn.Module) -> Callable:
    config = getattr(module, "config", None)  # every transformers attention module has one
    if config is not None and fallback_implementation(config) == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward  # every modeling file defines its own
    return sdpa_attention_forward


def new_token_validity(attention_mask: torch.Tensor | None, num_new: int, batch: int) -> torch.Tensor | None:
    """`[B, Q]` bool, False where this step's tokens are padding; None when nothing is padded.

    The mask's last query row sees every new key it may (causality allows all of them), so its last `Q` columns are
    exactly the padding flags of the new tokens. Boolean (SDPA) and additive float (eager) masks are both understood.
    """
    if attention_mask is None:
        return None
    last_row = attention_mask[:, 0, -1, -num_new:]
    if last_row.dtype != torch.bool:
        last_row = last_row > torch.finfo(last_row.dtype).min / 2
    return last_row.expand(batch, num_new)
