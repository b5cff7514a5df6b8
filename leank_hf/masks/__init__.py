"""The masks: the value (`LeanKMasks`), choosing channels under a budget (`selection`), and a mask repo's files,
Hub sources and card (`repo_files`, `repo_mixin`, `io`, `hub`, `card`)."""

from .hub import as_hub_id, zoo_names
from .leank_masks import LeanKMasks
from .selection import DEFAULT_ALIGN, DEFAULT_KEEP_RATIO, select_channels

__all__ = ["DEFAULT_ALIGN", "DEFAULT_KEEP_RATIO", "LeanKMasks", "as_hub_id", "select_channels", "zoo_names"]
