"""`WindowConfig`: the tokens of each row that a LeanK cache keeps at full width, and the one home of their defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

# Upper bound of each window setting, in tokens. Real settings are tens to thousands (the paper: 64 and 256); the bound
# turns a corrupt value such as sink=2**70 into a clear error here instead of an OverflowError deep in the cache.
MAX_WINDOW_TOKENS = 2**20


@dataclass(frozen=True)
class WindowConfig:
    """Which tokens of a row keep full keys and values, and how tokens leave the recent window.

    The defaults are the paper's: the first 64 tokens (attention sinks, which draw large attention weights whatever
    they hold) and the latest 256 tokens (its training setting) keep full keys; the masks are learned for them, so a
    mask repo stores the windows it was made with. Tokens leave the recent window 64 at a time, so decoding moves
    keys into the pruned store once every 64 steps instead of at every step, for at most 64 more full-width tokens.
    Every LeanK default window (`LeanKMasks`, `prepare_for_mask_learning`, the baselines of `leank_hf.eval`, the
    command line) is read from here.

    Raises:
        ValueError: naming the field, for a value that is not an integer in range.
    """

    sink: int = field(default=64, metadata={"help": "leading tokens of each row that keep full keys (paper: 64)"})
    recent: int = field(default=256, metadata={"help": "latest tokens of each row that keep full keys (paper: 256)"})
    block_size: int = field(
        default=64, metadata={"help": "tokens moved from the recent window to the pruned store at a time"}
    )

    def __post_init__(self) -> None:
        for name, low in (("sink", 0), ("recent", 0), ("block_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_WINDOW_TOKENS:
                raise ValueError(
                    f"{name} must be an integer from {low} to {MAX_WINDOW_TOKENS} (MAX_WINDOW_TOKENS), got {value!r}"
                )


DEFAULT_WINDOWS = WindowConfig()
