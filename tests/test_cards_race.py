"""Two operators taking the same card action at the same instant on a PostgreSQL ledger: one
journal entry, and both get its answer (no traceback for the one that came second)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import psycopg
import pytest

from farelab.backend import NewCard, Store, card_action, issue_card
from farelab.card import CST, DEMO_ISSUER_ID

PG = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture
def pg_url() -> Iterator[str]:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(PG, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL on 127.0.0.1:5432 (database test) is needed: {exc}")
    admin.execute(f"CREATE SCHEMA {schema}")
    yield f"{PG}?options=-csearch_path%3D{schema}"
    admin.execute(f"DROP SCHEMA {schema} CASCADE")
    admin.close()


class MeetingStore(Store):
    """A ledger connection that, before its first look at the journal, waits for the other:
    both then find nothing journalled and both write."""

    def __init__(self, url: str, barrier: threading.Barrier) -> None:
        super().__init__(url)
        self._barrier = barrier
        self._met = False

    def execute(self, query: str, args: Any = ()) -> Any:
        cursor = super().execute(query, args)
        if "FROM card_events WHERE id" in query and not self._met:
            self._met = True
            self._barrier.wait(10)
        return cursor


def test_the_same_loss_report_taken_twice_at_once_is_journalled_once(pg_url: str) -> None:
    at = datetime(2026, 3, 2, 10, 0, tzinfo=CST)
    setup = Store(pg_url)
    issued = issue_card(
        setup,
        NewCard("00003100000000000077", DEMO_ISSUER_ID.hex().upper(), 0),
        profile="nanjing",
        at=at,
    )
    assert issued["result"] == "done"
    setup.close()
    barrier = threading.Barrier(2)
    answers: list[dict[str, Any]] = []
    errors: list[BaseException] = []

    def operator() -> None:
        store = MeetingStore(pg_url, barrier)
        try:
            answers.append(
                card_action(store, "00003100000000000077", "report_loss", at, kind="formal")
            )
        except BaseException as exc:
            errors.append(exc)
        finally:
            store.close()

    threads = [threading.Thread(target=operator) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert [a["result"] for a in answers] == ["done", "done"]
    assert answers[0] == answers[1]
    check = Store(pg_url)
    try:
        rows = check.execute(
            "SELECT count(*) FROM card_events WHERE card_serial = ? AND action = 'report_loss'",
            ("00003100000000000077",),
        ).fetchone()[0]
    finally:
        check.close()
    assert rows == 1
