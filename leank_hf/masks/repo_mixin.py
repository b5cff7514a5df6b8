"""`MaskRepoMixin`: `save_pretrained`, `from_pretrained` and `push_to_hub` of `LeanKMasks`, on huggingface_hub's
`ModelHubMixin`.

Our logic lives in the mixin's hooks: `_save_pretrained` (the crash-safe, checksummed save of `repo_files`, with the
card of `card`), `_from_pretrained` (a local folder, a shipped short name or a Hub repo through `hub.resolve_repo`,
then the verified, memoised read of `repo_files`) and `generate_model_card`. `push_to_hub` is the mixin's (one
temporary folder, one `upload_folder` commit) with checks and clear errors around it. `save_pretrained` and
`from_pretrained` are thin overrides, because the mixin's own versions touch a `config.json` that is not ours:
saving deletes any `config.json` in the folder and may write one, and loading looks one up first (on the Hub even
for a shipped short name, failing offline, and warning for every local folder).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from huggingface_hub import HfApi, ModelCard, ModelHubMixin

from .card import heatmap_png, render_card
from .hub import check_push_target, push_errors, resolve_repo
from .repo_files import CONFIG_NAME, RepoBytes, encode_masks, load_repo, write_repo

if TYPE_CHECKING:
    from .leank_masks import LeanKMasks

T = TypeVar("T", bound="MaskRepoMixin")


class MaskRepoMixin(ModelHubMixin):
    """Saving, loading and pushing for `LeanKMasks` (see the module docstring for what comes from `ModelHubMixin`)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> MaskRepoMixin:
        # ModelHubMixin.__new__ records the JSON-able constructor arguments as a config that save_pretrained writes to
        # config.json (and sets it on the instance, which a frozen dataclass refuses). Our config is leank_config.json,
        # written by _save_pretrained from the masks themselves.
        return object.__new__(cls)

    # ------------------------------------------------------------------------------------------ the hooks
    def _save_pretrained(
        self: LeanKMasks, save_directory: Path, *, repo_id: str | None = None, overwrite_card: bool = False
    ) -> None:
        """Render every file in memory (config first: a value JSON cannot hold raises before anything is written),
        then `write_repo` them."""
        masks_bytes, config_bytes = encode_masks(self)
        card = render_card(self, repo_id).encode("utf-8")
        files = RepoBytes(masks=masks_bytes, config=config_bytes, card=card, heatmap=heatmap_png(self))
        write_repo(Path(save_directory), files, overwrite_card=overwrite_card)

    @classmethod
    def _from_pretrained(
        cls: type[T],
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | os.PathLike | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        **overrides: Any,
    ) -> T:
        """Find the repo (`resolve_repo`), read it (memoised on the files' content) and return a copy of its masks of
        our own, with `overrides` applied: an in-place edit by one caller never shows in another's."""
        directory = resolve_repo(
            model_id, revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only,
            force_download=force_download,
        )  # fmt: skip
        shared = load_repo(cls, directory)
        return dataclasses.replace(
            shared,
            channel_mask=shared.channel_mask.clone(),
            method=copy.deepcopy(shared.method),
            evaluation=copy.deepcopy(shared.evaluation),
            **overrides,
        )

    def generate_model_card(self: LeanKMasks, *args: Any, repo_id: str | None = None, **kwargs: Any) -> ModelCard:
        """The model card of these masks (`card.render_card`), in place of the mixin's generic one."""
        return ModelCard(render_card(self, repo_id))

    # -------------------------------------------------------------------------------------- public calls
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        repo_id: str | None = None,
        overwrite_card: bool = False,
        config: dict | None = None,
        push_to_hub: bool = False,
        model_card_kwargs: dict[str, Any] | None = None,
        **push_to_hub_kwargs: Any,
    ) -> str | None:
        """Write the mask repo into `save_directory`: config, masks, heatmap PNG and (if absent) a model card.

        Whatever happens (a crash, a power loss, an error, other saves to the same folder), the folder loads as the
        repo it held before or as the new one (`repo_files.write_repo`); a value that cannot be saved (NaN in an
        evaluation row) raises before anything changes. An existing README.md is kept unless `overwrite_card`.
        `repo_id` (or `model_card_kwargs["repo_id"]`, as the mixin's `push_to_hub` passes it) names the repo in a new
        card's usage snippet. `push_to_hub=True` then pushes to `repo_id` (default: the folder's name) with
        `push_to_hub_kwargs`, as the mixin's `save_pretrained` does, and returns the commit URL.
        """
        if config is not None:
            raise ValueError(f"LeanK masks keep their settings in {CONFIG_NAME}, written from the masks; drop config=")
        card_repo = (model_card_kwargs or {}).get("repo_id", repo_id)
        self._save_pretrained(Path(save_directory), repo_id=card_repo, overwrite_card=overwrite_card)
        if push_to_hub:
            return self.push_to_hub(repo_id or Path(save_directory).name, **push_to_hub_kwargs)
        return None

    @classmethod
    def from_pretrained(
        cls: type[T],
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        force_download: bool = False,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
        **overrides: Any,
    ) -> T:
        """Load a mask repo: a local directory, a shipped mask by short name (`leank_hf.zoo_names()`), or a Hub repo.

        Hub downloads go through `huggingface_hub.snapshot_download` (its cache, `HF_HUB_OFFLINE`, `HF_ENDPOINT`) and
        fetch only the config and the masks. Parsing is memoised on the files' content, so loading again only reads,
        compares and copies two small files; each call returns its own masks. `overrides` replace saved fields, e.g.
        ``recent=768``.
        """
        return cls._from_pretrained(
            model_id=str(pretrained_model_name_or_path), revision=revision, cache_dir=cache_dir,
            force_download=force_download, local_files_only=local_files_only, token=token, **overrides,
        )  # fmt: skip

    def push_to_hub(
        self: LeanKMasks,
        repo_id: str,
        *,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
    ) -> str:
        """Create `repo_id` on the Hub if needed and upload this mask repo with its card in one commit (the mixin's
        `push_to_hub`); return the commit URL, or the pull request's with `create_pr=True`.

        `revision` pushes to that branch, created from the default branch if missing. A malformed repo id raises a
        `ValueError`; no token, a refused token and an unreachable Hub raise an `OSError` that says what to do.
        """
        check_push_target(repo_id, token)
        with push_errors(repo_id):
            if revision is not None and not create_pr:
                api = HfApi(token=token)
                api.create_repo(repo_id, private=private, exist_ok=True)  # a branch needs its repo
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            commit = super().push_to_hub(
                repo_id,
                commit_message=commit_message or f"Upload LeanK masks (keep ratio {self.keep_ratio:.3f})",
                private=private,
                token=token,
                branch=revision,
                create_pr=create_pr,
                model_card_kwargs={"repo_id": repo_id},
            )
        return commit.pr_url or commit.commit_url
