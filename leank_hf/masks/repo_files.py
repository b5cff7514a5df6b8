"""The files of a mask repo (format version 1): their names and bytes, the crash-safe save and the verified read.

A save commits by replacing `leank_config.json`, which names the SHA-256 of the masks file; a read takes a masks file
only if it matches that checksum, so a folder always reads as one whole repo. Only safetensors and JSON are read.
This module knows the format, not the masks class: reading builds whatever class it is given from the checked fields.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from safetensors.torch import save

from .io import (
    atomic_write_bytes,
    directory_lock,
    json_bytes,
    json_from_bytes,
    replace_durably,
    safetensors_from_bytes,
    temp_glob,
)

if TYPE_CHECKING:
    from .leank_masks import LeanKMasks

M = TypeVar("M", bound="LeanKMasks")

CONFIG_NAME = "leank_config.json"
MASKS_NAME = "leank_masks.safetensors"
CARD_NAME = "README.md"
HEATMAP_NAME = "mask_heatmap.png"
FORMAT_VERSION = 1
MASK_TENSOR = "channel_mask"
# Where a save puts the new masks until the config naming their SHA-256 is in place (see write_repo).
_PENDING_MASKS = ".leank_masks.{}.safetensors"

# Fields of leank_config.json, all required: the LeanKMasks fields it stores, then those only the file has.
# (tests/test_masks.py holds the first list against the dataclass.)
MASKS_FIELDS = (
    "sink", "recent", "block_size", "align", "layer_types", "model_type", "base_model", "base_model_revision",
    "method", "evaluation",
)  # fmt: skip
FILE_FIELDS = ("format_version", "num_layers", "num_kv_heads", "head_dim", "keep_ratio", "masks_sha256")


def encode_masks(masks: LeanKMasks) -> tuple[bytes, bytes]:
    """The bytes of the masks file and of the config naming its SHA-256; a value JSON cannot hold raises here."""
    # One metadata key: safetensors writes several in an order that changes from call to call, and equal masks must
    # give equal bytes (and checksums). The model they are for is in the config.
    masks_bytes = save({MASK_TENSOR: masks.channel_mask.to(torch.uint8)}, metadata={"format": "pt"})
    config = json_bytes({**masks.to_config_dict(), "masks_sha256": sha256(masks_bytes)}, CONFIG_NAME)
    return masks_bytes, config


@dataclass(frozen=True)
class RepoBytes:
    """Every file of a mask repo, rendered in memory before the first write."""

    masks: bytes
    config: bytes
    card: bytes
    heatmap: bytes


def write_repo(directory: Path, files: RepoBytes, *, overwrite_card: bool = False) -> None:
    """Write `files` into `directory` so that, whatever happens, it loads as the repo it held or as the new one.

    The new masks go under a hidden pending name holding their SHA-256; replacing the config, which names that
    checksum, is the single commit point; then the pending file is renamed onto the masks file (loading finds it under
    either name). Files and renames are synced to disk, saves to one folder take turns (`directory_lock`), and each
    save removes what killed ones left. The heatmap and card, which are for people, follow the commit; an existing
    README.md is kept (it may have been edited by hand) unless `overwrite_card`.
    """
    directory.mkdir(parents=True, exist_ok=True)
    pending = directory / _PENDING_MASKS.format(sha256(files.masks))
    with directory_lock(directory):
        try:
            atomic_write_bytes(pending, files.masks)
            atomic_write_bytes(directory / CONFIG_NAME, files.config)  # the commit point
            replace_durably(pending, directory / MASKS_NAME)
        finally:
            _remove_stale_files(directory)
        atomic_write_bytes(directory / HEATMAP_NAME, files.heatmap)
        if overwrite_card or not (directory / CARD_NAME).exists():
            atomic_write_bytes(directory / CARD_NAME, files.card)


def _remove_stale_files(directory: Path) -> None:
    """Remove what failed or killed saves left: temporary files, and pending masks that the config does not name."""
    config_path = directory / CONFIG_NAME
    try:
        named = _PENDING_MASKS.format(read_config(config_path.read_bytes(), config_path)["masks_sha256"])
    except FileNotFoundError:
        named = None
    except ValueError:
        return  # the config cannot be read, so it may name any pending file: keep them
    any_pending = _PENDING_MASKS.format("*")
    for pattern in (any_pending, *map(temp_glob, (CONFIG_NAME, MASKS_NAME, CARD_NAME, HEATMAP_NAME, any_pending))):
        for path in directory.glob(pattern):
            if path.name != named:
                path.unlink(missing_ok=True)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a count


def load_repo(cls: type[M], directory: Path) -> M:
    """The masks of the repo in `directory`, as `cls`; shared by every caller with the same files, so copy them."""
    return _parse_repo(cls, *_read_repo(directory))


def _read_repo(directory: Path) -> tuple[Path, bytes, Path, bytes]:
    """Paths and bytes of the config of the repo in `directory` and of the masks file it names by checksum.

    A save commits by replacing the config; its masks wait under their pending name until renamed onto MASKS_NAME.
    A read racing a save can miss both (the config read before the commit, the masks file after the rename), so it
    reads once more under a shared lock on the folder, which waits for the save to end.
    """
    found = _read_matching_files(directory)
    if found is None:
        with directory_lock(directory, shared=True):
            found = _read_matching_files(directory)
    if found is None:
        masks_path = directory / MASKS_NAME
        _read_repo_file(masks_path)  # a missing file is named as such
        raise ValueError(
            f"{masks_path} does not match the checksum in {CONFIG_NAME}: the repo was modified or half-written; "
            "re-save or re-download it"
        )
    return found


def _read_matching_files(directory: Path) -> tuple[Path, bytes, Path, bytes] | None:
    config_path = directory / CONFIG_NAME
    config_bytes = _read_repo_file(config_path)
    sha = read_config(config_bytes, config_path)["masks_sha256"]
    for masks_path in (directory / MASKS_NAME, directory / _PENDING_MASKS.format(sha)):
        with contextlib.suppress(FileNotFoundError):
            masks_bytes = masks_path.read_bytes()
            if sha256(masks_bytes) == sha:
                return config_path, config_bytes, masks_path, masks_bytes
    return None


def _read_repo_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except (FileNotFoundError, IsADirectoryError) as err:
        raise FileNotFoundError(f"{path.parent} is not a LeanK mask repo: {path.name} is missing") from err


def read_config(data: bytes, path: Path) -> dict[str, Any]:
    """The config of a mask repo from its bytes, with the fields that say how to read the rest checked."""
    config = json_from_bytes(data, path)
    missing = [name for name in (*FILE_FIELDS, *MASKS_FIELDS) if name not in config]
    if missing:
        raise ValueError(
            f"{path} lacks the field(s) {', '.join(missing)}; it is not a complete mask repo config: re-save the "
            "masks with leank-hf (or restore the file)"
        )
    version = config["format_version"]
    if not _is_int(version):
        raise ValueError(
            f"{path}: format_version must be an integer (this leank-hf reads version {FORMAT_VERSION}), got "
            f"{version!r}; the file was edited by hand: re-save or re-download it"
        )
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {version!r}; this leank-hf reads version {FORMAT_VERSION}. Upgrade "
            "leank-hf or re-save the masks with this version."
        )
    sha = config["masks_sha256"]
    if not isinstance(sha, str) or len(sha) != 64 or sha.strip("0123456789abcdef"):
        raise ValueError(
            f"{path}: masks_sha256 must be the SHA-256 of {MASKS_NAME} as 64 lowercase hex digits, got {sha!r:.80}; "
            "re-save the masks"
        )
    return config


@functools.lru_cache(maxsize=32)
def _parse_repo(cls: type[M], config_path: Path, config_bytes: bytes, masks_path: Path, masks_bytes: bytes) -> M:
    """The masks of a repo whose files `_read_repo` checked; errors name the file, the field and the fix.

    Memoised on the paths and the bytes (a few KB each): a file replaced behind an unchanged modification time is
    parsed again. The result is shared by every caller with these bytes, so callers copy it.
    """
    config = read_config(config_bytes, config_path)
    fix = f"fix that field of {config_path.name} or re-save the masks"
    for name in ("num_layers", "num_kv_heads", "head_dim"):
        if not _is_int(config[name]):
            raise ValueError(f"{config_path}: {name} must be an integer, got {config[name]!r:.80}; {fix}")
    tensors = safetensors_from_bytes(masks_bytes, masks_path)
    if MASK_TENSOR not in tensors:
        raise ValueError(f"{masks_path} holds no {MASK_TENSOR!r} tensor (found {sorted(tensors)}); re-save the masks")
    mask = tensors[MASK_TENSOR]
    declared = [config["num_layers"], config["num_kv_heads"], config["head_dim"]]
    if list(mask.shape) != declared:
        raise ValueError(
            f"{masks_path} holds a mask of shape {list(mask.shape)} but {config_path} declares {declared} "
            "(num_layers, num_kv_heads, head_dim); re-save the masks"
        )
    try:
        masks = cls(mask, **{name: config[name] for name in MASKS_FIELDS})
    except ValueError as err:
        raise ValueError(f"{config_path}: {err}; {fix}") from err
    keep_ratio = config["keep_ratio"]
    # The file holds round(keep_ratio, 6); allow that rounding and nothing more.
    if (
        isinstance(keep_ratio, bool)
        or not isinstance(keep_ratio, (int, float))
        or abs(keep_ratio - masks.keep_ratio) > 1e-6
    ):
        raise ValueError(
            f"{config_path}: keep_ratio is {keep_ratio!r:.80} but the mask in {masks_path.name} keeps "
            f"{masks.keep_ratio:.6f} of the key channels; {fix}"
        )
    return masks
