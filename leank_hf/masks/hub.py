"""Where mask repos come from (a local folder, the shipped zoo, or the Hugging Face Hub), Hub ids, and what a refused
or failed push means to the user."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from urllib.parse import urlparse

from huggingface_hub import constants, get_token, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from .repo_files import CONFIG_NAME, MASKS_NAME

# Files of a mask repo that loading needs (the card and its image are for people).
REPO_FILES = (CONFIG_NAME, MASKS_NAME)

LOG_IN = "log in with `hf auth login`, set HF_TOKEN, or pass token="


def as_hub_id(name: str | None) -> str | None:
    """`name` if it is a well-formed Hub repo id (`org/name` or `name`), else None: a filesystem path such as
    `/tmp/model` must never become a link to `https://huggingface.co//tmp/model`."""
    if name is None:
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def hub_id_from_url(url: str) -> str | None:
    """The model repo id in a `https://huggingface.co/org/name[/...]` URL; None for other sites, datasets, Spaces."""
    parsed = urlparse(url)
    parts = [part for part in parsed.path.split("/") if part]
    if parsed.hostname not in ("huggingface.co", "hf.co") or not parts or parts[0] in ("datasets", "spaces"):
        return None
    return as_hub_id("/".join(parts[:2]))


def zoo_names() -> list[str]:
    """Short names of the mask repos shipped with leank-hf (see `hub_cards/zoo/`)."""
    zoo = resources.files("leank_hf.hub_cards") / "zoo"
    return sorted(entry.name for entry in zoo.iterdir() if entry.is_dir() and (entry / REPO_FILES[0]).is_file())


def resolve_repo(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
) -> Path:
    """Local folder holding the mask repo `name_or_path`: a directory, a zoo short name, or a Hub repo id.

    Local directories win; then the shipped zoo; then the Hub through `snapshot_download`, which honours
    `HF_HUB_OFFLINE`, `HF_ENDPOINT` and the Hub cache.
    """
    path = Path(name_or_path)
    if path.is_dir():
        return path
    name = str(name_or_path)
    if name in zoo_names():
        return Path(str(resources.files("leank_hf.hub_cards") / "zoo" / name))
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"no LeanK mask directory at {name!r}")
    try:
        folder = snapshot_download(
            name,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            force_download=force_download,
            allow_patterns=list(REPO_FILES),
        )
    except LocalEntryNotFoundError as err:
        raise OSError(
            f"LeanK mask repo {name!r} is neither a local directory, a shipped mask ({', '.join(zoo_names())}), "
            "nor in the local Hub cache, and the Hub cannot be reached (offline mode, local_files_only=True, or no "
            f"connection). Download it once while online, or pass a local directory. ({err})"
        ) from err
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise OSError(
            f"{name!r} is not a local directory, not a shipped mask ({', '.join(zoo_names())}), and the Hub has no "
            f"such repo{f' at revision {revision!r}' if revision else ''} (or it is private: pass token=). ({err})"
        ) from err
    except (EntryNotFoundError, HfHubHTTPError) as err:
        raise OSError(f"could not download the LeanK mask repo {name!r} from the Hub: {err}") from err
    return Path(folder)


def check_push_target(repo_id: str, token: str | None) -> None:
    """Refuse a push that cannot succeed, before any request: a malformed repo id (`ValueError`) or no token at all
    (`OSError`; the Hub would answer 401)."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"cannot push to {repo_id!r}: {err}") from None
    if token is None and get_token() is None:
        raise OSError(f"pushing {repo_id!r} to the Hub needs a Hugging Face token with write access: {LOG_IN}")


@contextlib.contextmanager
def push_errors(repo_id: str) -> Iterator[None]:
    """Turn the Hub's refusals and network failures inside the block into `OSError`s that say what to do, instead of
    the HTTP client's exceptions."""
    try:
        yield
    except HfHubHTTPError as err:
        raise _push_refused(err, repo_id) from err
    except _transport_errors() as err:
        raise OSError(
            f"could not reach the Hugging Face Hub at {constants.ENDPOINT} to push {repo_id!r} "
            f"({type(err).__name__}: {err}); check the network connection (and proxy), and HF_ENDPOINT if you set it"
        ) from err


def _push_refused(err: HfHubHTTPError, repo_id: str) -> OSError:
    """The Hub's refusal of a push as an error that says what to do."""
    status = getattr(err.response, "status_code", None)
    if status == 401:
        return OSError(f"the Hub did not accept the token for pushing {repo_id!r} (401 Unauthorized): {LOG_IN}")
    if status == 403:
        return OSError(
            f"the token may not write to {repo_id!r} (403 Forbidden): use a token with write access to that "
            f"namespace ({LOG_IN}), or push to a repo of your own"
        )
    return OSError(f"the Hub refused the push to {repo_id!r}: {err}")


def _transport_errors() -> tuple[type[Exception], ...]:
    """Network errors of huggingface_hub's HTTP client: httpx under huggingface_hub 1.x, httpx2 under 2.x."""
    names = [name for name in ("httpx2", "httpx") if importlib.util.find_spec(name) is not None]
    return tuple(importlib.import_module(name).TransportError for name in names)
