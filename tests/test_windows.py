"""WindowConfig: its checks, and that every default window of the library is read from it."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from leank_hf import LeanKMasks, WindowConfig, calibrated_masks
from leank_hf.eval import standard_methods
from leank_hf.training import MaskLearner, prepare_for_mask_learning

from .conftest import tiny_model


def field_defaults(cls) -> dict[str, object]:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def test_window_config_defaults_are_the_papers():
    assert dataclasses.asdict(WindowConfig()) == {"sink": 64, "recent": 256, "block_size": 64}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"sink": -1}, "sink must be an integer from 0 to 1048576 (MAX_WINDOW_TOKENS), got -1"),
        ({"recent": 2**20 + 1}, "recent must be an integer from 0 to 1048576"),
        ({"recent": 1.5}, "recent must be an integer .* got 1.5"),
        ({"sink": True}, "sink must be an integer .* got True"),
        ({"block_size": 0}, "block_size must be an integer from 1 to"),
    ],
)
def test_window_config_names_the_bad_field(fields, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        WindowConfig(**fields)


def test_every_window_default_is_window_configs():
    """LeanKMasks, the mask learner and calibration take their windows from WindowConfig: a default written
    anywhere else that disagrees fails here."""
    windows = dataclasses.asdict(WindowConfig())
    assert {name: field_defaults(LeanKMasks)[name] for name in windows} == windows
    for function in (prepare_for_mask_learning, MaskLearner):
        parameters = inspect.signature(function).parameters
        assert {name: parameters[name].default for name in ("sink", "recent")} == {
            name: windows[name] for name in ("sink", "recent")
        }, function
    assert inspect.signature(standard_methods).parameters["windows"].default == WindowConfig()
    model = tiny_model("llama")
    calibrated = calibrated_masks(model, torch.randint(3, 90, (1, 20)), keep_ratio=0.5)
    assert {name: getattr(calibrated, name) for name in windows} == windows
