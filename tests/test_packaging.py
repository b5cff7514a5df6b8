"""How the package sits in the repository."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from leank_hf import zoo_names

ROOT = Path(__file__).resolve().parents[1]


def test_no_top_level_folder_hides_an_installed_package():
    """Run from the repository root (`python -m pytest` puts it first on `sys.path`), a package folder here is
    imported instead of an installed package of the same name: a top-level `kernels/` hid the Hub's `kernels`, which
    transformers >= 5.24 requires and imports, and every import of transformers failed."""
    ours = {path.name for path in ROOT.iterdir() if (path / "__init__.py").is_file()}
    ours |= {path.stem for path in ROOT.glob("*.py")}
    owners = importlib.metadata.packages_distributions()
    hidden = {name: owners[name] for name in sorted(ours) if set(owners.get(name, ["leank-hf"])) != {"leank-hf"}}
    assert not hidden, f"top-level folders of this repository hide installed packages: {hidden}"


def test_the_wheel_ships_the_type_marker_and_the_data_files(tmp_path):
    """What `pip install leank-hf` puts in site-packages: the `py.typed` marker (PEP 561, so type checkers read our
    hints), every module, the shipped mask repos and their card template, and the prose. An editable install reads
    the source folders and would show all of them whatever the package data says, so the wheel is built (offline)."""
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for folder in ("leank_hf", "hub_cards"):
        shutil.copytree(ROOT / folder, source / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    out = subprocess.run([sys.executable, "-c", build, str(tmp_path)], cwd=source, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    with zipfile.ZipFile(tmp_path / out.stdout.split()[-1]) as wheel:
        names = set(wheel.namelist())
    assert "leank_hf/py.typed" in names
    assert "leank_hf/eval/alice_in_wonderland.txt" in names and "leank_hf/hub_cards/model_card.md" in names
    modules = {path.relative_to(ROOT).as_posix() for path in (ROOT / "leank_hf").rglob("*.py")}
    missing = modules - names
    assert not missing, f"modules the wheel leaves out (a sub-package missing from pyproject.toml?): {missing}"
    for name in zoo_names():
        for file in ("leank_config.json", "leank_masks.safetensors", "README.md"):
            assert f"leank_hf/hub_cards/zoo/{name}/{file}" in names
