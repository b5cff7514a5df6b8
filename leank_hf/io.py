"""File helpers: atomic writes and safe loading (safetensors and JSON only, never pickle)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

# Magic bytes of formats we refuse to load: zip (torch.save since 1.6) and raw pickle protocol 2+.
_PICKLE_SIGNATURES = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Run `write(tmp_path)` then move the result onto `path` in one rename, so `path` is never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the mode a plain open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Write strict JSON (NaN and infinities are refused: other readers, the Hub's included, reject them)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True, allow_nan=False)
            f.write("\n")

    atomic_write(path, write)


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata))


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the file is corrupt, re-save or re-download it") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file; refuse pickles and name corrupt files clearly."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(_PICKLE_SIGNATURES):
        raise ValueError(
            f"{path} is a pickle (torch.save) file. leank-hf never loads pickles because they can run code; "
            "convert it to safetensors in an environment you trust."
        )
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a valid safetensors file ({err}); re-save or re-download it") from err
