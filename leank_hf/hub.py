"""Where mask repos come from (a local folder, the shipped zoo, or the Hugging Face Hub) and how they are pushed."""

from __future__ import annotations

import os
import tempfile
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

if TYPE_CHECKING:
    from .masks import LeanKMasks

# Files of a mask repo that loading needs (the card and its image are for people).
REPO_FILES = ("leank_config.json", "leank_masks.safetensors")


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


def push_masks(
    masks: LeanKMasks,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    api: HfApi | None = None,
) -> str:
    """Create `repo_id` if needed and upload the saved mask repo (with its card) in one commit; return its URL."""
    api = api or HfApi(token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision is not None and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory(prefix="leank-push-") as folder:
        masks.save_pretrained(folder, repo_id=repo_id)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            revision=revision,
            create_pr=create_pr,
            commit_message=commit_message or f"Upload LeanK masks (keep ratio {masks.keep_ratio:.3f})",
        )
    return str(getattr(commit, "pr_url", None) or getattr(commit, "commit_url", None) or repo_url)
