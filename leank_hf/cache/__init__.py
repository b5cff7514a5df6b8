"""The cache `generate` sees: `LeanKCache`, its layers (`LeanKLayer`, and `StaticLeanKLayer` with `max_cache_len`),
the stores they hand their tokens to (`stores`), and the ``"leank"`` attention implementation (`attention`)."""

from .attention import register
from .layer import LeanKLayer
from .leank_cache import LeanKCache
from .static_layer import StaticLeanKLayer

__all__ = ["LeanKCache", "LeanKLayer", "StaticLeanKLayer", "register"]
