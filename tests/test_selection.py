"""select_channels: exact global ratio, aligned per-head counts, best channels kept."""

from __future__ import annotations

import dataclasses
import inspect
import warnings

import pytest
import torch

from leank_hf import LeanKMasks, calibrated_masks, select_channels
from leank_hf.masks.selection import DEFAULT_ALIGN, DEFAULT_KEEP_RATIO
from leank_hf.methods import random_masks
from leank_hf.training import LeanKMaskCallback


@pytest.mark.parametrize("keep_ratio", [0.0, 0.2, 0.3, 0.5, 0.77, 1.0])
@pytest.mark.parametrize(("shape", "align"), [((4, 3, 64), 16), ((5, 8, 128), 32), ((2, 1, 48), 16)])
def test_ratio_and_alignment_are_exact(keep_ratio, shape, align):
    scores = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    mask = select_channels(scores, keep_ratio, align)
    counts = mask.sum(-1)
    assert (counts % align == 0).all()
    # The total is the multiple of `align` nearest to the asked share (either one on a tie).
    assert abs(int(mask.sum()) - keep_ratio * scores.numel()) <= align / 2


def test_keeps_the_highest_scores_of_each_head():
    scores = torch.rand(3, 4, 64, generator=torch.Generator().manual_seed(1))
    mask = select_channels(scores, 0.4, 16)
    for layer in range(3):
        for head in range(4):
            kept, dropped = scores[layer, head][mask[layer, head]], scores[layer, head][~mask[layer, head]]
            if len(kept) and len(dropped):
                assert kept.min() > dropped.max()


def test_global_selection_favours_important_heads():
    scores = torch.rand(1, 2, 64, generator=torch.Generator().manual_seed(2))
    scores[0, 1] += 10  # head 1 dominates every channel of head 0
    mask = select_channels(scores, 0.5, 16)
    assert mask[0, 1].all() and not mask[0, 0].any()


def test_unselected_layers_keep_everything_and_do_not_count():
    scores = torch.rand(3, 2, 32, generator=torch.Generator().manual_seed(3))
    mask = select_channels(scores, 0.5, 16, layers=[1])
    assert mask[0].all() and mask[2].all()
    assert int(mask[1].sum()) == 32


def test_a_positive_ratio_that_rounds_to_nothing_warns():
    scores = torch.rand(2, 2, 32, generator=torch.Generator().manual_seed(4))
    with pytest.warns(UserWarning, match=r"keep_ratio 0.05 of 128 channels rounds to no group of 16.* 0.125 keeps"):
        assert not select_channels(scores, 0.05, 16).any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        select_channels(scores, 0.0, 16)  # asking for nothing is not a surprise


@pytest.mark.parametrize(
    ("args", "match"),
    [((torch.rand(2, 32), 0.3, 16), "layers, kv_heads"), ((torch.rand(1, 1, 32), 1.5, 16), "keep_ratio"),
     ((torch.rand(1, 1, 40), 0.3, 16), "not divisible")],
)  # fmt: skip
def test_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        select_channels(*args)


def test_every_keep_ratio_and_align_default_is_selections():
    """The paper's keep ratio and the kernel's alignment are written once, in leank_hf.masks.selection: a default
    written anywhere else that disagrees fails here."""
    defaults = {"keep_ratio": DEFAULT_KEEP_RATIO, "align": DEFAULT_ALIGN}
    assert defaults == {"keep_ratio": 0.3, "align": 16}
    calibration = inspect.signature(calibrated_masks).parameters
    assert {name: calibration[name].default for name in defaults} == defaults
    assert {name: getattr(LeanKMaskCallback(), name) for name in defaults} == defaults
    assert {f.name: f.default for f in dataclasses.fields(LeanKMasks)}["align"] == DEFAULT_ALIGN
    assert inspect.signature(random_masks).parameters["align"].default == DEFAULT_ALIGN
