"""LeanKMasks: validation, dense round trips, and saving/loading a local mask repo."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from leank_hf import LeanKMasks
from leank_hf.masks import CONFIG_NAME, MASKS_NAME

# ../shared/reference_masks beside the checkout, or wherever LEANK_REFERENCE_MASKS points (e.g. on a GPU machine).
REFERENCE_MASKS = Path(
    os.environ.get("LEANK_REFERENCE_MASKS", Path(__file__).resolve().parents[2] / "shared" / "reference_masks")
)


def aligned_mask(layers=2, heads=3, head_dim=32, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(layers, heads, head_dim, dtype=torch.bool)
    for layer in range(layers):
        for head in range(heads):
            count = 16 * int(torch.randint(0, 3, (1,), generator=generator))
            mask[layer, head, torch.randperm(head_dim, generator=generator)[:count]] = True
    return mask


def test_dense_round_trip_and_indices():
    mask = aligned_mask()
    masks = LeanKMasks.from_dense(mask, sink=8, recent=32)
    assert torch.equal(masks.to_dense(), mask)
    assert torch.equal(masks.kept_channels(1, 2), mask[1, 2].nonzero().flatten())
    assert masks.keep_ratio == pytest.approx(mask.float().mean().item())
    assert masks.to_dense() is not masks.channel_mask, "to_dense must not expose internal state"


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.float32, torch.bfloat16])
def test_numeric_masks_holding_0_and_1_are_accepted(dtype):
    mask = aligned_mask()
    assert torch.equal(LeanKMasks(mask.to(dtype)).channel_mask, mask)


ONES = torch.ones(1, 1, 32, dtype=torch.bool)


@pytest.mark.parametrize(
    ("mask", "kwargs", "match"),
    [
        (torch.ones(2, 32, dtype=torch.bool), {}, r"\[layers, kv_heads, head_dim\]"),
        (torch.full((1, 1, 32), 2), {}, "only 0 and 1.*found 2"),
        (torch.full((1, 1, 32), 0.5), {}, "only 0 and 1.*found 0.5"),  # scores or probabilities, not a mask
        (torch.full((1, 1, 32), float("nan")), {}, "only 0 and 1.*found nan"),
        (torch.ones(0, 3, 32, dtype=torch.bool), {}, r"shape \[0, 3, 32\]; it needs at least one layer"),
        (torch.ones(2, 0, 32, dtype=torch.bool), {}, r"shape \[2, 0, 32\]"),
        (torch.ones(2, 3, 0, dtype=torch.bool), {}, r"shape \[2, 3, 0\]"),
        (torch.ones(1, 1, 24, dtype=torch.bool), {}, "head_dim 24 is not divisible by the alignment 16.*8, 4, 2$"),
        (torch.ones(1, 1, 60, dtype=torch.bool), {}, "head_dim 60 .* alignment 16.*such as 4, 2, 1$"),
        (ONES, {"align": True}, "align must be a positive integer, got True"),
        (ONES, {"model_type": "gpt2"}, "model_type 'gpt2' is not one LeanK supports.*llama, mistral"),
        (ONES, {"base_model": 5}, "base_model must be a string or None, got 5"),
        (ONES, {"method": [1, 2]}, r"method must be a dict.*got \[1, 2\]"),
        (ONES, {"evaluation": [1]}, "evaluation must be a list of dicts"),
        (ONES, {"evaluation": {"kl": 1.0}}, "evaluation must be a list of dicts"),
        (ONES, {"layer_types": 5}, "layer_types must be a list of layer type names"),
        (ONES, {"layer_types": "full_attention"}, "layer_types must be a list"),
        (torch.cat([torch.ones(1, 1, 8), torch.zeros(1, 1, 24)], -1).bool(), {}, "not a multiple of the alignment"),
        (ONES, {"sink": -1}, "sink"),
        (ONES, {"recent": "256"}, "recent"),
        (ONES, {"block_size": 0}, "block_size"),
        (ONES, {"sink": 2**70}, r"sink must be an integer from 0 to 1048576"),
        (ONES, {"recent": 2**20 + 1}, r"recent .* to 1048576 \(MAX_WINDOW"),
        (ONES, {"block_size": 2**40}, r"block_size .* 1 to 1048576"),
        (ONES, {"align": 0}, "align"),
        (torch.ones(2, 1, 32, dtype=torch.bool), {"layer_types": ("full_attention",)}, "layer_types"),
    ],
)
def test_bad_masks_and_settings_are_named(mask, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LeanKMasks(mask, **kwargs)


def test_save_and_load_round_trip(tmp_path):
    masks = LeanKMasks(
        aligned_mask(), sink=16, recent=128, block_size=32, base_model="org/model", method={"name": "calibration"}
    )
    masks.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", CONFIG_NAME, MASKS_NAME, "mask_heatmap.png"]
    loaded = LeanKMasks.from_pretrained(tmp_path)
    assert loaded == masks
    assert LeanKMasks.from_pretrained(tmp_path) is loaded, "loads are memoised"
    assert LeanKMasks.from_pretrained(tmp_path, recent=64).recent == 64
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["format_version"] == 1 and config["keep_ratio"] == pytest.approx(masks.keep_ratio, abs=1e-6)


def test_resave_reloads_new_content(tmp_path):
    LeanKMasks(aligned_mask(seed=0)).save_pretrained(tmp_path)
    first = LeanKMasks.from_pretrained(tmp_path)
    LeanKMasks(aligned_mask(seed=1)).save_pretrained(tmp_path)
    assert LeanKMasks.from_pretrained(tmp_path) != first


def test_failed_save_leaves_previous_repo_intact(tmp_path, monkeypatch):
    LeanKMasks(aligned_mask(seed=0)).save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")  # the crash comes mid-write, after the file was opened
        raise OSError("disk full")

    monkeypatch.setattr("leank_hf.io.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        LeanKMasks(aligned_mask(seed=1)).save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before, "no temp files, old files untouched"


def test_half_written_repo_is_detected(tmp_path):
    LeanKMasks(aligned_mask(seed=0)).save_pretrained(tmp_path)
    save_file({"channel_mask": aligned_mask(seed=1).to(torch.uint8)}, tmp_path / MASKS_NAME)
    with pytest.raises(ValueError, match="checksum"):
        LeanKMasks.from_pretrained(tmp_path)


def test_corrupt_pickled_and_missing_files(tmp_path):
    LeanKMasks(aligned_mask()).save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config.pop("masks_sha256")
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))

    (tmp_path / MASKS_NAME).write_bytes(b"\x80\x04" + pickle.dumps({"channel_mask": [1, 0]})[2:])
    with pytest.raises(ValueError, match="is a pickle"):  # not "pickle": this test's tmp_path holds that word
        LeanKMasks.from_pretrained(tmp_path)
    (tmp_path / MASKS_NAME).write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a valid safetensors"):
        LeanKMasks.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        LeanKMasks.from_pretrained(tmp_path)
    (tmp_path / MASKS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=MASKS_NAME):
        LeanKMasks.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no LeanK mask directory"):
        LeanKMasks.from_pretrained(tmp_path / "nope")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"format_version": 99}, "format_version 99"),
        ({"num_layers": 5}, "declares"),
        ({"sink": -3}, "sink"),
        ({"sink": 2**70}, "sink must be an integer from 0 to 1048576"),
    ],
)
def test_bad_config_values(tmp_path, edit, match):
    LeanKMasks(aligned_mask()).save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config.update(edit)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        LeanKMasks.from_pretrained(tmp_path)


@pytest.mark.skipif(not REFERENCE_MASKS.is_dir(), reason="../shared/reference_masks is not beside the checkout")
@pytest.mark.parametrize(("name", "ratio"), [("llama-3.1-8b-instruct", 0.3125), ("qwen2.5-7b-instruct", 0.29)])
def test_reference_masks_load_through_from_dense(name, ratio):
    from safetensors.torch import load_file

    mask = load_file(REFERENCE_MASKS / f"{name}.safetensors")["channel_mask"]
    masks = LeanKMasks.from_dense(mask, align=32)
    assert masks.keep_ratio == pytest.approx(ratio, abs=5e-3)
    assert set(masks.kept_counts.unique().tolist()) <= {0, 32, 64, 96, 128}
