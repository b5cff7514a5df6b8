"""LeanK for Hugging Face transformers: learnable K-cache channel pruning as a drop-in cache (arXiv 2508.02215)."""

from .architectures import SUPPORTED_MODEL_TYPES, ModelSpec
from .cache import LeanKCache, register
from .masks import LeanKMasks, select_channels, zoo_names
from .memory import LayerMemory, MemoryReport
from .methods import calibrated_masks, random_masks, think_masks
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
    "calibrated_masks",
    "random_masks",
    "register",
    "select_channels",
    "think_masks",
    "zoo_names",
]
