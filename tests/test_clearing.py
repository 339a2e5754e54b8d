"""Clearing between operators and issuers: a card issued in one city riding in another is paid
for by its issuer to that city's operator; positions net to zero each day; exports agree."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from farelab._devices import entry_of
from farelab.backend._clearing import clear, clear_ledger
from farelab.backend._ingest import classify
from farelab.backend._registry import register
from farelab.backend._store import Store
from farelab.card import DEMO_ISSUER_ID, DEMO_KEYS, TacVerifier
from farelab.protocol import Batch
from farelab.validator._device import Device
from tests.validator_support import NON_LOCAL_ISSUER, Lab, bus, gate, new_card

VERIFIER = TacVerifier.of({DEMO_ISSUER_ID: DEMO_KEYS, NON_LOCAL_ISSUER: DEMO_KEYS})


def operator(device: Device, name: str) -> Device:
    from dataclasses import replace  # noqa: PLC0415

    return replace(device, operator=name.encode())


def ride_two_cities(store: Store) -> dict[tuple[str, str], int]:
    """Two issuers' cards ride Taiyuan's metro and Changzhou's buses; returns what each issuer
    owes each operator, from the taps' own results."""
    devices = [
        operator(gate("taiyuan", "尖草坪", device_id="ty-in"), "TYMETRO"),
        operator(gate("taiyuan", "西桥", device_id="ty-out"), "TYMETRO"),
        operator(bus("changzhou", device_id="cz-bus"), "CZBUS"),
    ]
    for configured in devices:  # the ledger takes batches only from registered devices
        register(store, entry_of(configured))
    lab = Lab(devices)
    owed: dict[tuple[str, str], int] = {}
    for k, issuer in enumerate((DEMO_ISSUER_ID, NON_LOCAL_ISSUER)):
        card = new_card(balance=20_000, issuer=issuer, serial=str(900 + k))
        for hour in range(3):
            for device, op in (("ty-in", "TYMETRO"), ("ty-out", "TYMETRO"), ("cz-bus", "CZBUS")):
                result = lab.tap(device, card, 3600 * hour + 600 * len(owed) + 60 * k)
                key = (issuer.hex().upper(), op)
                owed[key] = owed.get(key, 0) + result.fare_fen
    records = [r for _, _, r in lab.journal.outbox(10_000)]
    for device in ("ty-in", "ty-out", "cz-bus"):
        mine = tuple(
            r
            for r, (_, d, _) in zip(records, lab.journal.outbox(10_000), strict=True)
            if d == device
        )
        batch = Batch(1, device, mine)
        store.ingest(device, 1, classify(batch, VERIFIER))
    return owed


def test_issuers_pay_the_operators_their_cards_rode(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'ledger.db'}")
    owed = ride_two_cities(store)
    result = clear_ledger(store)
    doc = result.to_json()
    payments = {(r["payer"], r["payee"]): r["amount_fen"] for r in doc["settlements"]}
    for (issuer, op), amount in owed.items():
        if amount:
            assert payments[(f"issuer:{issuer}", f"operator:{op}")] == amount
    assert sum(doc["net_positions"].values()) == 0
    assert all(sum(day.values()) == 0 for day in doc["positions"].values())
    csv = result.to_csv().splitlines()
    assert csv[0] == "day,party,receivable_fen,payable_fen,net_fen"
    assert sum(int(line.rsplit(",", 1)[1]) for line in csv[1:]) == 0


def test_loads_flow_from_the_kiosk_operator_to_the_issuer() -> None:
    result = clear(
        issuers=np.array([0, 0]),
        operators=np.array([0, 1]),
        days=np.array([0, 0]),
        loads=np.array([False, True]),
        amounts=np.array([300, 10_000]),
        issuer_names=["1310"],
        operator_names=["METRO", "KIOSK"],
        day_names=["2026-11-23"],
    )
    net = result.to_json()["net_positions"]
    assert net == {"issuer:1310": 10_000 - 300, "operator:METRO": 300, "operator:KIOSK": -10_000}


def test_backend_clear_command_writes_csv_and_json(tmp_path: Path) -> None:
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    store = Store(f"sqlite:///{tmp_path / 'ledger.db'}")
    ride_two_cities(store)
    store.close()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "farelab",
            "backend",
            "clear",
            "--db",
            f"sqlite:///{tmp_path / 'ledger.db'}",
            "--csv",
            str(tmp_path / "c.csv"),
            "--json",
            str(tmp_path / "c.json"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "settlement:" in out.stdout
    doc = json.loads((tmp_path / "c.json").read_text())
    assert doc["transactions"] == 18
    assert (tmp_path / "c.csv").read_text().startswith("day,party")


def test_clearing_pays_the_registered_operator_not_the_one_a_record_names(tmp_path: Path) -> None:
    """The operator is not covered by the TAC: a record naming another one is paid to the
    device's registered operator, and the mismatch is an anomaly."""
    from dataclasses import replace  # noqa: PLC0415

    from farelab.backend._report import report  # noqa: PLC0415

    store = Store(f"sqlite:///{tmp_path / 'ledger.db'}")
    device = operator(bus("changzhou", device_id="cz-bus"), "CZBUS")
    register(store, entry_of(device))
    lab = Lab([device])
    lab.tap("cz-bus", new_card(balance=5000, serial="901"), 0)
    [record] = [replace(r, operator="EVIL") for _, _, r in lab.journal.outbox(10)]
    store.ingest("cz-bus", 1, classify(Batch(1, "cz-bus", (record,)), VERIFIER))
    parties = clear_ledger(store).parties
    doc = report(store)
    store.close()
    assert "operator:CZBUS" in parties
    assert "operator:EVIL" not in parties
    assert doc["field_mismatches"] == 1


def test_chunked_sums_match_a_transaction_by_transaction_ledger() -> None:
    """Over several chunks and a ragged end, every flow is the sum of its own transactions."""
    from farelab.backend._clearing import CHUNK  # noqa: PLC0415

    n = 3 * CHUNK + 17
    rng = np.random.default_rng(3)
    issuers, operators = rng.integers(0, 4, n), rng.integers(0, 5, n)
    days, amounts = rng.integers(0, 3, n), rng.integers(0, 800, n)
    loads = (rng.random(n) < 0.1).astype(np.int64)  # truthy integers, as a column may come
    result = clear(
        issuers=issuers,
        operators=operators,
        days=days,
        loads=loads,  # type: ignore[arg-type]
        amounts=amounts,
        issuer_names=[f"I{i}" for i in range(4)],
        operator_names=[f"O{i}" for i in range(5)],
        day_names=["D0", "D1", "D2"],
    )
    expected = np.zeros((3, 9, 9), dtype=np.int64)
    for i, o, d, load, a in zip(issuers, operators, days, loads, amounts, strict=True):
        payer, payee = (4 + o, i) if load else (i, 4 + o)
        expected[d, payer, payee] += a
    assert result.transactions == n
    assert (result.flows == expected).all()
    assert not result.positions.sum(axis=1).any()
