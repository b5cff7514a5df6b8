"""File helpers: crash-safe writes, folder locks and safe loading (safetensors and JSON only, never pickle)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load

try:
    import fcntl
except ImportError:  # Windows: folders are not locked (see directory_lock)
    fcntl = None

_TEMP_SUFFIX = ".tmp"
# Magic bytes of formats we refuse to load: zip (torch.save since 1.6) and raw pickle protocol 2+.
_PICKLE_SIGNATURES = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Run `write(tmp_path)`, sync the file to disk, then move it onto `path` in one rename and sync the folder.

    `path` is never half-written, and after a crash or a power loss it holds the old content or the new. The
    temporary file is hidden, beside `path` (`temp_glob` matches it), and removed if `write` fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name.lstrip('.')}.{secrets.token_hex(8)}{_TEMP_SUFFIX}")
    try:
        write(str(tmp))
        fd = os.open(tmp, os.O_RDWR)  # fsync wants a writable descriptor on some systems
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        replace_durably(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """`atomic_write` of bytes already in memory."""
    atomic_write(path, lambda tmp: _write_all(tmp, data))


def _write_all(path: str, data: bytes) -> None:
    # Created like open() would create it (mode 0o666 less the umask); O_EXCL: the temporary name is ours alone.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def temp_glob(name: str) -> str:
    """Glob of the temporary files that `atomic_write` to a file called `name` leaves if killed."""
    return f".{name.lstrip('.')}.*{_TEMP_SUFFIX}"


def replace_durably(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """`os.replace`, then sync the folder so that the rename survives a power loss."""
    os.replace(source, target)
    if os.name == "posix":  # Windows cannot open a folder to sync it
        fd = os.open(Path(target).parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def directory_lock(path: str | os.PathLike, *, shared: bool = False) -> Iterator[None]:
    """Hold an exclusive (writers) or shared (readers) lock on the folder `path` while in the block.

    The lock is `flock` on a descriptor of the folder itself, so no lock file litters it; it is released when the
    block ends or the process dies. Where there is no `fcntl` (Windows), or the folder cannot be opened or locked
    (some network filesystems refuse `flock`), the block runs unlocked: each file is still replaced atomically, but
    two saves to one folder at once are no longer kept apart.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        fd = None
    try:
        if fd is not None and fcntl is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)


def json_bytes(data: dict[str, Any], name: str) -> bytes:
    """`data` as the strict JSON text of the file `name`; a value JSON cannot hold raises naming its field.

    NaN and infinities are refused (other readers, the Hub's included, reject them), and so are keys that are not
    strings (JSON would turn them into strings, so the file would not load back as saved).
    """
    for key, value in data.items():
        _check_json(value, key, name)
    return (json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")


def _check_json(value: object, where: str, name: str) -> None:
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot write {name}: {where} is {value}, which JSON cannot hold; use a number or None")
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(
                    f"cannot write {name}: {where} has the key {key!r}; JSON keys are strings, use {str(key)!r}"
                )
            _check_json(item, f"{where}[{key!r}]", name)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_json(item, f"{where}[{index}]", name)
    else:
        raise ValueError(
            f"cannot write {name}: {where} is a {type(value).__name__}, which JSON cannot hold; store numbers, "
            "strings, lists and dicts (e.g. tensor.tolist())"
        )


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Write `data` as strict JSON (see `json_bytes`) with `atomic_write`."""
    atomic_write_bytes(path, json_bytes(data, Path(path).name))


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
