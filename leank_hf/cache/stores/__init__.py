"""How a LeanK layer stores its tokens: `LeanKStore` and its siblings, one per storage scheme.

- `base`: `LeanKStore`, the interface a `LeanKLayer` hands every call to.
- `growable`: `GrowableStore`, stores that grow as tokens come (eager steps), built from
  `window` (`RecentWindow`, the full-width recent window and its growth rules) and
  `sink_middle` (`SinkAndMiddle`, where tokens go when they leave the window), whose middle is a
  `middle` (`PrunedMiddle`, the model's dtype) or a `quantized_middle` (`QuantizedMiddle`, int8/int4 codes).
- `fixed`: `FixedStore`, fixed shapes with lengths on the device (compiled decode steps), whose middle is one of
  `fixed_middle`'s (`FixedPrunedMiddle`, `FixedQuantizedMiddle`).
"""

from .base import NOT_LEANK_ATTENTION, LeanKStore, Step
from .fixed import FixedStore
from .growable import GrowableStore
from .middle import Middle, PrunedMiddle
from .quantized_middle import QuantizedMiddle

__all__ = [
    "NOT_LEANK_ATTENTION",
    "FixedStore",
    "GrowableStore",
    "LeanKStore",
    "Middle",
    "PrunedMiddle",
    "QuantizedMiddle",
    "Step",
]
