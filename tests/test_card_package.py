"""farelab.card imports each public name from its module on first use: every name of ``__all__``
is there, is the very object its module defines, and the table that finds it says what the
imports for type checkers say."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import farelab.card


def _typed_imports() -> dict[str, tuple[str, str]]:
    """The ``if TYPE_CHECKING:`` imports of farelab/card/__init__.py: name → (module, name)."""
    tree = ast.parse(Path(farelab.card.__file__).read_text(encoding="utf-8"))
    found: dict[str, tuple[str, str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("farelab.card."):
            module = (node.module or "").removeprefix("farelab.card.")
            for alias in node.names:
                found[alias.asname or alias.name] = (module, alias.name)
    return found


def test_every_public_name_has_a_home_and_the_typed_imports_agree() -> None:
    assert _typed_imports() == farelab.card._HOMES
    assert set(farelab.card._HOMES) == set(farelab.card.__all__)


@pytest.mark.parametrize("name", sorted(farelab.card.__all__))
def test_a_public_name_is_its_modules_object(name: str) -> None:
    module, attr = farelab.card._HOMES[name]
    home = importlib.import_module(f"farelab.card.{module}")
    assert getattr(farelab.card, name) is getattr(home, attr)


def test_an_unknown_name_is_an_import_error() -> None:
    with pytest.raises(ImportError, match="nosuch"):
        from farelab.card import nosuch  # noqa: F401, PLC0415
    with pytest.raises(AttributeError):
        farelab.card._image_of_nothing  # noqa: B018


def test_dir_lists_the_names_not_yet_loaded() -> None:
    assert set(farelab.card.__all__) <= set(dir(farelab.card))


def test_importing_the_package_loads_none_of_its_modules() -> None:
    code = "import sys, farelab.card; print(sorted(m for m in sys.modules if 'farelab.card.' in m))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_a_name_loads_its_module_only() -> None:
    code = (
        "import sys\n"
        "from farelab.card import fen_to_yuan\n"
        "print(sorted(m for m in sys.modules if 'farelab.card.' in m))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "['farelab.card._messages', 'farelab.card._money']"
