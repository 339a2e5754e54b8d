"""Making sure a pcscd with the vpcd driver runs (tests, benchmarks, the demo): reuse the one that
runs, or start one for the duration of a block."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from card._pcsc import list_readers

VIRTUAL_READER = "Virtual PCD 00 00"


__all__ = ["VIRTUAL_READER", "PcscdError", "running_pcscd"]


class PcscdError(RuntimeError):
    """pcscd could not be had."""


def _wait_for_reader(deadline: float) -> bool:
    while time.monotonic() < deadline:
        if VIRTUAL_READER in list_readers():
            return True
        time.sleep(0.1)
    return False


@contextmanager
def running_pcscd(log: Path) -> Iterator[None]:
    """A pcscd with the vpcd reader for the duration of the block."""
    if VIRTUAL_READER in list_readers():
        yield
        return
    binary = shutil.which("pcscd") or (
        "/usr/sbin/pcscd" if Path("/usr/sbin/pcscd").exists() else None
    )
    if binary is None:
        raise PcscdError("pcscd is not installed (Debian packages pcscd and vsmartcard-vpcd)")
    if not Path("/usr/lib/pcsc/drivers/serial/libifdvpcd.so").exists():
        raise PcscdError("the vpcd driver is not installed (Debian package vsmartcard-vpcd)")
    with log.open("wb") as out:
        proc = subprocess.Popen([binary, "--foreground"], stdout=out, stderr=subprocess.STDOUT)
    try:
        if not _wait_for_reader(time.monotonic() + 15):
            raise PcscdError(
                f"pcscd started but {VIRTUAL_READER!r} never appeared; readers: {list_readers()}; "
                f"log: {log.read_text(errors='replace')[-2000:]}"
            )
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
