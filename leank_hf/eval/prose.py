"""Real prose shipped with leank-hf, for offline training data and held-out evaluation text.

`alice_in_wonderland.txt` is Lewis Carroll, *Alice's Adventures in Wonderland* (1865), public domain. The text is
the Project Gutenberg "Millennium Fulcrum Edition 2.9" as found in the Canterbury corpus (file `alice29.txt`,
distributed with the `brotli` sources), with its line breaks joined into one line per paragraph.

Chapters I-IX are the training split; chapters X-XII are held out for evaluation, so evaluation never reads text
that masks were learned on.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Literal

Split = Literal["train", "heldout"]

_HELDOUT_FIRST_CHAPTER = "CHAPTER X."


@functools.cache
def prose_paragraphs(split: Split = "train") -> tuple[str, ...]:
    """The paragraphs of one split of the shipped book, in reading order (chapter headings included)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    text = (resources.files(__package__) / "alice_in_wonderland.txt").read_text(encoding="utf-8")
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    boundary = next(i for i, p in enumerate(paragraphs) if p.startswith(_HELDOUT_FIRST_CHAPTER))
    return tuple(paragraphs[:boundary] if split == "train" else paragraphs[boundary:])


def prose_text(split: Split = "train") -> str:
    """One split of the book as one text, paragraphs separated by blank lines (as `make_retrieval_dataset` joins
    them)."""
    return "\n\n".join(prose_paragraphs(split))
