"""Saving a mask repo over an existing one: killed at any step, failing, or racing other writers and readers, the
folder always loads as the old repo or the new one."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from leank_hf import LeanKMasks
from leank_hf.masks.repo_files import CONFIG_NAME, MASKS_NAME, encode_masks

from .helpers import aligned_mask

REPO_FILES = {CONFIG_NAME, MASKS_NAME, "README.md", "mask_heatmap.png"}
OLD = LeanKMasks(aligned_mask(seed=0), base_model="org/old", model_type="llama", method={"name": "old"})
NEW = LeanKMasks(aligned_mask(seed=1), base_model="org/new", model_type="llama", method={"name": "new"})

# Runs in a fresh interpreter: imports once, then for step k = 1, 2, ... copies the old repo and forks a child that
# saves the new masks over it and SIGKILLs itself at its k-th filesystem call (half a write for os.write), until a
# child gets through the whole save. After each kill it keeps a copy of the folder as the crash left it, then saves
# again over the crashed folder (unhooked). Forking saves importing torch for every step (seconds each); the heatmap
# is a stand-in (drawing it takes 0.3 s and touches no file of the repo).
CRASH_SERVER = r"""
import os, shutil, signal, sys, traceback
from pathlib import Path

import torch

torch.set_num_threads(1)  # no thread pool in the process that forks
from leank_hf import LeanKMasks
from leank_hf.masks import repo_mixin

repo_mixin.heatmap_png = lambda masks: b"\x89PNG"
old, new, work = map(Path, sys.argv[1:])
masks = LeanKMasks.from_pretrained(new)
masks.save_pretrained(work / "warm-up")  # the first save loads what it needs before forking


