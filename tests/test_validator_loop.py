"""The asyncio shell: a reader that goes away and comes back, the uplink seam, a slow uplink
that never delays a tap."""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
import sys
import time
from pathlib import Path

import pytest

from farelab.card import InProcessReader, ReaderUnavailableError
from farelab.validator import (
    FEED_SWITCH_INTERVAL_S,
    TAP_SWITCH_INTERVAL_S,
    Journal,
    TapGate,
    load_config,
    run,
)
from tests.validator_support import new_card

CONFIG = """
[[validator]]
id = "bus-1"
kind = "bus"
network = "taiyuan"
terminal_id = "000000000B01"
whitelist = ["1310000000000000"]
reader = "pcsc:Unplugged Reader"
"""


class Unplugged:
    """A reader whose every call fails, as one that was pulled out of its USB port."""

    name = "Unplugged Reader"

    def _gone(self, *args: object) -> bool:
        raise ReaderUnavailableError("the reader is gone")

    wait_for_card = wait_for_removal = _gone

    def connect(self) -> bytes:
        raise ReaderUnavailableError("the reader is gone")

    def transmit(self, apdu: bytes) -> bytes:
        raise ReaderUnavailableError("the reader is gone")

    def disconnect(self) -> None:
        return None


async def test_reader_unplugged_and_back_is_reported_once_then_taps_resume(
    tmp_path: Path, monkeypatch: object, capsys: pytest.CaptureFixture[str]
) -> None:
    config_path = tmp_path / "devices.toml"
    config_path.write_text(CONFIG)
    config = load_config(config_path)
    replugged = InProcessReader("Unplugged Reader")
    replugged.insert(new_card(balance=500))
    attempts = {"n": 0}

    def factory(spec: str) -> object:
        def make() -> object:
            attempts["n"] += 1
            return Unplugged() if attempts["n"] < 4 else replugged

        return make

    import farelab.validator._loop as loop_module  # noqa: PLC0415

    monkeypatch.setattr(loop_module, "_reader_factory", factory)  # type: ignore[attr-defined]
    out = io.StringIO()
    journal = Journal(":memory:")
    stop = asyncio.Event()
    task = asyncio.create_task(run(config, journal, source=None, out=out, stop=stop))
    deadline = time.monotonic() + 20
    while not out.getvalue() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    stop.set()
    await task
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert lines
    assert (lines[0]["result"], lines[0]["fare_fen"]) == ("accepted", 50)
    assert attempts["n"] >= 4
    assert capsys.readouterr().err.count("unavailable") == 1


class SlowUplink:
    """An uplink stuck on a dead network: it must not delay any tap."""

    def __init__(self) -> None:
        self.started = False

    def attach_params(self, handler: object) -> None:
        self.handler = handler

    async def run(self, journal: Journal) -> None:
        self.started = True
        await asyncio.sleep(3600)


async def test_a_stuck_uplink_never_delays_a_tap(tmp_path: Path) -> None:
    config_path = tmp_path / "devices.toml"
    config_path.write_text(CONFIG.replace("pcsc:Unplugged Reader", "sim"))
    config = load_config(config_path)
    path = tmp_path / "c.json"
    from farelab.card import save_image  # noqa: PLC0415

    save_image(path, new_card(balance=500).image)
    source = io.StringIO(json.dumps({"device": "bus-1", "card": str(path)}) + "\n")
    out = io.StringIO()
    uplink = SlowUplink()
    started = time.monotonic()
    await run(config, Journal(":memory:"), source=source, out=out, uplink=uplink)
    assert uplink.started
    assert json.loads(out.getvalue())["result"] == "accepted"
    assert time.monotonic() - started < 10


async def test_the_run_loop_tunes_the_process_for_its_taps(tmp_path: Path) -> None:
    """``validator run`` is the application: it gives the journal a tap gate (the uplink and
    the journal's background work yield to taps) and hands tap threads the GIL quickly."""
    config_path = tmp_path / "devices.toml"
    config_path.write_text(CONFIG.replace("pcsc:Unplugged Reader", "sim"))
    journal = Journal(":memory:")
    interval = sys.getswitchinterval()
    try:
        await run(load_config(config_path), journal, source=io.StringIO(""), out=io.StringIO())
        assert isinstance(journal.gate, TapGate)
        assert sys.getswitchinterval() == pytest.approx(TAP_SWITCH_INTERVAL_S)
    finally:
        sys.setswitchinterval(interval)


async def test_a_feed_of_several_sim_devices_gives_tap_threads_longer_turns(tmp_path: Path) -> None:
    """Several sim devices fed at once: their taps compete with each other, and a short turn
    would only hand the GIL from one tap thread to another."""
    config_path = tmp_path / "devices.toml"
    one = CONFIG.replace("pcsc:Unplugged Reader", "sim")
    config_path.write_text(one + one.replace('"bus-1"', '"bus-2"').replace("0B01", "0B02"))
    interval = sys.getswitchinterval()
    try:
        await run(
            load_config(config_path), Journal(":memory:"), source=io.StringIO(""), out=io.StringIO()
        )
        assert sys.getswitchinterval() == pytest.approx(FEED_SWITCH_INTERVAL_S)
        stopped = asyncio.Event()
        stopped.set()  # no feed: the same devices wait for cards, here stopped at once
        await run(
            load_config(config_path),
            Journal(":memory:"),
            source=None,
            out=io.StringIO(),
            stop=stopped,
        )
        assert sys.getswitchinterval() == pytest.approx(TAP_SWITCH_INTERVAL_S)
    finally:
        sys.setswitchinterval(interval)


