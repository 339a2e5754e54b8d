"""The demo's pcscd part: our card in the "Virtual PCD" reader, the terminal on pyscard."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from card import Reader, SimulatedCard
from card._pcsc import PcscReader, list_readers
from card._vicc import ViccClient, ViccError
from farelab._errors import CliError

__all__ = ["through_pcscd"]

READER = "Virtual PCD 00 00"


def _ensure_pcscd() -> None:
    if READER in list_readers():
        return
    binary = shutil.which("pcscd") or "/usr/sbin/pcscd"
    if not Path(binary).exists():
        raise CliError(
            "pcscd is not installed: run 'bash .ci/install' as root (Debian packages pcscd "
            "vsmartcard-vpcd), or use 'farelab demo --no-pcsc'"
        )
    subprocess.run([binary], check=False, capture_output=True)
    deadline = time.monotonic() + 10
    while READER not in list_readers():
        if time.monotonic() > deadline:
            raise CliError(
                f"pcscd does not list {READER!r}: is the vsmartcard-vpcd driver installed? "
                "(or use 'farelab demo --no-pcsc')"
            )
        time.sleep(0.1)


def through_pcscd(path: Path, scenario: Callable[[Reader], None]) -> None:
    """Present the card image at ``path`` to vpcd and run ``scenario`` on a pyscard reader."""
    _ensure_pcscd()
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
