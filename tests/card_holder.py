"""A process that holds a card in its field: it presents the card image (and so takes its lock),
prints ``ready``, waits until a release file exists, makes one purchase of AMOUNT fen with the
image it read at presentation, and takes the card away.

Run: ``python -m tests.card_holder CARD.json RELEASE AMOUNT``.
"""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from farelab.card import (
    DEMO_ISSUER_ID,
    DEMO_KEYS,
    CardSnapshot,
    InProcessReader,
    Psam,
    PsamKeys,
    Purchase,
    PurchaseDone,
    ReadCard,
    SimulatedCard,
    drive,
)

TERMINAL = bytes.fromhex("0000000000C2")


def main(card_path: Path, release: Path, amount: int) -> None:
    reader = InProcessReader()
    reader.insert(SimulatedCard.from_file(card_path))
    snapshot = drive(reader, ReadCard(records=[]))
    assert isinstance(snapshot, CardSnapshot)
    print("ready", flush=True)
    while not release.exists():
        time.sleep(0.01)
    psam = Psam(terminal_id=TERMINAL, issuers={DEMO_ISSUER_ID: PsamKeys.of(DEMO_KEYS)})
    flow = Purchase(psam=psam, card=snapshot, amount=amount, when=datetime.now(UTC))
    done = drive(reader, flow)
    assert isinstance(done, PurchaseDone), done
    reader.remove()
    print("paid", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
