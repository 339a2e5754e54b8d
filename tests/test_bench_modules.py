"""Each measure's own command line (``python -m farelab.bench.NAME``) explains itself and
refuses a bad count with a usage line, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

MEASURES = (
    "ingest",
    "validator_memory",
    "backend_memory",
    "topup_latency",
    "startup",
    "testbed_time",
    "city",
    "pcsc",
)


@pytest.mark.parametrize("name", MEASURES)
def test_help_explains_the_measure(name: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", f"farelab.bench.{name}", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: ")
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("name", "word"), [("pcsc", "x"), ("pcsc", "0"), ("testbed_time", "-3")])
def test_a_bad_count_is_a_usage_error(name: str, word: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", f"farelab.bench.{name}", word],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "error: argument" in done.stderr
    assert "Traceback" not in done.stderr
