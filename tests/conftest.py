"""Fixtures shared by the suite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from farelab.backend._mosquitto import BrokerError, Mosquitto
from farelab.card import PcscdError, running_pcscd


@pytest.fixture(autouse=True)
def user_data_home(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Each test's own user data folder (XDG_DATA_HOME): a command's default state files land
    there, never in the user's real one, and no test sees another's."""
    home = tmp_path_factory.mktemp("xdg-data")
    monkeypatch.setenv("XDG_DATA_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def pcscd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A pcscd with the vpcd "Virtual PCD" readers; fails the test loudly if there is none."""
    try:
        with running_pcscd(tmp_path_factory.mktemp("pcscd") / "pcscd.log"):
            yield
    except PcscdError as exc:
        pytest.fail(f"pcscd is needed and could not be had: {exc}")


@pytest.fixture
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """A Mosquitto of our own on a free loopback port; fails the test loudly if it cannot."""
    try:
        mosquitto = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
        mosquitto.start()
    except BrokerError as exc:
        pytest.fail(f"a Mosquitto broker is needed and could not be started: {exc}")
    yield mosquitto
    mosquitto.stop()
