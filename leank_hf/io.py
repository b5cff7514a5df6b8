"""File helpers: atomic writes and safe loading (safetensors and JSON only, never pickle)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

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
    return json_from_bytes(path.read_bytes(), path)


def json_from_bytes(data: bytes, path: str | os.PathLike) -> dict[str, Any]:
    """Parse the bytes of the JSON file `path` (named in errors): a UTF-8 JSON object, strict (no NaN)."""
    fix = "the file is corrupt; re-save or re-download it"
    try:
        parsed = json.loads(data.decode("utf-8"), parse_constant=_refuse_constant, parse_float=_finite_float)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err}); {fix}") from err
    except ValueError as err:  # a JSONDecodeError, or NaN / Infinity
        raise ValueError(f"{path} is not valid JSON ({err}); {fix}") from err
    except RecursionError as err:
        raise ValueError(f"{path} nests JSON too deeply to be a file leank-hf wrote; {fix}") from err
    if not isinstance(parsed, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(parsed).__name__}; {fix}")
    return parsed


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number (strict JSON has no NaN or infinities)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of the range of a float")
    return value


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file; refuse pickles and name corrupt files clearly."""
    path = Path(path)
    return safetensors_from_bytes(path.read_bytes(), path)


def safetensors_from_bytes(data: bytes, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Parse the bytes of the safetensors file `path` (named in errors); refuse pickles."""
    if data.startswith(_PICKLE_SIGNATURES):
        raise ValueError(
            f"{path} is a pickle (torch.save) file. leank-hf never loads pickles because they can run code; "
            "convert it to safetensors in an environment you trust."
        )
    try:
        return load(data)
    except SafetensorError as err:
        raise ValueError(f"{path} is not a valid safetensors file ({err}); re-save or re-download it") from err
