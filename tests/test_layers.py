"""The import contract of our own (tests/import_contracts.py) catches what it is for."""

from __future__ import annotations

import sys
from pathlib import Path

import grimp
import pytest

from tests.import_contracts import PublicNamesContract, is_private_to, package_of


def test_packages_of_modules() -> None:
    assert package_of("farelab.card._files") == "farelab.card"
    assert package_of("farelab.card") == "farelab.card"
    assert package_of("farelab._cli") == "farelab"
    assert package_of("farelab.bench._suite") == "farelab"
    assert is_private_to("farelab.card._files", "farelab.card")
    assert not is_private_to("farelab.card", "farelab.card")


def _graph(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli_imports: str) -> grimp.ImportGraph:
    root = tmp_path / "fakeapp"
    (root / "core").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "core" / "__init__.py").write_text("from fakeapp.core._x import thing\n")
    (root / "core" / "_x.py").write_text("thing = 1\n")
    (root / "_cli.py").write_text(cli_imports)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        return grimp.build_graph("fakeapp", cache_dir=None)
    finally:
        for name in [m for m in sys.modules if m.startswith("fakeapp")]:
            del sys.modules[name]


def test_an_import_of_another_package_private_module_breaks_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    contract = PublicNamesContract("public", {}, {"root": "fakeapp"})
    graph = _graph(tmp_path, monkeypatch, "from fakeapp.core._x import thing\n")
    check = contract.check(graph, verbose=False)
    assert not check.kept
    assert check.metadata["broken"] == [
        {"importer": "fakeapp._cli", "imported": "fakeapp.core._x", "lines": [1]}
    ]


def test_public_names_keep_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    contract = PublicNamesContract("public", {}, {"root": "fakeapp"})
    graph = _graph(tmp_path, monkeypatch, "from fakeapp.core import thing\n")
    assert contract.check(graph, verbose=False).kept
