"""``farelab demo``: the system end to end, narrated, on this machine.

The demo grows with the project.  Today it issues a card, runs a bus purchase and a top-up through
it twice — in-process, and through a real pcscd with the card in the "Virtual PCD" reader — and
then rides Taiyuan's validators with it, tearing one tap on purpose, and uploads their journal
through an embedded broker to the backend, which verifies, counts and clears it.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from farelab._errors import CliError
from farelab.card import (
    CST,
    DEMO_ISSUER_ID,
    DEMO_KEYS,
    Alg,
    CardSnapshot,
    InProcessReader,
    Load,
    LoadAuthority,
    LoadAuthorization,
    LoadDone,
    NeedAuthorization,
    Psam,
    PsamKeys,
    Purchase,
    PurchaseDone,
    ReadCard,
    Reader,
    Refused,
    SimulatedCard,
    TacVerifier,
    Transmit,
    fen_to_yuan,
    personalise,
    save_image,
)

__all__ = ["register", "run_demo"]

BUS_TERMINAL = bytes.fromhex("000000000B05")
KIOSK_TERMINAL = bytes.fromhex("00000000F001")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``demo``."""
    demo = sub.add_parser(
        "demo",
        help="run the system end to end, narrated",
        description="Issue a card, then ride a bus and top up with it: in-process, and through "
        "a real pcscd with the card in the 'Virtual PCD' reader.",
    )
    demo.add_argument(
        "--dir",
        type=Path,
        metavar="DIR",
        help="keep the demo's card images in DIR (default: a temporary folder)",
    )
    demo.add_argument(
        "--no-pcsc", action="store_true", help="skip the part that goes through pcscd"
    )
    demo.set_defaults(func=_run)


def _say(text: str) -> None:
    print(text, flush=True)


class _Counting:
    """A reader wrapper that counts APDUs and the time spent in them."""

    def __init__(self, reader: Reader) -> None:
        self.reader = reader
        self.apdus = 0
        self.seconds = 0.0

    def transmit(self, apdu: bytes) -> bytes:
        start = time.perf_counter()
        out = self.reader.transmit(apdu)
        self.seconds += time.perf_counter() - start
        self.apdus += 1
        return out


def _run_flow(reader: _Counting, flow: ReadCard | Purchase) -> object:
    event: object = flow.start()
    while isinstance(event, Transmit):
        event = flow.receive(reader.transmit(event.apdu))
    return event


