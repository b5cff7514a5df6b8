"""How the package sits in the repository."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

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
