"""vpcd's fixed ports: what takes them, how a start waits for them, and a card that must not
take one itself."""

from __future__ import annotations

import socket
import struct
import time
from datetime import date
from pathlib import Path

import pytest

from farelab.card import MemoryStore, SimulatedCard, ViccError, personalise
from farelab.card import _pcscd as pcscd_mod
from farelab.card import _vicc as vicc_mod
from farelab.card._pcscd import port_holders


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _connection(first_to_close: str) -> tuple[int, int]:
    """A loopback connection closed by ``first_to_close`` ("server" or "client") first: that end
    is left in TIME_WAIT.  Returns (server port, client port)."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        ports = (listener.getsockname()[1], client.getsockname()[1])
    first, second = (server, client) if first_to_close == "server" else (client, server)
    first.close()
    time.sleep(0.05)
    second.close()
    time.sleep(0.05)
    return ports


def test_holders_of_a_port_are_read_from_the_kernel() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert port_holders(port) == [f"LISTEN :{port} -> *"]
        with socket.create_connection(("127.0.0.1", port)) as client:
            mine = client.getsockname()[1]
            assert port_holders(mine) == [f"ESTABLISHED :{mine} -> port {port}"]
    assert port_holders(_free_port()) == []


def test_an_outgoing_connections_time_wait_blocks_vpcd_but_a_served_ones_does_not() -> None:
    """vpcd binds with SO_REUSEADDR: the TIME_WAIT of a connection it served (pcscd stopped
    first) does not stop the next one, but that of a connection *from* the port does — any
    program's connection may be given vpcd's port as its ephemeral one.  The probe must judge as
    vpcd does: the old probe (no SO_REUSEADDR) waited a minute for the former."""
    served, client_port = _connection("server")
    assert any(h.startswith("TIME_WAIT") for h in port_holders(served))
    assert pcscd_mod._port_bindable(served)

    _, outgoing = _connection("client")
    assert any(h.startswith("TIME_WAIT") for h in port_holders(outgoing))
    assert not pcscd_mod._port_bindable(outgoing)
    del client_port


@pytest.mark.parametrize(
    ("spec", "reserved"),
    [
        ("35963-35964", True),
        ("1000-1001,35963-35964", True),
        ("30000-40000", True),
        ("35963,35964", True),
        ("35963", False),
        ("", False),
    ],
)
def test_reserved_ports_are_read_from_the_sysctl(
    spec: str, reserved: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sysctl = tmp_path / "ip_local_reserved_ports"
    sysctl.write_text(spec + "\n")
    monkeypatch.setattr(pcscd_mod, "RESERVED_PORTS_SYSCTL", sysctl)
    assert pcscd_mod._reserved(pcscd_mod.VPCD_PORTS) is reserved
    report = pcscd_mod._ports_report()
    assert ("not reserved" in report) is not reserved


def test_a_bind_failure_in_vpcds_log_ends_the_wait_for_the_reader_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "pcscd.log"
    log.write_text("an earlier start: Could not initialize connection to virtual ICC\n")
    since = log.stat().st_size
    monkeypatch.setattr(pcscd_mod, "list_readers", list)
    assert pcscd_mod._wait_for_reader(log, since, time.monotonic() + 0.3) is False
    with log.open("a") as f:
        f.write("Address already in use\n00000000 ifd-vpcd.c:120:IFDHCreateChannel() ")
        f.write("Could not initialize connection to virtual ICC\n")
    started = time.monotonic()
    assert pcscd_mod._wait_for_reader(log, since, time.monotonic() + 30) is None
    assert time.monotonic() - started < 5  # not the whole wait


def test_a_card_whose_connection_is_given_vpcds_port_does_not_keep_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With nothing listening on vpcd's port, a connection to it that the kernel gives that very
    port as its own connects to itself (TCP's simultaneous open).  Forced here by binding the
    card's socket to the port; the card must see it is not vpcd, let go of the port (no
    TIME_WAIT: the next pcscd must bind it), and keep trying."""
    port = _free_port()
    real = socket.create_connection
    attempts = []

    def from_the_port(address: tuple[str, int], timeout: float = 2.0) -> socket.socket:
        attempts.append(address)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.bind(("127.0.0.1", port))
        sock.settimeout(timeout)
        sock.connect(address)
        return sock

    monkeypatch.setattr(socket, "create_connection", from_the_port)
    card = SimulatedCard(personalise(serial="1", issued=date(2026, 1, 1)), store=MemoryStore())
    client = vicc_mod.ViccClient(card, host="127.0.0.1", port=port)
    with pytest.raises(ViccError, match="cannot reach vpcd"):
        client.connect(timeout=0.4)
    monkeypatch.setattr(socket, "create_connection", real)
    assert len(attempts) >= 2
    assert port_holders(port) == []
    assert pcscd_mod._port_bindable(port)