TWO_BUSES = CONFIG.replace("pcsc:Unplugged Reader", "sim") + CONFIG.replace(
    "pcsc:Unplugged Reader", "sim"
).replace('"bus-1"', '"bus-2"').replace("0B01", "0B02")


def _cards(tmp_path: Path, names: str) -> dict[str, Path]:
    from farelab.card import save_image  # noqa: PLC0415

    paths = {}
    for i, name in enumerate(names):
        (tmp_path / name).mkdir()
        paths[name] = tmp_path / name / "card.json"
        save_image(paths[name], new_card(serial=str(2001 + i)).image)
    return paths


async def _feed_and_watch(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    journal: Journal,
    requests: list[tuple[str, str]],
    cards: dict[str, Path],
) -> tuple[list[dict[str, object]], dict[str, str]]:
    """Run the feed; each card's result and the thread its tap ran on."""
    import threading  # noqa: PLC0415

    from farelab.validator import Validator  # noqa: PLC0415

    config_path = tmp_path / "devices.toml"
    config_path.write_text(TWO_BUSES)
    ran_on: dict[str, str] = {}
    tap = Validator.tap
    serials = {str(path): name for name, path in cards.items()}

    def watched(self: Validator, reader: object, at: object) -> object:
        card = reader._card  # type: ignore[attr-defined]  # the InProcessReader's card
        ran_on[serials[str(card._store.path)]] = threading.current_thread().name
        return tap(self, reader, at)  # type: ignore[arg-type]

    source = io.StringIO(
        "".join(
            json.dumps(
                {"device": device, "card": str(cards[name]), "at": f"2026-11-23T09:00:0{i}+08:00"}
            )
            + "\n"
            for i, (device, name) in enumerate(requests)
        )
    )
    out = io.StringIO()
    interval = sys.getswitchinterval()
    monkeypatch.setattr(Validator, "tap", watched)
    try:
        await run(load_config(config_path), journal, source=source, out=out)
    finally:
        sys.setswitchinterval(interval)
    return [json.loads(line) for line in out.getvalue().splitlines()], ran_on


async def test_a_feed_taps_on_the_loop_unless_the_tap_would_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tap whose card is free and whose device is idle runs on the event loop (no thread
    hand-over); a card in another field waits on its device's thread, and so does the next tap
    at that device, while the other device's taps go on, on the loop."""
    import threading  # noqa: PLC0415

    from farelab.card import ImageLock  # noqa: PLC0415

    cards = _cards(tmp_path, "abcd")
    held = ImageLock(cards["b"])  # another field: its own descriptor, so its own flock
    held.acquire()
    threading.Timer(0.5, held.release).start()
    journal = Journal(tmp_path / "j.db")
    lines, ran_on = await _feed_and_watch(
        tmp_path,
        monkeypatch,
        journal,
        [("bus-1", "a"), ("bus-2", "b"), ("bus-2", "c"), ("bus-1", "d")],
        cards,
    )
    main = threading.current_thread().name
    assert ran_on["a"] == ran_on["d"] == main
    assert {ran_on["b"], ran_on["c"]} == {"reader-bus-2_0"}  # its one thread
    assert [(x["device"], x["result"]) for x in lines] == [  # in the order asked
        ("bus-1", "accepted"),
        ("bus-2", "accepted"),
        ("bus-2", "accepted"),
        ("bus-1", "accepted"),
    ]
    with sqlite3.connect(tmp_path / "j.db") as db:
        tapped = [row[0] for row in db.execute("SELECT card_serial FROM taps ORDER BY id")]
    serial = {name: new_card(serial=str(2001 + i)).image.serial for i, name in enumerate("abcd")}
    assert tapped == [serial["a"], serial["d"], serial["b"], serial["c"]]  # d while b waited


async def test_a_feed_whose_writes_are_fsyncd_taps_on_the_devices_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a journal (and so card images) synchronous=full, a tap waits for fsyncs: it runs on
    its device's thread, where the other devices' taps overlap its waits."""
    cards = _cards(tmp_path, "ab")
    journal = Journal(tmp_path / "j.db", synchronous="full")
    requests = [("bus-1", "a"), ("bus-2", "b")]
    lines, ran_on = await _feed_and_watch(tmp_path, monkeypatch, journal, requests, cards)
    assert [x["result"] for x in lines] == ["accepted", "accepted"]
    assert (ran_on["a"], ran_on["b"]) == ("reader-bus-1_0", "reader-bus-2_0")
