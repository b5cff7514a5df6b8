"""LeanKMasks: validation, dense round trips, and saving/loading a local mask repo."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file

from leank_hf import LeanKMasks
from leank_hf.masks.repo_files import CONFIG_NAME, MASKS_FIELDS, MASKS_NAME

from .helpers import REFERENCE_MASKS, aligned_mask

DROP = object()  # a value for edit_config: delete the field


@pytest.fixture(scope="module")
def saved_repo(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("saved") / "repo"
    rows = ({"method": "LeanK", "kl": 0.125},)
    LeanKMasks(aligned_mask(), base_model="org/model", model_type="llama", evaluation=rows).save_pretrained(folder)
    return folder


@pytest.fixture
def repo(saved_repo, tmp_path) -> Path:
    """A fresh copy of a saved mask repo, to damage."""
    return Path(shutil.copytree(saved_repo, tmp_path / "repo"))


def edit_config(folder: Path, edit: dict) -> None:
    """Apply `edit` to the saved config; a value of `DROP` deletes that field."""
    config = json.loads((folder / CONFIG_NAME).read_text())
    config.update(edit)
    (folder / CONFIG_NAME).write_text(json.dumps({k: v for k, v in config.items() if v is not DROP}))


def replace_masks_file(folder: Path, data: bytes) -> None:
    """Write other bytes as the masks file, with a matching checksum, so the loader gets past the checksum."""
    (folder / MASKS_NAME).write_bytes(data)
    edit_config(folder, {"masks_sha256": hashlib.sha256(data).hexdigest()})


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
    again = LeanKMasks.from_pretrained(tmp_path)
    assert again == loaded and again is not loaded and again.channel_mask is not loaded.channel_mask
    assert LeanKMasks.from_pretrained(tmp_path, recent=64).recent == 64
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["format_version"] == 1 and config["keep_ratio"] == pytest.approx(masks.keep_ratio, abs=1e-6)


def test_the_config_file_stores_every_field_of_the_masks():
    """repo_files lists the fields of leank_config.json itself (it does not import the masks class): a field added to
    LeanKMasks must be added to the format too."""
    stored = tuple(f.name for f in dataclasses.fields(LeanKMasks) if f.name != "channel_mask")
    assert stored == MASKS_FIELDS


def test_saving_leaves_a_models_config_json_alone_and_writes_none(tmp_path):
    """ModelHubMixin's own save_pretrained deletes any config.json in the folder and writes one from the constructor's
    arguments; our config is leank_config.json, and a model's config.json beside the masks stays."""
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    masks = LeanKMasks(aligned_mask(), sink=8, recent=32)
    masks.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").read_text() == '{"model_type": "llama"}'
    assert LeanKMasks.from_pretrained(tmp_path) == masks
    with pytest.raises(ValueError, match="drop config="):
        masks.save_pretrained(tmp_path / "other", config={"sink": 8})
    assert not (tmp_path / "other").exists()


def test_resave_reloads_new_content(tmp_path):
    LeanKMasks(aligned_mask(seed=0)).save_pretrained(tmp_path)
    first = LeanKMasks.from_pretrained(tmp_path)
    LeanKMasks(aligned_mask(seed=1)).save_pretrained(tmp_path)
    assert LeanKMasks.from_pretrained(tmp_path) != first


def test_an_in_place_edit_of_loaded_masks_stays_with_its_caller(repo):
    saved = LeanKMasks.from_pretrained(repo)
    mine = LeanKMasks.from_pretrained(repo)
    mine.channel_mask.logical_not_()
    mine.method["name"] = "edited"
    mine.evaluation[0]["kl"] = -1.0
    assert LeanKMasks.from_pretrained(repo) == saved
    assert saved.evaluation[0]["kl"] == 0.125


