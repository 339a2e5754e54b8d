"""The demo's pcscd part: our card in the "Virtual PCD" reader, the terminal on pyscard."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from farelab._errors import CliError
from farelab.card import (
    PcscdError,
    PcscReader,
    Reader,
    SimulatedCard,
    ViccClient,
    ViccError,
    running_pcscd,
)

__all__ = ["through_pcscd"]

READER = "Virtual PCD 00 00"


def through_pcscd(path: Path, scenario: Callable[[Reader], None]) -> None:
    """Present the card image at ``path`` to vpcd and run ``scenario`` on a pyscard reader."""
    try:
        with running_pcscd(path.parent / "pcscd.log"):
            _present(path, scenario)
    except PcscdError as exc:
        raise CliError(f"{exc} (or use 'farelab demo --no-pcsc')") from None


def _present(path: Path, scenario: Callable[[Reader], None]) -> None:
    card = SimulatedCard.from_file(path)
    client = ViccClient(card)
    try:
        client.connect(timeout=5)
    except ViccError as exc:
        raise CliError(str(exc)) from None
    stop = threading.Event()
    thread = threading.Thread(target=client.serve, kwargs={"stop": stop}, name="vicc")
    thread.start()
    try:
        reader = PcscReader(READER)
        if not reader.wait_for_card(5):
            raise CliError(f"the card never appeared in {READER!r}")
        reader.connect()
        try:
            scenario(reader)
        finally:
            reader.close()
    finally:
        stop.set()
        thread.join()
