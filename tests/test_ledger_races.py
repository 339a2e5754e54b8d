"""SQLite ingest decides a batch before taking the writers' lock: what another worker commits in
between must never count a transaction twice, lose one, or let a clone through."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from farelab.backend._ingest import classify
from farelab.backend._registry import register
from farelab.backend._report import report
from farelab.backend._store import IngestResult, Store
from farelab.bench.ingest import bench_entry, make_batches
from farelab.card import DEMO_ISSUER_ID, DEMO_KEYS, TacVerifier
from farelab.protocol import Batch

VERIFIER = TacVerifier.of({DEMO_ISSUER_ID: DEMO_KEYS})
OTHER_TERMINAL = "B00000000077"


@pytest.fixture
def ledgers(tmp_path: Path) -> Iterator[tuple[Store, Store]]:
    """Two workers' connections to one SQLite ledger."""
    url = f"sqlite:///{tmp_path}/ledger.db"
    first, second = Store(url), Store(url)
    register(first, bench_entry("bench-3-0", 0))
    register(first, replace(bench_entry("bench-3-other", 0), terminal=OTHER_TERMINAL))
    yield first, second
    first.close()
    second.close()


def ingest(store: Store, batch: Batch) -> IngestResult:
    return store.ingest(batch.device, batch.batch_id, classify(batch, VERIFIER))


def meanwhile(store: Store, monkeypatch: pytest.MonkeyPatch, act: Callable[[], Any]) -> list[int]:
    """Make ``act`` run once right after ``store`` has read the ledger for its first batch (the
    other worker committing between this worker's read and its write); the list counts the
    reads ``store`` makes."""
    reads: list[int] = []
    read = store._read

    def racing_read(*args: Any, **kwargs: Any) -> Callable[[], Any]:
        fetch = read(*args, **kwargs)

        def fetched() -> Any:
            view = fetch()
            reads.append(1)
            if len(reads) == 1:
                act()
            return view

        return fetched

    monkeypatch.setattr(store, "_read", racing_read)
    return reads


def test_a_batch_another_worker_commits_meanwhile_is_counted_once(
    ledgers: tuple[Store, Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = ledgers
    [batch] = make_batches(200, 1, 200, run=3)["bench-3-0"]
    reads = meanwhile(first, monkeypatch, lambda: ingest(second, batch))
    result = ingest(first, batch)
    assert (result.inserted, result.duplicates) == (0, 200)
    assert len(reads) == 2  # decided again under the lock
    doc = report(first)
    assert (doc["transactions"], doc["duplicates"], doc["clones"]) == (200, 200, 0)


def test_a_gap_filled_twice_at_once_is_counted_once(
    ledgers: tuple[Store, Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The journal's top sequence number does not move: the primary key catches the second.
    first, second = ledgers
    low, middle, high = make_batches(300, 1, 100, run=3)["bench-3-0"]
    ingest(first, low)
    ingest(first, high)
    reads = meanwhile(first, monkeypatch, lambda: ingest(second, middle))
    result = ingest(first, middle)
    assert (result.inserted, result.duplicates) == (0, 100)
    assert len(reads) == 2
    doc = report(first)
    assert (doc["transactions"], doc["gaps"], doc["clones"]) == (300, 0, 0)


def test_a_clone_committed_meanwhile_is_still_found(
    ledgers: tuple[Store, Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = ledgers
    [batch] = make_batches(200, 1, 200, run=3)["bench-3-0"]
    [twins] = make_batches(200, 1, 200, run=3, terminal=bytes.fromhex(OTHER_TERMINAL))["bench-3-0"]
    other = Batch(1, "bench-3-other", twins.records)
    reads = meanwhile(first, monkeypatch, lambda: ingest(second, other))
    result = ingest(first, batch)
    assert len(reads) == 2  # the counted index refused the first write
    assert (result.inserted, len(result.clones)) == (200, 200)
    doc = report(first)
    assert (doc["transactions"], doc["clones"]) == (200, 200)


def test_a_batch_nobody_races_is_decided_once(ledgers: tuple[Store, Store]) -> None:
    first, _ = ledgers
    reads: list[int] = []
    read = first._read

    def counting(*args: Any, **kwargs: Any) -> Callable[[], Any]:
        reads.append(1)
        return read(*args, **kwargs)

    first._read = counting  # type: ignore[method-assign]
    [batch] = make_batches(200, 1, 200, run=3)["bench-3-0"]
    assert ingest(first, batch).inserted == 200
    assert len(reads) == 1