def test_a_file_replaced_behind_an_unchanged_mtime_is_reloaded(repo, tmp_path):
    first = LeanKMasks.from_pretrained(repo)
    other = LeanKMasks(aligned_mask(seed=1), base_model="org/other", model_type="llama")
    other.save_pretrained(tmp_path / "other")
    for name in (CONFIG_NAME, MASKS_NAME):
        stat = (repo / name).stat()
        shutil.copyfile(tmp_path / "other" / name, repo / name)
        os.utime(repo / name, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert LeanKMasks.from_pretrained(repo) == other != first


def test_half_written_repo_is_detected(tmp_path):
    LeanKMasks(aligned_mask(seed=0)).save_pretrained(tmp_path)
    save_file({"channel_mask": aligned_mask(seed=1).to(torch.uint8)}, tmp_path / MASKS_NAME)
    with pytest.raises(ValueError, match="checksum"):
        LeanKMasks.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"format_version": 99}, "format_version 99"),
        ({"format_version": True}, "format_version must be an integer .* got True"),  # True == 1 in Python
        ({"format_version": "1"}, "format_version must be an integer .* got '1'"),
        ({"masks_sha256": DROP}, "lacks the field.*masks_sha256"),  # it used to turn verification off
        ({"sink": DROP, "evaluation": DROP}, "lacks the field.*sink, evaluation"),
        ({"masks_sha256": "abc"}, "masks_sha256 must be the SHA-256"),
        ({"num_layers": 5}, r"declares \[5, 3, 32\]"),
        ({"num_kv_heads": 3.0}, "num_kv_heads must be an integer, got 3.0"),
        ({"head_dim": True}, "head_dim must be an integer, got True"),
        ({"sink": -3}, "sink must be an integer"),
        ({"sink": 2**70}, "sink must be an integer from 0 to 1048576"),
        ({"recent": True}, "recent must be an integer"),
        ({"block_size": None}, "block_size must be an integer"),
        ({"align": True}, "align must be a positive integer, got True"),
        ({"align": 32}, "not a multiple of the alignment 32"),
        ({"keep_ratio": 5}, "keep_ratio is 5 but the mask in leank_masks.safetensors keeps 0.666667"),
        ({"keep_ratio": True}, "keep_ratio is True"),
        ({"keep_ratio": "0.3"}, "keep_ratio is '0.3'"),
        ({"layer_types": 5}, "layer_types must be a list"),
        ({"layer_types": ["full_attention"]}, "layer_types has 1 entries but the mask has 2 layers"),
        ({"method": [1, 2]}, "method must be a dict"),
        ({"evaluation": {"kl": 0.1}}, "evaluation must be a list of dicts"),
        ({"evaluation": [[0.1]]}, "evaluation must be a list of dicts"),
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not one LeanK supports"),
        ({"model_type": ["llama"]}, "model_type must be a string or None"),
        ({"base_model": 5}, "base_model must be a string or None"),
        ({"base_model_revision": {}}, "base_model_revision must be a string or None"),
    ],
)
def test_bad_config_values_are_named_with_the_file_and_the_fix(repo, edit, match):
    edit_config(repo, edit)
    with pytest.raises(ValueError, match=match) as info:
        LeanKMasks.from_pretrained(repo)
    assert str(repo / CONFIG_NAME) in str(info.value) and "re-save" in str(info.value)


def test_keep_ratio_allows_only_the_rounding_of_the_saved_value(repo):
    saved = json.loads((repo / CONFIG_NAME).read_text())["keep_ratio"]
    edit_config(repo, {"keep_ratio": LeanKMasks(aligned_mask()).keep_ratio})  # unrounded
    LeanKMasks.from_pretrained(repo)
    edit_config(repo, {"keep_ratio": saved + 2e-6})
    with pytest.raises(ValueError, match="keep_ratio"):
        LeanKMasks.from_pretrained(repo)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"{broken", "not valid JSON"),
        (b'{"sink": NaN}', "not valid JSON.*NaN is not a JSON number"),
        (b'{"sink": 1e999}', "not valid JSON.*1e999 is out of the range"),
        (b"[]", "must hold a JSON object, found list"),
        ('{"base_model": "caf\u00e9"}'.encode("latin-1"), "not UTF-8 text"),  # used to raise UnicodeDecodeError
        (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nests JSON too deeply"),  # used to raise RecursionError
    ],
    ids=["broken", "nan", "overflow", "list", "latin-1", "deep"],
)
def test_unreadable_config_files_are_named(repo, content, match):
    (repo / CONFIG_NAME).write_bytes(content)
    with pytest.raises(ValueError, match=match) as info:
        LeanKMasks.from_pretrained(repo)
    assert str(repo / CONFIG_NAME) in str(info.value) and "re-save or re-download" in str(info.value)


@pytest.mark.parametrize(
    ("content", "edit", "match"),
    [
        (b"\x80\x04" + pickle.dumps({"channel_mask": [1, 0]})[2:], {}, "is a pickle"),  # tmp_path holds "pickle"
        (b"not a safetensors file at all", {}, "not a valid safetensors"),
        (save({"other": torch.ones(2, 3, 32, dtype=torch.uint8)}), {}, "holds no 'channel_mask' tensor"),
        (
            save({"channel_mask": torch.ones(0, 3, 32, dtype=torch.uint8)}),
            {"num_layers": 0},
            r"shape \[0, 3, 32\]; it needs at least one layer",  # `leank-hf inspect` divided by zero on it
        ),
    ],
)
def test_bad_masks_files_are_named(repo, content, edit, match):
    replace_masks_file(repo, content)
    edit_config(repo, edit)
    with pytest.raises(ValueError, match=match):
        LeanKMasks.from_pretrained(repo)


def test_missing_files_and_folders_are_named(repo):
    (repo / MASKS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=MASKS_NAME):
        LeanKMasks.from_pretrained(repo)
    (repo / CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        LeanKMasks.from_pretrained(repo)
    with pytest.raises(FileNotFoundError, match="no LeanK mask directory"):
        LeanKMasks.from_pretrained(repo / "nope")


@pytest.mark.skipif(not REFERENCE_MASKS.is_dir(), reason="../shared/reference_masks is not beside the checkout")
@pytest.mark.parametrize(("name", "ratio"), [("llama-3.1-8b-instruct", 0.3125), ("qwen2.5-7b-instruct", 0.29)])
def test_reference_masks_load_through_from_dense(name, ratio):
    from safetensors.torch import load_file

    mask = load_file(REFERENCE_MASKS / f"{name}.safetensors")["channel_mask"]
    masks = LeanKMasks.from_dense(mask, align=32)
    assert masks.keep_ratio == pytest.approx(ratio, abs=5e-3)
    assert set(masks.kept_counts.unique().tolist()) <= {0, 32, 64, 96, 128}