def kill_at(step):
    calls = [0]

    def hook(name, real):
        def call(*args, **kwargs):
            calls[0] += 1
            if calls[0] == step:
                if name == "write":
                    real(args[0], bytes(args[1])[: len(args[1]) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        return call

    for name in ("open", "write", "fsync", "replace", "rename", "unlink", "rmdir"):
        setattr(os, name, hook(name, getattr(os, name)))


step = 0
while True:
    step += 1
    target = work / f"step-{step}"
    shutil.copytree(old, target)
    pid = os.fork()
    if pid == 0:
        try:
            kill_at(step)
            masks.save_pretrained(target, overwrite_card=True)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.WIFEXITED(status):
        assert os.WEXITSTATUS(status) == 0, f"the save failed at step {step} instead of being killed"
        shutil.rmtree(target)
        print(step - 1)
        break
    assert os.WTERMSIG(status) == signal.SIGKILL, status
    shutil.copytree(target, work / f"crashed-{step}")
    masks.save_pretrained(target, overwrite_card=True)
"""


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of `folder`, hidden ones included, with its bytes and modification time."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}


def loads_as(folder: Path) -> str:
    loaded = LeanKMasks.from_pretrained(folder)
    assert loaded in (OLD, NEW), f"{folder} loads as a mix of the old and the new repo"
    return "old" if loaded == OLD else "new"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_save_killed_at_any_filesystem_step_leaves_the_old_or_the_new_repo(tmp_path):
    OLD.save_pretrained(tmp_path / "old")
    for litter in (f".leank_masks.{'0' * 64}.safetensors", ".leank_config.json.0123456789abcdef.tmp"):
        (tmp_path / "old" / litter).write_bytes(b"left by a save killed earlier")  # the save removes them: more steps
    NEW.save_pretrained(tmp_path / "new")
    work = tmp_path / "work"
    work.mkdir()
    server = subprocess.run(
        [sys.executable, "-c", CRASH_SERVER, str(tmp_path / "old"), str(tmp_path / "new"), str(work)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert server.returncode == 0, server.stderr
    steps = int(server.stdout.split()[-1])
    assert steps >= 20, "the hooks saw too few filesystem calls to test anything"
    outcomes = []
    for step in range(1, steps + 1):
        crashed = work / f"crashed-{step}"
        assert {p.name for p in crashed.iterdir() if not p.name.startswith(".")} <= REPO_FILES, step
        outcomes.append(loads_as(crashed))
        resaved = work / f"step-{step}"
        assert {p.name for p in resaved.iterdir()} == REPO_FILES, "a later save removes what the killed one left"
        assert LeanKMasks.from_pretrained(resaved) == NEW
    # Killed early, the old repo stays; from the commit on, the new one loads: once switched, it never goes back.
    switch = outcomes.index("new")
    assert outcomes == ["old"] * switch + ["new"] * (steps - switch) and 0 < switch < steps


def test_a_repo_caught_between_commit_and_rename_loads_the_pending_masks(tmp_path):
    OLD.save_pretrained(tmp_path / "repo")
    NEW.save_pretrained(tmp_path / "new")
    new_config = (tmp_path / "new" / CONFIG_NAME).read_bytes()
    pending = tmp_path / "repo" / f".leank_masks.{json.loads(new_config)['masks_sha256']}.safetensors"
    pending.write_bytes((tmp_path / "new" / MASKS_NAME).read_bytes())
    (tmp_path / "repo" / CONFIG_NAME).write_bytes(new_config)
    assert LeanKMasks.from_pretrained(tmp_path / "repo") == NEW
    pending.write_bytes((tmp_path / "repo" / MASKS_NAME).read_bytes())  # a pending file must match its name
    with pytest.raises(ValueError, match="does not match the checksum"):
        LeanKMasks.from_pretrained(tmp_path / "repo")


@pytest.mark.parametrize(
    ("masks", "match"),
    [
        (NEW.replace(evaluation=[{"kl": math.nan}]), r"evaluation\[0\]\['kl'\] is nan"),
        (NEW.replace(evaluation=[{"kl": math.inf}]), r"evaluation\[0\]\['kl'\] is inf"),
        (NEW.replace(method={"name": "x", "scores": torch.ones(2)}), r"method\['scores'\] is a Tensor"),
        (NEW.replace(evaluation=[{1: 0.5}]), r"evaluation\[0\] has the key 1"),
    ],
)
def test_a_config_that_is_not_json_raises_before_any_file_changes(tmp_path, masks, match):
    OLD.save_pretrained(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=match) as info:
        masks.save_pretrained(tmp_path)
    assert CONFIG_NAME in str(info.value)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("failing", [1, 2, 3, 4])
def test_a_write_that_fails_leaves_the_old_or_the_new_repo_and_no_temp_files(tmp_path, monkeypatch, failing):
    """The 1st and 2nd writes (new masks, config) come before the commit; the 3rd and 4th (heatmap, card) after."""
    from leank_hf.masks import io

    OLD.save_pretrained(tmp_path)
    before = snapshot(tmp_path)
    real, calls = io._write_all, []

    def disk_full(path, data):
        calls.append(path)
        if len(calls) == failing:
            real(path, data[: len(data) // 2])
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(io, "_write_all", disk_full)
    with pytest.raises(OSError, match="No space left"):
        NEW.save_pretrained(tmp_path, overwrite_card=True)
    monkeypatch.undo()
    if failing <= 2:
        assert snapshot(tmp_path) == before
    else:
        assert {p.name for p in tmp_path.iterdir()} == REPO_FILES and LeanKMasks.from_pretrained(tmp_path) == NEW


def test_racing_writers_and_a_reader_see_one_whole_repo_or_the_other(tmp_path, monkeypatch):
    # The heatmap is for people: a stand-in keeps the rounds fast.
    monkeypatch.setattr("leank_hf.masks.repo_mixin.heatmap_png", lambda masks: b"\x89PNG")
    first = LeanKMasks(aligned_mask(seed=2), base_model="org/first", method={"name": "first"})
    # Same keep ratio, other channels and config: a mix of the two would pass every check but the checksum.
    second = LeanKMasks(aligned_mask(seed=2).flip(-1), base_model="org/second", method={"name": "second"})
    first.save_pretrained(tmp_path)
    errors, seen, done = [], set(), threading.Event()

    def write(masks: LeanKMasks) -> None:
        try:
            for _ in range(40):
                masks.save_pretrained(tmp_path)
        except BaseException as err:
            errors.append(err)

    def read() -> None:
        while not done.is_set():
            try:
                loaded = LeanKMasks.from_pretrained(tmp_path)
            except BaseException as err:
                errors.append(err)
                return
            if loaded not in (first, second):
                errors.append(AssertionError(f"a reader loaded a mix: {loaded.base_model} {loaded.to_config_dict()}"))
                return
            seen.add(loaded.base_model)

    writers = [threading.Thread(target=write, args=(masks,)) for masks in (first, second)]
    reader = threading.Thread(target=read)
    for thread in (*writers, reader):
        thread.start()
    for thread in writers:
        thread.join()
    done.set()
    reader.join()
    assert not errors, errors
    assert seen, "the reader never got a load in"
    assert LeanKMasks.from_pretrained(tmp_path) in (first, second)
    assert {p.name for p in tmp_path.iterdir()} == REPO_FILES


def test_equal_masks_are_saved_as_equal_bytes():
    """Saving is reproducible: the same masks give the same files and checksum, call after call."""
    masks = LeanKMasks(aligned_mask(), base_model="org/model")
    assert len({encode_masks(masks) for _ in range(20)}) == 1