def _ride_and_top_up(reader: Reader, label: str, now: Callable[[], datetime], psam: Psam) -> None:
    counting = _Counting(reader)
    host = LoadAuthority(issuers={DEMO_ISSUER_ID: DEMO_KEYS})
    verifier = TacVerifier.of({DEMO_ISSUER_ID: DEMO_KEYS})

    snapshot = _run_flow(counting, ReadCard(records=[(0x1A, 2)]))
    if not isinstance(snapshot, CardSnapshot):
        raise CliError(f"{label}: reading the card failed: {snapshot}")
    _say(f"  [{label}] card {snapshot.serial}, issuer {snapshot.issuer_id.hex().upper()}")

    fare = 200
    done = _run_flow(counting, Purchase(psam=psam, card=snapshot, amount=fare, when=now()))
    if not isinstance(done, PurchaseDone):
        raise CliError(f"{label}: the bus purchase failed: {done}")
    assert snapshot.alg is not None
    tac_ok = (
        verifier.purchase_tac(
            alg=snapshot.alg,
            issuer_id=snapshot.issuer_id,
            serial8=snapshot.public.serial8,
            amount=done.amount,
            tx_type=done.tx_type,
            terminal=BUS_TERMINAL,
            ttc=done.ttc,
            day=done.day,
            time=done.time,
        )
        == done.tac
    )
    _say(
        f"  [{label}] bus fare {fen_to_yuan(fare)} yuan: balance "
        f"{fen_to_yuan(done.balance_before)} -> {fen_to_yuan(done.balance_after)}, "
        f"TAC {done.tac.hex().upper()} ({'verified' if tac_ok else 'NOT VERIFIED'} with the TAC "
        f"key), MAC2 {'good' if done.mac2_valid else 'BAD'}"
    )

    for amount in (10_000, 100_000):
        load = Load(terminal_id=KIOSK_TERMINAL, card=snapshot, amount=amount)
        event = load.receive(counting.transmit(load.start().apdu))
        if isinstance(event, Refused):
            _say(
                f"  [{label}] top-up {fen_to_yuan(amount)} yuan refused by the card "
                f"({event.sw_hex} {event.reason}): the balance may never pass 1000 yuan (R4)"
            )
            continue
        assert isinstance(event, NeedAuthorization)
        answer = host.authorize(event.request, when=now())
        if not isinstance(answer, LoadAuthorization):
            _say(
                f"  [{label}] top-up {fen_to_yuan(amount)} yuan refused by the host: "
                f"{answer.reason} ({answer.detail})"
            )
            continue
        credit = load.authorize(mac2=answer.mac2, day=answer.day, time=answer.time)
        result = load.receive(counting.transmit(credit.apdu))
        if not isinstance(result, LoadDone):
            raise CliError(f"{label}: the top-up failed: {result}")
        _say(
            f"  [{label}] top-up {fen_to_yuan(amount)} yuan authorized by the host: balance "
            f"{fen_to_yuan(result.balance_before)} -> {fen_to_yuan(result.balance_after)}, "
            f"TAC {result.tac.hex().upper()}"
        )
    per_apdu = counting.seconds / max(counting.apdus, 1) * 1000
    _say(f"  [{label}] {counting.apdus} APDUs, {per_apdu:.3f} ms per APDU round trip")


def run_demo(folder: Path, *, pcsc: bool) -> None:
    """The narrated demo, with its card images in ``folder``."""

    def now() -> datetime:
        return datetime.now(CST)

    path = folder / "demo-card.json"
    image = personalise(
        serial="31000000000000000001", issued=now().date(), balance=5000, alg=Alg.TDES
    )
    save_image(path, image)
    _say(
        f"1. Issued card {image.public.serial} with 50.00 yuan (3DES keys of the demo issuer): "
        f"{path}"
    )

    _say("2. In-process: the card object and the terminal in one process")
    reader = InProcessReader()
    reader.insert(SimulatedCard.from_file(path))
    reader.connect()
    psam = Psam(terminal_id=BUS_TERMINAL, issuers={DEMO_ISSUER_ID: PsamKeys.of(DEMO_KEYS)})
    _ride_and_top_up(reader, "in-process", now, psam)
    reader.remove()

    if pcsc:
        from farelab._pcsc_demo import through_pcscd  # noqa: PLC0415 - needs pcscd

        _say("3. Through pcscd: the card in the 'Virtual PCD' reader, the terminal on pyscard")
        through_pcscd(path, lambda r: _ride_and_top_up(r, "pcscd", now, psam))
    _say("4. Validators of Taiyuan (bus and Line 2 gates), the journal beside the card")
    _validators(folder, path, now)
    _say("5. Uplink and backend: an embedded MQTT broker, the backend verifying every TAC")
    asyncio.run(_backend(folder))
    _say("Done. Inspect the card with: farelab card show " + str(path))


