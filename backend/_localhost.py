"""An in-process load host: the backend's load authorization run inside a kiosk's own process,
with the demo issuer's keys and a SQLite ledger of its own (``farelab topup`` without a broker).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from farelab.backend._loads import ensure_schema, handle_load_message
from farelab.backend._registry import DeviceEntry, lookup, register
from farelab.backend._store import Store
from farelab.card import DEMO_ISSUER_ID, DEMO_KEYS, LoadAuthority, TacVerifier
from farelab.protocol import check_client_id

__all__ = ["LocalHost"]


class LocalHost:
    """An in-process host with the demo issuer's keys and a SQLite ledger of its own.

    The host runs in the kiosk's own process, so it registers that kiosk in its ledger's device
    registry the first time (a kiosk revoked there stays revoked).
    """

    def __init__(self, ledger: Path, kiosk: str, *, terminal: bytes) -> None:
        """
        Args:
            ledger: the host's database file.
            kiosk: this kiosk's id (ValueError unless it can be a topic level).
            terminal: the kiosk's 6-byte terminal id, as its load requests carry it.
        """
        check_client_id(kiosk, "kiosk id")
        self._store = Store(f"sqlite:///{ledger}")
        ensure_schema(self._store)
        if lookup(self._store, kiosk) is None:
            register(
                self._store,
                DeviceEntry(
                    id=kiosk,
                    role="kiosk",
                    operator=kiosk[:8],
                    kinds=frozenset({"load", "refund"}),
                    terminal=terminal.hex().upper(),
                ),
            )
        self._authority = LoadAuthority(issuers={DEMO_ISSUER_ID: DEMO_KEYS})
        self._verifier = TacVerifier.of({DEMO_ISSUER_ID: DEMO_KEYS})
        self._kiosk = kiosk

    async def call(self, message: dict[str, Any]) -> dict[str, Any]:
        """Handled at once, in this process."""
        payload = json.dumps(message).encode()
        return await asyncio.to_thread(
            handle_load_message,
            self._store,
            self._authority,
            self._verifier,
            self._kiosk,
            payload,
        )

    def close(self) -> None:
        """Close the ledger."""
        self._store.close()
