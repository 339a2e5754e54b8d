"""A card image is one physical card: in one field at a time (a second user waits, then gets
``card busy``, and never reuses a counter), an image that cannot be read or written is one
clear ImageError and a failed write commits nothing, a killed writer's temporary files are
cleaned up by the next holder only, and no image holds more than the cap."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from farelab._cli import main
from farelab.card import (
    DEMO_ISSUER_ID,
    DEMO_KEYS,
    CardBusyError,
    CardSnapshot,
    ImageError,
    ImageLock,
    InProcessReader,
    Psam,
    PsamKeys,
    Purchase,
    PurchaseDone,
    ReadCard,
    SimulatedCard,
    drive,
    load_image,
    personalise,
    save_image,
)
from tests.cli_support import ROOT, start_farelab
from tests.disk_faults import full_disk_under

PSAM = Psam(
    terminal_id=bytes.fromhex("0000000000C3"), issuers={DEMO_ISSUER_ID: PsamKeys.of(DEMO_KEYS)}
)


def new_image(path: Path, balance: int = 5000) -> Path:
    save_image(path, personalise(serial="808", issued=date(2026, 1, 1), balance=balance))
    return path


def pay(card: SimulatedCard, amount: int) -> object:
    reader = InProcessReader()
    reader.insert(card)
    snapshot = drive(reader, ReadCard(records=[]))
    assert isinstance(snapshot, CardSnapshot)
    done = drive(reader, Purchase(psam=PSAM, card=snapshot, amount=amount, when=datetime.now(UTC)))
    reader.remove()
    return done


@contextmanager
def held_by_another_process(
    card: Path, amount: int
) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """A process with ``card`` in its field; it pays ``amount`` once the release file exists."""
    release = card.parent / "release"
    holder = subprocess.Popen(
        [sys.executable, "-m", "tests.card_holder", str(card), str(release), str(amount)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "ready"
        yield holder, release
    finally:
        release.touch()
        holder.wait(30)


def topup_load(folder: Path, card: Path) -> subprocess.Popen[str]:
    return start_farelab(
        *("topup", "load", str(card), "--amount", "10", "--json"),
        cwd=folder,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def has_open(pid: int, path: Path) -> bool:
    """Whether process ``pid`` has ``path`` open (Linux /proc)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                return True
        except OSError:
            continue
    return False


def test_a_second_process_gets_card_busy_and_nothing_is_lost(tmp_path: Path) -> None:
    card = new_image(tmp_path / "c.json")
    with held_by_another_process(card, 300) as (holder, _):
        kiosk = topup_load(tmp_path, card)
        out, err = kiosk.communicate(timeout=60)
        assert "Traceback" not in err
        assert json.loads(out) == {
            "result": "refused",
            "reason": "card_busy",
            "amount_fen": 0,
            "balance_fen": None,
            "tac": None,
        }
        assert kiosk.returncode == 1
    assert holder.returncode == 0
    image = load_image(card)
    assert (image.balance, image.offline_counter, image.online_counter) == (4700, 1, 0)


def test_a_second_process_that_waits_reuses_no_counter(tmp_path: Path) -> None:
    card = new_image(tmp_path / "c.json")
    with held_by_another_process(card, 300) as (holder, release):
        kiosk = topup_load(tmp_path, card)
        lockfile = tmp_path / ".c.json.lock"
        # Let the holder pay once the kiosk waits for the card (or, without a lock, has done).
        while kiosk.poll() is None and not has_open(kiosk.pid, lockfile):
            time.sleep(0.01)
        release.touch()
        out, err = kiosk.communicate(timeout=60)
    assert (holder.returncode, kiosk.returncode) == (0, 0), err
    assert json.loads(out)["result"] == "loaded"
    image = load_image(card)
    assert (image.balance, image.offline_counter, image.online_counter) == (5700, 1, 1)


def test_two_users_in_one_process_one_waits_then_card_busy(tmp_path: Path) -> None:
    card = new_image(tmp_path / "c.json")
    first = SimulatedCard.from_file(card)
    second = SimulatedCard.from_file(card, wait=0.05)
    first.power_on()
    with pytest.raises(CardBusyError, match="card busy"):
        second.power_on()
    first.power_off()
    assert isinstance(pay(second, 100), PurchaseDone)
    assert isinstance(pay(first, 100), PurchaseDone)  # read again at power-on: not stale
    image = load_image(card)
    assert (image.balance, image.offline_counter) == (4800, 2)


def test_an_unreadable_image_is_one_image_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    card = tmp_path / "c.json"
    card.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ImageError, match="not UTF-8"):
        SimulatedCard.from_file(card)
    assert main(["card", "show", str(card)]) == 2
    assert (
        main(["topup", "load", str(card), "--amount", "1", "--journal", str(tmp_path / "k")]) == 2
    )
    err = capsys.readouterr().err
    assert err.count("not a farelab card image (not UTF-8 text)") == 2


