"""One direction of imports: depgraph (engine) ← pruning ← recovery ← evaluation ← depgraph_cli.

The contract lives in ``pyproject.toml`` (``[tool.importlinter]``) and is checked by
import-linter, which reads every import, those inside functions included.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"


def _contract() -> dict:
    config = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]
    (contract,) = config["contracts"]
    return {**contract, "root_packages": config["root_packages"]}


def test_every_package_of_the_project_is_a_layer():
    contract = _contract()
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert contract["type"] == "layers"
    assert set(contract["root_packages"]) == set(contract["layers"]) == packages
    assert contract["layers"] == ["depgraph_cli", "evaluation", "recovery", "pruning", "depgraph"]


def test_no_package_imports_one_above_it(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert lint_imports(config_filename=str(PYPROJECT), no_cache=True) == 0
