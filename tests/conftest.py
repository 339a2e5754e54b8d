"""Fixtures shared by the suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.pcscd import PcscdError, running_pcscd


@pytest.fixture(scope="session")
def pcscd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A pcscd with the vpcd "Virtual PCD" readers; fails the test loudly if there is none."""
    try:
        with running_pcscd(tmp_path_factory.mktemp("pcscd") / "pcscd.log"):
            yield
    except PcscdError as exc:
        pytest.fail(f"pcscd is needed and could not be had: {exc}")
