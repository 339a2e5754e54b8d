"""A process that hammers a card image file with purchases and loads until it is killed.

Before each DEBIT or CREDIT it appends an intent line (fsync'ed) to a side log: type, amount,
proof counter.  Run: ``python -m tests.card_worker CARD.json INTENTS.log``.
"""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime
from pathlib import Path

from farelab.card import (
    DEMO_ISSUER_ID,
    DEMO_KEYS,
    CardSnapshot,
    InProcessReader,
    Load,
    LoadAuthority,
    LoadAuthorization,
    NeedAuthorization,
    Psam,
    PsamKeys,
    Purchase,
    ReadCard,
    SimulatedCard,
    Transmit,
    drive,
)

TERMINAL = bytes.fromhex("0000000000C1")


def main(card_path: Path, intents: Path) -> None:
    reader = InProcessReader()
    reader.insert(SimulatedCard.from_file(card_path))
    reader.connect()
    psam = Psam(terminal_id=TERMINAL, issuers={DEMO_ISSUER_ID: PsamKeys.of(DEMO_KEYS)})
    host = LoadAuthority(issuers={DEMO_ISSUER_ID: DEMO_KEYS})
    fd = os.open(intents, os.O_WRONLY | os.O_APPEND | os.O_CREAT)

    def intent(kind: str, amount: int, counter: int) -> None:
        os.write(fd, f"{kind} {amount} {counter}\n".encode())
        os.fsync(fd)

    print("ready", flush=True)
    i = 0
    while True:
        i += 1
        snap = drive(reader, ReadCard(records=[]))
        assert isinstance(snap, CardSnapshot)
        now = datetime.now(UTC)
        if i % 3:
            flow = Purchase(psam=psam, card=snap, amount=1 + i % 7, when=now)
            event: object = flow.start()
            while isinstance(event, Transmit):
                if flow.in_flight is not None:
                    intent("purchase", flow.in_flight.amount, flow.in_flight.proof_counter)
                event = flow.receive(reader.transmit(event.apdu))
        else:
            load = Load(terminal_id=TERMINAL, card=snap, amount=10)
            ask = load.receive(reader.transmit(load.start().apdu))
            if isinstance(ask, NeedAuthorization):
                answer = host.authorize(ask.request, when=now)
                assert isinstance(answer, LoadAuthorization)
                credit = load.authorize(mac2=answer.mac2, day=answer.day, time=answer.time)
                intent("load", 10, ask.request.counter + 1)
                load.receive(reader.transmit(credit.apdu))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
