"""``farelab validator run``'s sim tap requests carry a simulated clock (``"at"``) and can pull
the card mid-tap (``"pull_after"``), as a city of device processes drives them."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import threading
from datetime import date
from pathlib import Path

from farelab.card import ImageLock, MetroRecord, load_image, personalise, save_image
from tests.cli_support import DEVICES, card, farelab, start_farelab


def run(tmp_path: Path, requests: list[dict[str, str]], *extra: str) -> list[dict[str, object]]:
    config = tmp_path / "devices.toml"
    config.write_text(DEVICES.format(reader="sim"))
    stdin = "".join(json.dumps(r) + "\n" for r in requests)
    result = farelab(
        "validator",
        "run",
        "--config",
        str(config),
        "--journal",
        str(tmp_path / "j.db"),
        *extra,
        stdin=stdin,
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(x) for x in result.stdout.splitlines()]


def test_a_request_at_a_time_is_tapped_and_shown_at_that_time(tmp_path: Path) -> None:
    path = card(tmp_path)
    entry = {"device": "gate-in", "card": str(path), "at": "2026-11-23T08:00:00+08:00"}
    lines = run(tmp_path, [entry])
    assert [(x["result"], x["at"]) for x in lines] == [
        ("accepted", "2026-11-23T08:00:00.000+08:00")
    ]
    # The card's entry record carries the request's time, not the wall clock's.
    record = MetroRecord.decode(load_image(path).metro)
    assert record.entry_time is not None
    assert record.entry_time.isoformat().startswith("2026-11-23T08:00:00")


def test_a_request_pulled_after_debit_tears_and_the_next_settles_it_once(tmp_path: Path) -> None:
    path = card(tmp_path)
    taps = [
        {
            "device": "bus-1",
            "card": str(path),
            "at": "2026-11-23T09:00:00+08:00",
            "pull_after": "DEBIT",
        },
        {"device": "bus-1", "card": str(path), "at": "2026-11-23T09:00:09+08:00"},
    ]
    lines = run(tmp_path, taps)
    assert [(x["result"], x["reason"], x["grey"]) for x in lines] == [
        ("rejected", "card_removed", True),
        ("accepted", "recovered", False),
    ]
    assert load_image(path).balance == 2000 - 50  # charged once


def test_bad_at_and_pull_after_are_ignored_with_a_notice_and_the_rest_runs(
    tmp_path: Path,
) -> None:
    config = tmp_path / "devices.toml"
    config.write_text(DEVICES.format(reader="sim"))
    path = card(tmp_path)
    stdin = "".join(
        json.dumps(r) + "\n"
        for r in [
            {"device": "bus-1", "card": str(path), "at": "2026-11-23T09:00:00"},
            {"device": "bus-1", "card": str(path), "pull_after": "PAY"},
            {"device": "bus-1", "card": str(path), "at": 5},
            {"device": "bus-1", "card": str(path), "at": "2026-11-23T09:00:00+08:00"},
        ]
    )
    result = farelab(
        "validator",
        "run",
        "--config",
        str(config),
        "--journal",
        str(tmp_path / "j.db"),
        stdin=stdin,
    )
    assert result.returncode == 0, result.stderr
    assert [json.loads(x)["result"] for x in result.stdout.splitlines()] == ["accepted"]
    assert result.stderr.count("ignored tap request") == 3
    assert "has no UTC offset" in result.stderr
    assert '"pull_after" must be one of' in result.stderr


def test_run_with_sim_readers_stops_at_sigterm_while_its_stdin_is_still_open(
    tmp_path: Path,
) -> None:
    """A process manager stops a device with SIGTERM: it must end at once, not when whoever
    feeds it closes its stdin."""
    config = tmp_path / "devices.toml"
    config.write_text(DEVICES.format(reader="sim"))
    path = card(tmp_path)
    proc = start_farelab(
        "validator",
        "run",
        "--config",
        str(config),
        "--journal",
        str(tmp_path / "j.db"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        proc.stdin.write(json.dumps({"device": "bus-1", "card": str(path)}) + "\n")
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline())["result"] == "accepted"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0  # stdin still open
    finally:
        proc.kill()
        proc.communicate()
    assert load_image(path).balance == 2000 - 50


def test_an_unreadable_or_missing_image_is_that_taps_card_error_and_the_next_runs(
    tmp_path: Path,
) -> None:
    good = card(tmp_path)
    damaged = tmp_path / "damaged.json"
    damaged.write_text("{not json")
    at = "2026-11-23T09:00:00+08:00"
    taps = [
        {"device": "bus-1", "card": str(damaged), "at": at},
        {"device": "bus-1", "card": str(tmp_path / "absent.json"), "at": at},
        {"device": "bus-1", "card": str(good), "at": at},
    ]
    lines = run(tmp_path, taps)
    assert [(x["result"], x["reason"]) for x in lines] == [
        ("rejected", "card_error"),
        ("rejected", "card_error"),
        ("accepted", None),
    ]


def test_a_card_busy_in_another_field_is_that_taps_card_error_and_the_next_runs(
    tmp_path: Path,
) -> None:
    """The image is read under the card's lock at power-on: a card another process holds is
    refused there (after the busy wait), not the end of the device's process."""
    from tests.test_card_field import held_by_another_process  # noqa: PLC0415

    busy = card(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    free = card(other)
    at = "2026-11-23T09:00:00+08:00"
    with held_by_another_process(busy, 10):
        lines = run(
            tmp_path,
            [
                {"device": "bus-1", "card": str(busy), "at": at},
                {"device": "bus-1", "card": str(free), "at": at},
            ],
        )
    assert [(x["result"], x["reason"]) for x in lines] == [
        ("rejected", "card_error"),
        ("accepted", None),
    ]


def test_devices_of_one_process_tap_at_once_and_answer_in_request_order(tmp_path: Path) -> None:
    # Card A is held in another field for a second: its tap at bus-1 waits for it, while card
    # B's tap at gate-in, asked for after it, goes on meanwhile; the answers keep the order.
    cards = {}
    for name, serial in (("a", "41"), ("b", "42")):
        (tmp_path / name).mkdir()
        cards[name] = tmp_path / name / "card.json"
        image = personalise(serial=serial, issued=date(2026, 1, 1), balance=2000)
        save_image(cards[name], image)
    held = ImageLock(cards["a"])
    held.acquire()
    threading.Timer(1.0, held.release).start()
    lines = run(
        tmp_path,
        [
            {"device": "bus-1", "card": str(cards["a"]), "at": "2026-11-23T09:00:00+08:00"},
            {"device": "gate-in", "card": str(cards["b"]), "at": "2026-11-23T09:00:01+08:00"},
        ],
    )
    assert [(x["device"], x["result"]) for x in lines] == [
        ("bus-1", "accepted"),
        ("gate-in", "accepted"),
    ]
    with sqlite3.connect(tmp_path / "j.db") as db:
        journalled = [
            row[0] for row in db.execute("SELECT device FROM transactions ORDER BY rowid")
        ]
    assert journalled == ["gate-in", "bus-1"]  # B's tap ended first
