"""The synchronous cores under pytest-benchmark (``pytest bench/ --benchmark-only``): the
backend's per-batch work (decode, verify every TAC), a metro fare, the purse MAC and clearing.
Each checks its result; timing budgets are ``farelab bench``'s, never asserted here."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import numpy as np

from farelab.backend import classify, clear
from farelab.bench.ingest import make_batches
from farelab.card import CST, DEMO_ISSUER_ID, DEMO_KEYS, Alg, CardType, TacVerifier, mac
from farelab.protocol import BATCH_MAX, decode_batch, encode_batch
from farelab.validator import Rider, metro_trip_fare, shipped_networks


def test_decode_a_full_batch(benchmark: Any) -> None:
    batch = make_batches(BATCH_MAX, 1, BATCH_MAX, run=1)["bench-1-0"][0]
    payload = encode_batch(batch)
    decoded = benchmark(decode_batch, payload)
    assert len(decoded.records) == BATCH_MAX
    assert encode_batch(decoded) == payload


def test_verify_every_tac_of_a_full_batch(benchmark: Any) -> None:
    """A day's traffic: the cards are known to the verifier's key cache after the first batch."""
    batch = decode_batch(encode_batch(make_batches(BATCH_MAX, 1, BATCH_MAX, run=2)["bench-2-0"][0]))
    verifier = TacVerifier.of({DEMO_ISSUER_ID: DEMO_KEYS})
    verdicts = benchmark(classify, batch, verifier)
    assert [c.verdict for c in verdicts] == ["ok"] * BATCH_MAX


def test_metro_fare_across_taiyuan_line_2(benchmark: Any) -> None:
    net = shipped_networks()["taiyuan"]
    entry, exit_ = net.station("尖草坪").id, net.station("西桥").id
    when = datetime(2026, 11, 23, 8, tzinfo=CST)
    quote = benchmark(
        metro_trip_fare,
        net,
        Rider(CardType.ADULT, local=True),
        entry=entry,
        exit_=exit_,
        entered_at=when,
        now=when.replace(hour=9),
        previous=None,
    )
    assert quote.base_fen == net.max_fare_fen  # end to end of the line: the top band


def test_purse_mac_with_a_fresh_session_key(benchmark: Any) -> None:
    keys = iter(range(1, 10**9))

    def one() -> bytes:
        return mac(Alg.TDES, next(keys).to_bytes(8, "big"), bytes(20))

    assert len(benchmark(one)) == 4


def test_clearing_of_a_million_transactions(benchmark: Any) -> None:
    rng = np.random.default_rng(6)
    n = 1_000_000
    columns = {
        "issuers": rng.integers(0, 20, n),
        "operators": rng.integers(0, 30, n),
        "days": rng.integers(0, 7, n),
        "loads": rng.random(n) < 0.05,
        "amounts": rng.integers(0, 800, n),
    }
    result = benchmark(
        clear,
        **columns,
        issuer_names=[f"I{i}" for i in range(20)],
        operator_names=[f"O{i}" for i in range(30)],
        day_names=[f"D{i}" for i in range(7)],
    )
    assert int(result.positions.sum()) == 0
