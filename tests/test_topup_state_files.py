"""Where ``farelab topup`` keeps its state: the in-process host's ledger and the kiosk journal go
to the user's data folder (platformdirs), never silently into the current folder; ``--db`` and
``--journal`` still choose, and ``--help`` says where the defaults are."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import date
from pathlib import Path

import pytest

from farelab.card import load_image, personalise, save_image
from tests.cli_support import farelab


def run(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return farelab("topup", *args, cwd=cwd, env=env)


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def places(tmp_path: Path) -> tuple[Path, Path, Path]:
    """An empty working folder, a folder with the card, and a home of its own."""
    cwd, cards, home = tmp_path / "cwd", tmp_path / "cards", tmp_path / "home"
    for folder in (cwd, cards, home):
        folder.mkdir()
    save_image(cards / "c.json", personalise(serial="31", issued=date(2026, 1, 1)))
    return cwd, cards, home


@pytest.mark.parametrize("xdg", [True, False], ids=["XDG_DATA_HOME", "HOME"])
def test_default_state_files_go_to_the_user_data_folder_not_the_current_one(
    places: tuple[Path, Path, Path], xdg: bool
) -> None:
    cwd, cards, home = places
    env = {k: v for k, v in os.environ.items() if k != "XDG_DATA_HOME"}
    env["HOME"] = str(home)
    data = home / ".local" / "share"
    if xdg:
        data = home / "data"
        env["XDG_DATA_HOME"] = str(data)
    card = str(cards / "c.json")
    loaded = run(cwd, env, "load", card, "--amount", "5", "--json")
    assert loaded.returncode == 0, loaded.stderr
    assert json.loads(loaded.stdout)["result"] == "loaded"
    refunded = run(cwd, env, "refund", card, "--json")
    assert refunded.returncode == 0, refunded.stderr
    assert files_under(cwd) == []
    state = {"farelab/farelab-host.db", "farelab/farelab-kiosk.db"}
    assert state <= set(files_under(data))
    assert load_image(cards / "c.json").balance == 0


def test_db_and_journal_still_choose(places: tuple[Path, Path, Path]) -> None:
    cwd, cards, home = places
    env = {**os.environ, "HOME": str(home), "XDG_DATA_HOME": str(home / "data")}
    mine = cards / "mine"
    mine.mkdir()
    chosen = ("--db", str(mine / "host.db"), "--journal", str(mine / "kiosk.db"))
    out = run(cwd, env, "load", str(cards / "c.json"), "--amount", "5", "--json", *chosen)
    assert out.returncode == 0, out.stderr
    assert {"host.db", "kiosk.db"} <= set(files_under(mine))
    assert files_under(cwd) == []
    assert not (home / "data").exists()  # nothing was made where nothing was kept


def test_help_says_where_the_defaults_are(places: tuple[Path, Path, Path]) -> None:
    cwd, _, home = places
    env = {**os.environ, "HOME": str(home), "XDG_DATA_HOME": str(home / "data")}
    env["COLUMNS"] = "500"  # the paths on one line each
    for command in ("load", "refund", "transfer", "kiosk"):
        out = run(cwd, env, command, "--help")
        assert out.returncode == 0, out.stderr
        assert f"default {home / 'data' / 'farelab' / 'farelab-host.db'}" in out.stdout
        assert f"default {home / 'data' / 'farelab' / 'farelab-kiosk.db'}" in out.stdout
    assert files_under(cwd) == []


def test_a_ledger_for_the_in_process_host_is_refused_beside_a_broker(
    places: tuple[Path, Path, Path],
) -> None:
    cwd, cards, home = places
    env = {**os.environ, "HOME": str(home), "XDG_DATA_HOME": str(home / "data")}
    args = ("load", str(cards / "c.json"), "--amount", "5", "--broker", "mqtt://127.0.0.1:1")
    out = run(cwd, env, *args, "--db", "x.db")
    assert out.returncode == 2
    assert "--db is the in-process host's ledger" in out.stderr
    assert "Traceback" not in out.stderr
    assert files_under(cwd) == []
