"""The one difference between the transformers versions leank-hf supports (5.17 to 5.x) that its callers see: the
name of the cache argument of `generate` and of a model's `forward`."""

from __future__ import annotations

import inspect

from transformers import Cache, GenerationMixin

# transformers 5.24 renamed `past_key_values` to `cache`; the old name warns from then on and is removed from
# `forward` in 5.40 and from `generate` in 6.0. Read off the signature, so release candidates and backports agree.
CACHE_ARGUMENT = (
    "cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    else "past_key_values"
)  # fmt: skip


def cache_kwargs(cache: Cache | None) -> dict[str, Cache | None]:
    """`{name: cache}` for `model.generate(**inputs, **cache_kwargs(cache))` or a forward, under the installed
    transformers' name for the argument (`cache` from 5.24 on, `past_key_values` before)."""
    return {CACHE_ARGUMENT: cache}
