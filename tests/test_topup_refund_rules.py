"""A card's balance is paid out once: a card whose balance moved to a replacement card (R6) is
not refunded in cash as well, and the kiosk pays cash only for a refund the host counted."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from farelab.card import DEMO_ISSUER_ID, DEMO_KEYS, Psam, PsamKeys
from farelab.topup import LoadResult
from tests.cli_support import farelab as run_farelab
from tests.test_topup import TERMINAL, CapHost, Station

PSAM = Psam(terminal_id=TERMINAL, issuers={DEMO_ISSUER_ID: PsamKeys.of(DEMO_KEYS)})
OLD = "66".rjust(20, "0")  # the station's card


def claim_transfer(host: CapHost) -> None:
    """The host moved the card's balance to a replacement card (as ``_transfer`` claims it)."""
    host.store.execute(
        "INSERT INTO transfers (old_serial, load_id, amount) VALUES (?, 't-1', 4321)", (OLD,)
    )


def refunds(host: CapHost) -> int:
    return int(
        host.store.execute(
            "SELECT coalesce(sum(amount), 0) FROM loads WHERE kind = 'refund'"
        ).fetchone()[0]
    )


async def refund(station: Station) -> LoadResult:
    return await station.kiosk.refund(station._run, PSAM)


async def test_a_card_whose_balance_moved_to_a_replacement_is_not_refunded(tmp_path: Path) -> None:
    station = Station(tmp_path, balance=4321)
    claim_transfer(station.host)
    result = await refund(station)
    assert (result.result, result.reason) == ("refused", "already_transferred")
    assert station.card.image.balance == 4321  # asked before the card was emptied
    assert refunds(station.host) == 0


async def test_the_host_refuses_the_refund_of_a_balance_moved_since_the_check(
    tmp_path: Path,
) -> None:
    """The transfer lands between the check and the refund's record: no cash, nothing counted,
    and the kiosk does not keep asking."""
    station = Station(tmp_path, balance=4321)
    host = station.host
    asked = host.call

    async def racing(message: dict[str, Any]) -> dict[str, Any]:
        if message.get("op") == "refund":
            claim_transfer(host)
        return await asked(message)

    host.call = racing  # type: ignore[method-assign]
    result = await refund(station)
    assert (result.result, result.reason) == ("refused", "already_transferred")
    assert "no cash" in result.message
    assert refunds(host) == 0
    assert station.journal.unsettled() == []


async def test_a_refund_the_host_did_not_count_pays_no_cash(tmp_path: Path) -> None:
    station = Station(tmp_path, balance=4321)
    host = station.host
    asked = host.call

    async def failing(message: dict[str, Any]) -> dict[str, Any]:
        if message.get("op") == "refund":
            return {"id": message["id"], "result": "error", "reason": "tac_invalid"}
        return await asked(message)

    host.call = failing  # type: ignore[method-assign]
    result = await refund(station)
    assert (result.result, result.reason) == ("refused", "tac_invalid")
    assert [p.kind for p in station.journal.unsettled()] == ["refund"]  # told again later


async def test_a_card_is_not_emptied_for_a_refund_while_the_host_is_unreachable(
    tmp_path: Path,
) -> None:
    station = Station(tmp_path, balance=4321)
    station.host.down = True
    result = await refund(station)
    assert (result.result, result.reason) == ("refused", "host_unreachable")
    assert station.card.image.balance == 4321


def farelab(cwd: Path, *args: str) -> dict[str, object]:
    """``farelab …`` in ``cwd``, its state files in ``cwd/data``."""
    out = run_farelab(*args, cwd=cwd, env={**os.environ, "XDG_DATA_HOME": str(cwd / "data")})
    assert out.stdout, out.stderr
    doc: dict[str, object] = json.loads(out.stdout)
    return doc


def test_a_balance_moved_onto_a_new_card_is_not_also_refunded_in_cash(tmp_path: Path) -> None:
    """card new a and b; load a 100; transfer a's balance onto b; refund a: 200 yuan out for
    100 in, before."""
    for name, serial in (("a.json", "650001"), ("b.json", "650002")):
        made = run_farelab("card", "new", name, "--serial", serial, cwd=tmp_path)
        assert made.returncode == 0, made.stderr
    assert farelab(tmp_path, "topup", "load", "a.json", "--amount", "100", "--json")["result"] == (
        "loaded"
    )
    moved = farelab(
        tmp_path,
        "topup",
        "transfer",
        "b.json",
        "--old",
        "650001",
        "--reason",
        "exchange",
        "--reported",
        "2026-11-01",
        "--profile",
        "hangzhou",
        "--json",
    )
    assert (moved["result"], moved["amount_fen"]) == ("loaded", 10_000)
    refused = farelab(tmp_path, "topup", "refund", "a.json", "--json")
    assert (refused["result"], refused["reason"]) == ("refused", "already_transferred")
    shown = farelab(tmp_path, "card", "show", "a.json", "--json")
    assert shown["balance_fen"] == 10_000


async def test_a_card_whose_balance_is_moving_to_a_replacement_is_not_loaded(
    tmp_path: Path,
) -> None:
    """Between the transfer's authorization and its confirmation the old card is not on the
    hotlist yet: a load then would be left on a card about to be blocked."""
    station = Station(tmp_path, balance=4321)
    claim_transfer(station.host)
    result = await station.load(1000)
    assert (result.result, result.reason) == ("refused", "replaced")
    assert station.card.image.balance == 4321
    assert station.host.loads() == {}
