"""LeanK for Hugging Face transformers: learnable K-cache channel pruning as a drop-in cache (arXiv 2508.02215)."""

from .architectures import SUPPORTED_MODEL_TYPES, ModelSpec
from .attention import register
from .cache import LeanKCache
from .hub import zoo_names
from .masks import LeanKMasks
from .memory import LayerMemory, MemoryReport
from .selection import select_channels
from .windows import WindowConfig

__version__ = "0.1.0.dev0"

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "LayerMemory",
    "LeanKCache",
    "LeanKMasks",
    "MemoryReport",
    "ModelSpec",
    "WindowConfig",
    "register",
    "select_channels",
    "zoo_names",
]
