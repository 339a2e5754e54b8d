"""The commands a testbed calls by the thousand load only what they use: no numpy, database
driver, MQTT client, plotting or terminal-UI library, and ``card show`` and ``--help`` no cipher
library, PC/SC binding or simulated applet either (their cost is measured in bench/)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from farelab._cli import COMMANDS, build_parser

HEAVY = ("numpy", "psycopg", "matplotlib", "rich", "aiomqtt", "amqtt", "paho")


def _imported(args: list[str], cwd: Path) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "farelab", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return {
        line.rsplit("|", 1)[1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


@pytest.mark.parametrize(
    "args",
    [["--help"], ["card", "new", "c.card"], ["card", "show", "c.card"], ["card", "--help"]],
    ids=["help", "card-new", "card-show", "card-help"],
)
def test_light_commands_import_no_heavy_module(tmp_path: Path, args: list[str]) -> None:
    if args[:2] == ["card", "show"]:
        _imported(["card", "new", "c.card"], tmp_path)
    modules = _imported(args, tmp_path)
    assert "farelab.card" in modules or args == ["--help"]
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY)
    assert heavy == []


# Loaded by farelab.card's __getattr__ (importlib), which -X importtime does not report: asked of
# sys.modules in the command's own process instead.
_LOADED = (
    "import sys\n"
    "from farelab._cli import main\n"
    "try:\n"
    "    main(sys.argv[1:])\n"
    "finally:\n"
    "    sys.stderr.write('\\nMODULES ' + ' '.join(sorted(sys.modules)))\n"
)


def _loaded(args: list[str], cwd: Path) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", _LOADED, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return set(done.stderr.rpartition("\nMODULES ")[2].split())


#: What reading a card image or listing the commands needs none of: the cipher library, pyscard,
#: the applet and the terminal flows, asyncio, SQLite, and the heavy libraries above.
NOT_FOR_SHOW = (
    *HEAVY,
    "cryptography",
    "smartcard",
    "asyncio",
    "sqlite3",
    "secrets",
    "farelab.card._applet",
    "farelab.card._terminal",
    "farelab.card._vicc",
    "farelab.card._behaviour",
)


def _among(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == n or m.startswith(n + ".") for n in names))


@pytest.mark.parametrize(
    "args", [["--help"], ["card", "show", "c.card"], ["card", "show", "--help"]]
)
def test_help_and_card_show_load_no_cipher_reader_or_applet(
    tmp_path: Path, args: list[str]
) -> None:
    _loaded(["card", "new", "c.card"], tmp_path)
    modules = _loaded(args, tmp_path)
    assert "farelab.card._image" in modules or args == ["--help"]
    assert _among(modules, NOT_FOR_SHOW) == []


def test_card_new_loads_the_cipher_but_no_reader_or_applet(tmp_path: Path) -> None:
    modules = _loaded(["card", "new", "c.card"], tmp_path)
    assert "cryptography" in modules  # personalisation diversifies the card's keys
    assert (
        _among(modules, tuple(m for m in NOT_FOR_SHOW if m not in ("cryptography", "secrets")))
        == []
    )


def _summaries(parser: argparse.ArgumentParser) -> dict[str, str | None]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {choice.dest: choice.help for choice in sub._choices_actions}


def test_the_help_listed_without_loading_a_command_is_its_own() -> None:
    assert _summaries(build_parser(None)) == _summaries(build_parser("*"))
    assert set(_summaries(build_parser(None))) == set(COMMANDS)


def test_an_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    from farelab._cli import main  # noqa: PLC0415

    with pytest.raises(SystemExit) as stop:
        main(["nosuch"])
    assert stop.value.code == 2
    assert "invalid choice: 'nosuch'" in capsys.readouterr().err
