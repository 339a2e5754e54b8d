"""Running ``farelab`` as a user does, as a separate ``python -m farelab`` process, for the tests
that check the command line: one finished command, or one started and left running, plus the
device config and card image those tests tap with."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from datetime import date
from pathlib import Path
from typing import IO

from farelab.card import personalise, save_image

ROOT = Path(__file__).resolve().parent.parent
"""The repository's folder, where ``python -m farelab`` finds the package."""

DEVICES = """
[[validator]]
id = "bus-1"
kind = "bus"
network = "taiyuan"
terminal_id = "000000000B01"
whitelist = ["1310000000000000"]
reader = "{reader}"

[[validator]]
id = "gate-in"
kind = "metro-gate"
network = "changzhou"
line = "L1"
station = "Senlin Gongyuan"
terminal_id = "000000010101"
whitelist = ["1310000000000000"]
"""
"""A bus and a metro entry gate; ``{reader}`` is the bus's reader (``sim``, ``pcsc:NAME``)."""

_File = int | IO[str] | None


def farelab(
    *args: str,
    stdin: str | None = None,
    timeout: float = 60,
    cwd: Path = ROOT,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``farelab ARGS`` run to its end in ``cwd``, fed ``stdin`` (none: the test's own), its
    output captured as text; it is killed after ``timeout`` seconds. ``env`` replaces the
    environment (none: the test's own). Its exit code is left to the caller to check."""
    return subprocess.run(
        [sys.executable, "-m", "farelab", *args],
        cwd=cwd,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_farelab(
    *args: str,
    cwd: Path = ROOT,
    env: Mapping[str, str] | None = None,
    stdin: _File = None,
    stdout: _File = None,
    stderr: _File = None,
) -> subprocess.Popen[str]:
    """``farelab ARGS`` started in ``cwd`` and left running, its streams in text mode and
    where ``stdin``, ``stdout`` and ``stderr`` say (``subprocess.PIPE``, ``DEVNULL``, none: the
    test's own); ``env`` replaces the environment (none: the test's own)."""
    return subprocess.Popen(
        [sys.executable, "-m", "farelab", *args],
        cwd=cwd,
        env=env,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        text=True,
    )


def card(tmp_path: Path, balance: int = 2000) -> Path:
    """A personalised card image with ``balance`` fen, saved as ``tmp_path/card.json``."""
    path = tmp_path / "card.json"
    save_image(path, personalise(serial="31", issued=date(2026, 1, 1), balance=balance))
    return path