@pytest.mark.parametrize("way", ["shadow swapped in", "new file renamed"])
def test_an_image_that_cannot_be_written_commits_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, way: str
) -> None:
    card = new_image(tmp_path / "c.json")
    before = card.read_bytes()
    if way == "new file renamed":  # a file system or C library that cannot swap two files
        monkeypatch.setattr("farelab.card._image._renameat2", lambda: None)
    sim = SimulatedCard.from_file(card)
    with monkeypatch.context() as m:
        full_disk_under(m)
        with pytest.raises(ImageError, match="cannot write card image: No space left on device"):
            pay(sim, 300)
    assert card.read_bytes() == before
    assert (sim.image.balance, sim.image.offline_counter) == (5000, 0)
    left = sorted(p.name for p in tmp_path.iterdir())
    shadow = [".c.json.shadow"] if way == "shadow swapped in" else []
    assert left == [".c.json.lock", *shadow, "c.json"]
    assert isinstance(pay(sim, 300), PurchaseDone)  # the same counter, now committed once
    assert (load_image(card).balance, load_image(card).offline_counter) == (4700, 1)


def test_a_load_the_card_cannot_write_is_voided_not_paid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    card = new_image(tmp_path / "c.json")
    monkeypatch.chdir(tmp_path)

    full_disk_under(monkeypatch, card)
    load = ["topup", "load", "c.json", "--amount", "10", "--json"]
    assert main([*load, "--db", "farelab-host.db", "--journal", "farelab-kiosk.db"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert (out["result"], out["reason"]) == ("refused", "card_error")
    assert load_image(card).balance == 5000
    with sqlite3.connect(tmp_path / "farelab-host.db") as host:
        assert host.execute("SELECT status FROM loads").fetchall() == [("void",)]
    with sqlite3.connect(tmp_path / "farelab-kiosk.db") as kiosk:
        assert kiosk.execute("SELECT status FROM loads").fetchall() == [("void",)]


def test_the_next_holder_removes_stale_temporary_files_of_its_card_only(tmp_path: Path) -> None:
    card = new_image(tmp_path / "c.json")
    stale = [tmp_path / ".c.json.k3v9x0_q.tmp", tmp_path / ".c.json.0f1e2d3c.tmp"]
    others = [tmp_path / ".d.json.0f1e2d3c.tmp", tmp_path / ".c.json.x.0f1e2d3c.tmp"]
    for path in stale + others:
        path.write_text("{")
    sim = SimulatedCard.from_file(card)
    assert all(p.exists() for p in stale)  # reading is not holding
    sim.power_on()
    assert [p.exists() for p in stale + others] == [False, False, True, True]
    sim.close()


def test_a_live_holder_s_temporary_file_is_never_removed(tmp_path: Path) -> None:
    card = new_image(tmp_path / "c.json")
    with held_by_another_process(card, 100):
        writing = tmp_path / ".c.json.0f1e2d3c.tmp"
        writing.write_text("{")
        with pytest.raises(CardBusyError):
            SimulatedCard.from_file(card, wait=0.05).power_on()
        assert writing.exists()
        writing.unlink()


@pytest.mark.parametrize(
    ("field", "value"),
    [("balance", 150_000), ("max_balance", 150_000), ("max_balance", 0xFFFFFFFF)],
)
def test_an_image_past_the_cap_is_refused_when_loaded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str, value: int
) -> None:
    card = new_image(tmp_path / "c.json", balance=90_000)
    doc = json.loads(card.read_text())
    doc[field] = value
    card.write_text(json.dumps(doc))
    with pytest.raises(ImageError, match=r"max_balance|cap"):
        load_image(card)
    assert main(["card", "show", str(card)]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_error_messages_cut_a_long_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    long_path = tmp_path / ("x" * 200) / ("y" * 200 + ".json")
    assert main(["card", "show", str(long_path)]) == 2
    assert main(["card", "new", str(tmp_path / "c.json"), "--serial", "9" * 100_000]) == 2
    err = capsys.readouterr().err
    assert "no such card image" in err
    assert max(len(line) for line in err.splitlines()) < 300


def test_take_if_free_takes_a_free_card_now_and_never_waits_for_a_held_one(
    tmp_path: Path,
) -> None:
    path = tmp_path / "card.json"
    save_image(path, personalise(serial="77", issued=date(2026, 1, 1), balance=900))
    card = SimulatedCard.from_file(path, durable=False, wait=60.0, load=False)
    assert card.take_if_free()
    assert card.take_if_free()  # it has it already
    assert card.image.balance == 900
    other = ImageLock(path)
    with pytest.raises(CardBusyError):
        other.acquire(0.0)  # the card is in this field now
    card.power_on()  # uses what it took
    card.close()
    other.acquire(0.0)  # let go
    late = SimulatedCard.from_file(path, durable=False, wait=60.0, load=False)
    started = time.monotonic()
    assert not late.take_if_free()  # another field has it: no 60 s wait
    assert time.monotonic() - started < 30
    other.release()
    assert late.take_if_free()
    late.close()
    in_memory = SimulatedCard(personalise(serial="78", issued=date(2026, 1, 1)))
    assert in_memory.take_if_free()
