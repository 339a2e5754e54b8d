"""Making sure a pcscd with the vpcd driver runs (tests, benchmarks, the demo): reuse the one that
runs, or start one for the duration of a block."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from farelab.card._pcsc import list_readers

VIRTUAL_READER = "Virtual PCD 00 00"
VPCD_PORT = 35963


__all__ = ["VIRTUAL_READER", "PcscdError", "running_pcscd"]


class PcscdError(RuntimeError):
    """pcscd could not be had."""


def _wait_for_reader(deadline: float) -> bool:
    while time.monotonic() < deadline:
        if VIRTUAL_READER in list_readers():
            return True
        time.sleep(0.1)
    return False


def _port_bindable() -> bool:
    """Whether vpcd could bind its port now.  A pcscd stopped while a virtual card was still
    connected leaves the port in TIME_WAIT for a minute, and vpcd (which does not set
    SO_REUSEADDR) then fails with "Address already in use" and never shows its reader."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("0.0.0.0", VPCD_PORT))  # as vpcd binds it
        except OSError:
            return False
    return True


def _wait_port_free(deadline: float) -> bool:
    while not _port_bindable():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)
    return True


def _start(binary: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([binary, "--foreground"], stdout=out, stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    # vpcd's port must be free again before anyone starts the next pcscd
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", VPCD_PORT), timeout=0.2).close()
        except OSError:
            return
        time.sleep(0.1)


@contextmanager
def running_pcscd(log: Path) -> Iterator[None]:
    """A pcscd with the vpcd reader for the duration of the block (a pcscd that already runs
    with it is reused; a new one is stopped at the end)."""
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
    # TIME_WAIT lasts 60 s on Linux.
    if not _wait_port_free(time.monotonic() + 75):
        raise PcscdError(
            f"vpcd's port {VPCD_PORT} is still in use after 75 s (is another program, or a "
            "pcscd not started by farelab, holding it?)"
        )
    proc = None
    # A pcscd that was just stopped may still hold its socket: try a few times.
    for attempt in range(3):
        proc = _start(binary, log)
        try:
            ready = _wait_for_reader(time.monotonic() + 10)
        except BaseException:  # Ctrl-C, SIGTERM, a time limit: leave no pcscd behind
            _stop(proc)
            raise
        if ready:
            break
        _stop(proc)
        proc = None
        time.sleep(1.0 + attempt)
    if proc is None:
        raise PcscdError(
            f"pcscd started three times but {VIRTUAL_READER!r} never appeared; readers: "
            f"{list_readers()}; log: {log.read_text(errors='replace')[-2000:]}"
        )
    try:
        yield
    finally:
        _stop(proc)