def _validators(folder: Path, card_path: Path, now: Callable[[], datetime]) -> None:
    from farelab.validator import Journal, TapLine, load_config, replay  # noqa: PLC0415

    config_path = folder / "taiyuan.toml"
    config_path.write_text(DEMO_DEVICES, encoding="utf-8")
    config = load_config(config_path)
    journal = Journal(folder / "journal.db")
    start = now()
    steps = [
        ("bus-1", 0, None, "bus ride"),
        ("jiancaoping-in", 600, None, "metro entry at 尖草坪 Jiancaoping"),
        ("dananmen-out", 1500, "DEBIT", "exit at 大南门 Dananmen, card pulled right after DEBIT"),
        ("dananmen-out", 1504, None, "the rider taps again"),
    ]
    taps = [
        TapLine(i, device, card_path, start + timedelta(seconds=dt), pull)
        for i, (device, dt, pull, _) in enumerate(steps, 1)
    ]
    for (_, _, _, what), result in zip(steps, replay(config, taps, journal), strict=True):
        parts = [result.result]
        if result.reason:
            parts.append(result.reason)
        if result.result == "accepted":
            parts.append(f"fare {fen_to_yuan(result.fare_fen)}")
        if result.balance_fen is not None:
            parts.append(f"balance {fen_to_yuan(result.balance_fen)}")
        if result.grey:
            parts.append("(grey: outcome unknown until the card returns)")
        _say(f"  {what}: " + ", ".join(parts))
    rows = journal.transactions()
    done = [r for r in rows if r["status"] == "completed"]
    _say(
        f"  journal: {len(done)} completed transactions, {journal.outbox_rows} outbox rows "
        f"waiting for the uplink, {sum(r['status'] == 'pending' for r in rows)} pending"
    )
    journal.close()


async def _backend(folder: Path) -> None:
    from farelab._devices import register_configs  # noqa: PLC0415
    from farelab.backend import (  # noqa: PLC0415
        Store,
        clear_ledger,
        embedded_broker,
        report,
        run_worker,
    )
    from farelab.validator import Journal, MqttUplink  # noqa: PLC0415

    db = f"sqlite:///{folder / 'ledger.db'}"
    journal = Journal(folder / "journal.db")
    devices = sorted({device for _, device, _ in journal.outbox(10_000)})
    store = Store(db)
    registered, _ = register_configs(store, [folder / "taiyuan.toml"])  # before they upload
    store.close()
    _say(f"  registry: {len(registered)} devices registered from taiyuan.toml")
    async with embedded_broker() as broker:
        _say(f"  embedded broker (amqtt, MQTT 3.1.1) on {broker}")
        stop = asyncio.Event()
        worker = asyncio.create_task(
            run_worker(broker, db, issuers={DEMO_ISSUER_ID: DEMO_KEYS}, stop=stop)
        )
        uplink = MqttUplink(broker, devices)
        sender = asyncio.create_task(uplink.run(journal))
        started = time.monotonic()
        while journal.outbox_rows and time.monotonic() - started < 30:
            await asyncio.sleep(0.05)
        sender.cancel()
        stop.set()
        await asyncio.gather(sender, worker, return_exceptions=True)
    acked = sum(s.records_acked for s in uplink.stats.values())
    _say(f"  uploaded {acked} records; {journal.outbox_rows} left in the outbox")
    journal.close()
    store = Store(db)
    doc = report(store)
    cleared = clear_ledger(store).to_json()
    store.close()
    _say(
        f"  ledger: {doc['transactions']} transactions, purchases "
        f"{fen_to_yuan(doc['purchase_fen'])} yuan, {doc['forged']} forged, "
        f"{doc['duplicates']} duplicates, {doc['gaps']} gaps"
    )
    for row in cleared["settlements"]:
        _say(
            f"  settlement: {row['payer']} pays {row['payee']} "
            f"{fen_to_yuan(row['amount_fen'])} yuan"
        )


DEMO_DEVICES = """\
[[validator]]
id = "bus-1"
kind = "bus"
network = "taiyuan"
route = "1"
terminal_id = "000000000B01"
whitelist = ["1310000000000000"]

[[validator]]
id = "jiancaoping-in"
kind = "metro-gate"
network = "taiyuan"
line = "L2"
station = "尖草坪"
terminal_id = "000000020001"
whitelist = ["1310000000000000"]

[[validator]]
id = "dananmen-out"
kind = "metro-gate"
network = "taiyuan"
line = "L2"
station = "Dananmen"
terminal_id = "000000020701"
whitelist = ["1310000000000000"]
"""


def _run(args: argparse.Namespace) -> int:
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        run_demo(args.dir, pcsc=not args.no_pcsc)
        return 0
    with tempfile.TemporaryDirectory(prefix="farelab-demo-") as tmp:
        run_demo(Path(tmp), pcsc=not args.no_pcsc)
    return 0
