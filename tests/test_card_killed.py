"""Anti-tearing with real processes: a card hammered by purchases and loads, SIGKILLed at random
instants (inside ``save_image`` too), always reloads whole, and its purse agrees with its own log
and with the intents recorded before each DEBIT/CREDIT."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from farelab.card import (
    CardImage,
    InProcessReader,
    LogRecord,
    MemoryStore,
    ProofFound,
    ProofMissing,
    SimulatedCard,
    TransactionProof,
    TxType,
    drive,
    load_image,
    personalise,
    save_image,
)
from tests.cli_support import ROOT

INITIAL = 50_000


def proof(image: CardImage, tx_type: TxType, counter: int) -> object:
    reader = InProcessReader()
    reader.insert(SimulatedCard(image, store=MemoryStore()))
    reader.transmit(bytes.fromhex("00A4040008A000000632010105"))
    return drive(reader, TransactionProof(tx_type=tx_type, counter=counter))


def test_kill_at_any_instant_never_corrupts_the_card_image(tmp_path: Path) -> None:
    card_path, intents = tmp_path / "card.json", tmp_path / "intents.log"
    save_image(card_path, personalise(serial="8", issued=date(2026, 1, 1), balance=INITIAL))
    rng = random.Random(20261123)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(30):
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.card_worker", str(card_path), str(intents)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        image = load_image(card_path)  # never half-written
        # The card's own arithmetic: loads − purchases of its counters explain the balance.
        lines = intents.read_text().split()
        records = [tuple(lines[i : i + 3]) for i in range(0, len(lines), 3)]
        # A counter commits at most once, and only its last attempt can have: an earlier attempt
        # with the same counter would have moved the counter on had it committed.
        purchases = list(
            {int(c): (int(a), int(c)) for k, a, c in records if k == "purchase"}.values()
        )
        loads = list({int(c): (int(a), int(c)) for k, a, c in records if k == "load"}.values())
        done_p = [a for a, c in purchases if c <= image.offline_counter]
        done_l = [a for a, c in loads if c <= image.online_counter]
        assert image.balance == INITIAL - sum(done_p) + sum(done_l)
        # Every committed transaction had its intent first.
        assert len(done_p) == image.offline_counter
        assert len(done_l) == image.online_counter
        # GET TRANSACTION PROOF tells the committed from the uncommitted, for the newest of each.
        for kind, tx_type, attempts, counter_now in (
            ("purchase", TxType.PURCHASE, purchases, image.offline_counter),
            ("load", TxType.LOAD, loads, image.online_counter),
        ):
            if not attempts:
                continue
            amount, counter = attempts[-1]
            found = proof(image, tx_type, counter)
            committed = counter <= counter_now
            assert isinstance(found, ProofFound if committed else ProofMissing), kind
            if committed and counter == counter_now:
                newest = next(
                    LogRecord.decode(r) for r in image.log if LogRecord.decode(r).tx_type == tx_type
                )
                assert newest.amount == amount
    assert load_image(card_path).offline_counter > 0


def test_card_pulled_after_initialize_or_update_capp_keeps_its_old_state() -> None:
    from datetime import UTC, datetime  # noqa: PLC0415

    from farelab.card import (  # noqa: PLC0415
        DEMO_ISSUER_ID,
        DEMO_KEYS,
        CappUpdate,
        CardRemovedError,
        CardSnapshot,
        MetroRecord,
        MetroStatus,
        Psam,
        PsamKeys,
        Purchase,
        ReadCard,
        Transmit,
        step_of,
    )

    for step in ("INIT", "UPDATE_CAPP"):
        card = SimulatedCard(
            personalise(serial="8", issued=date(2026, 1, 1), balance=900), store=MemoryStore()
        )
        before = card.image
        reader = InProcessReader()
        reader.insert(card)
        snap = drive(reader, ReadCard(records=[]))
        assert isinstance(snap, CardSnapshot)
        psam = Psam(terminal_id=b"\x00" * 6, issuers={DEMO_ISSUER_ID: PsamKeys.of(DEMO_KEYS)})
        record = MetroRecord(status=MetroStatus.ENTERED).encode()
        flow = Purchase(
            psam=psam,
            card=snap,
            amount=0,
            when=datetime.now(UTC),
            composite=True,
            capp=[CappUpdate(0x1A, 1, record)],
        )
        reader.pull_after(lambda apdu, s=step: step_of(apdu) == s)  # type: ignore[misc]
        event: object = flow.start()
        try:
            while isinstance(event, Transmit):
                event = flow.receive(reader.transmit(event.apdu))
        except CardRemovedError:
            pass
        assert card.image == before
