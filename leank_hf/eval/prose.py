"""Texts shipped with leank-hf, for offline training data, held-out evaluation text and the RULER-style suite's
haystacks. All are public domain; each is the Project Gutenberg text as found in the Canterbury corpus (distributed
with the `brotli` sources, e.g. the PyPI sdist brotli-1.2.1, `tests/testdata/`), with its line breaks joined into one
line per paragraph:

- `alice_in_wonderland.txt`: Lewis Carroll, *Alice's Adventures in Wonderland* (1865), the "Millennium Fulcrum
  Edition 2.9" (`alice29.txt`). Chapters I-IX are its training split, chapters X-XII its held-out split.
- `as_you_like_it.txt`: William Shakespeare, *As You Like It* (c. 1599; `asyoulik.txt`), from "ACT I" on, one
  paragraph per speech ("SPEAKER: words"), stage direction or heading (the repeated title and act headings dropped).
  Acts I-IV are its training split, act V its held-out split.
- `paradise_lost.txt`: John Milton, *Paradise Lost* (1667), books I and II of Project Gutenberg's February 1992
  release (`plrabn12.txt`), each verse paragraph cut into pieces of at most eight lines. Only the RULER-style suite
  reads it (`SUITE_TEXTS`): training data never does.

`"noise"` is no file: RULER's own synthetic haystack, one repeated passage (`NOISE`), also read by the suite only.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Literal

Split = Literal["train", "heldout"]

# name -> (file, first paragraph of the held-out split)
_TRAINING_FILES = {
    "alice": ("alice_in_wonderland.txt", "CHAPTER X."),
    "as_you_like_it": ("as_you_like_it.txt", "ACT V."),
}
_SUITE_FILES = {"paradise_lost": "paradise_lost.txt"}
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

TRAINING_TEXTS = tuple(_TRAINING_FILES)  # split into training and held-out parts; `make_retrieval_dataset` reads them
SUITE_TEXTS = (*_SUITE_FILES, "noise")  # the RULER-style suite's haystacks, never in training data


@functools.cache
def text_paragraphs(name: str, split: Split | None = None) -> tuple[str, ...]:
    """The paragraphs of a shipped text in reading order: of one `split` of a training text (`TRAINING_TEXTS`), or of
    a whole suite text (`SUITE_TEXTS`, no split; ``"noise"`` is 400 paragraphs of `NOISE` five times over, as RULER
    repeats it)."""
    if name in _TRAINING_FILES:
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout' for the training text {name!r}, got {split!r}")
        file, heldout_start = _TRAINING_FILES[name]
        paragraphs = _read(file)
        boundary = next(i for i, p in enumerate(paragraphs) if p.startswith(heldout_start))
        return paragraphs[:boundary] if split == "train" else paragraphs[boundary:]
    if name not in SUITE_TEXTS:
        raise ValueError(f"no shipped text {name!r}; choose from {', '.join(TRAINING_TEXTS + SUITE_TEXTS)}")
    if split is not None:
        raise ValueError(f"{name!r} is a suite text, read whole: pass no split")
    return (" ".join([NOISE] * 5),) * 400 if name == "noise" else _read(_SUITE_FILES[name])


@functools.cache
def _read(file: str) -> tuple[str, ...]:
    text = (resources.files(__package__) / file).read_text(encoding="utf-8")
    return tuple(p for p in text.split("\n\n") if p.strip())


def prose_paragraphs(split: Split = "train") -> tuple[str, ...]:
    """The paragraphs of one split of *Alice* in reading order (chapter headings included)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return text_paragraphs("alice", split)


def prose_text(split: Split = "train") -> str:
    """One split of *Alice* as one text, paragraphs separated by blank lines (as `make_retrieval_dataset` joins
    them)."""
    return "\n\n".join(prose_paragraphs(split))
