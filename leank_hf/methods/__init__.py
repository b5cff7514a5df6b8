"""Ways to make masks without training, one per module: calibration (the training-free heuristic), ThinK-style
per-prompt selection and random channels. Learned masks: `leank_hf.training`."""

from .calibration import calibrated_masks
from .random_masks import random_masks
from .think import think_masks

__all__ = ["calibrated_masks", "random_masks", "think_masks"]
