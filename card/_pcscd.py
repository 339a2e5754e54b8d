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
VPCD_PORTS = (VPCD_PORT, VPCD_PORT + 1)
"""vpcd listens on one port per virtual reader ("Virtual PCD 00 00" and "… 00 01")."""

RESERVED_PORTS_SYSCTL = Path("/proc/sys/net/ipv4/ip_local_reserved_ports")
_BIND_FAILED = "Could not initialize connection to virtual ICC"
"""What vpcd logs when it cannot bind its port."""
_START_TRIES = 3
"""Starts that fail for another reason than a taken port, before giving up."""
_PORT_WAIT = 75.0
"""How long to wait for vpcd's ports: a connection's TIME_WAIT lasts 60 s on Linux."""

__all__ = ["VIRTUAL_READER", "VPCD_PORTS", "PcscdError", "port_holders", "running_pcscd"]

_TCP_STATES = {
    "01": "ESTABLISHED",
    "02": "SYN_SENT",
    "03": "SYN_RECV",
    "04": "FIN_WAIT1",
    "05": "FIN_WAIT2",
    "06": "TIME_WAIT",
    "07": "CLOSE",
    "08": "CLOSE_WAIT",
    "09": "LAST_ACK",
    "0A": "LISTEN",
    "0B": "CLOSING",
}


class PcscdError(RuntimeError):
    """pcscd could not be had."""


def _wait_for_reader(log: Path, since: int, deadline: float) -> bool | None:
    """True once the reader shows; None as soon as vpcd logs that it could not bind one of its
    ports (the other reader may show, but the testbed's second slot would be missing); False at
    the deadline."""
    while time.monotonic() < deadline:
        if _BIND_FAILED in _log_since(log, since):
            return None
        if VIRTUAL_READER in list_readers():
            return _BIND_FAILED not in _log_since(log, since) or None
        time.sleep(0.1)
    return False


def _log_since(log: Path, offset: int) -> str:
    try:
        with log.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _hex_port(address: str) -> int:
    return int(address.rsplit(":", 1)[1], 16)


def port_holders(port: int) -> list[str]:
    """The TCP sockets of this machine bound to a local ``port``, as ``STATE local -> remote``
    (from /proc/net/tcp and tcp6; empty where those cannot be read)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 4 or _hex_port(fields[1]) != port:
                continue
            state = _TCP_STATES.get(fields[3], fields[3])
            remote = "*" if state == "LISTEN" else f"port {_hex_port(fields[2])}"
            found.append(f"{state} :{port} -> {remote}")
    return found


def _port_bindable(port: int) -> bool:
    """Whether vpcd could bind ``port`` now, tried the way vpcd binds it (0.0.0.0 with
    SO_REUSEADDR): a listener, a connection, or the TIME_WAIT of a connection *from* that port
    (any program's outgoing connection may be given it as its ephemeral port) makes vpcd fail
    with "Address already in use" and never show its reader."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _wait_ports_free(deadline: float) -> bool:
    while not all(_port_bindable(port) for port in VPCD_PORTS):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)
    return True


def _ports_report() -> str:
    held = [h for port in VPCD_PORTS for h in port_holders(port)]
    report = "; ".join(held) if held else "no socket seen"
    if not _reserved(VPCD_PORTS):
        report += (
            f"; ports {VPCD_PORTS[0]}-{VPCD_PORTS[-1]} are not reserved from the ephemeral range, "
            "so any program's outgoing connection may take them (as root: echo "
            f"{VPCD_PORTS[0]}-{VPCD_PORTS[-1]} > {RESERVED_PORTS_SYSCTL}; .ci/install does it)"
        )
    return report


def _reserved(ports: tuple[int, ...]) -> bool:
    """Whether the kernel keeps ``ports`` out of the ephemeral range (False if unknown)."""
    try:
        spec = RESERVED_PORTS_SYSCTL.read_text().strip()
    except OSError:
        return False
    ranges = []
    for part in filter(None, spec.split(",")):
        low, _, high = part.partition("-")
        ranges.append((int(low), int(high or low)))
    return all(any(low <= port <= high for low, high in ranges) for port in ports)


def _start(binary: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([binary, "--foreground"], stdout=out, stderr=subprocess.STDOUT)


def _listening(port: int) -> bool:
    return any(h.startswith("LISTEN ") for h in port_holders(port))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    # vpcd's listener must be gone before anyone starts the next pcscd (read from the kernel's
    # table: a connection to find out could, from the ephemeral range, be given vpcd's port)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_listening(port) for port in VPCD_PORTS):
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
    proc = None
    deadline = time.monotonic() + _PORT_WAIT
    failures = 0
    while proc is None:
        if not _wait_ports_free(deadline):
            raise PcscdError(
                f"vpcd's ports are still in use after {_PORT_WAIT:.0f} s: {_ports_report()}"
            )
        since = log.stat().st_size if log.exists() else 0
        proc = _start(binary, log)
        try:
            ready = _wait_for_reader(log, since, time.monotonic() + 10)
        except BaseException:  # Ctrl-C, SIGTERM, a time limit: leave no pcscd behind
            _stop(proc)
            raise
        if ready:
            break
        _stop(proc)
        proc = None
        if ready is None:  # a port taken between the probe and vpcd's bind: wait for it again
            if time.monotonic() > deadline:
                raise PcscdError(
                    f"vpcd could not bind its ports for {_PORT_WAIT:.0f} s: {_ports_report()}; "
                    f"log: {log.read_text(errors='replace')[-2000:]}"
                )
            continue
        failures += 1
        if failures == _START_TRIES:
            raise PcscdError(
                f"pcscd started {_START_TRIES} times but {VIRTUAL_READER!r} never appeared; "
                f"readers: {list_readers()}; log: {log.read_text(errors='replace')[-2000:]}"
            )
        time.sleep(float(failures))
    try:
        yield
    finally:
        _stop(proc)
