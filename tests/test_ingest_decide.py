"""The ledger's ingest rules as pure functions, with no database, broker or thread: what a batch
does is ``decide(batch, what the ledger knows)``.  What the registry knows wins over what a
record says, the TAC-covered fields are checked, a record's identity includes its journal's
epoch, a resent record is a duplicate and a counted card transaction is counted once."""

from __future__ import annotations

from dataclasses import replace

from farelab.backend._ingest import (
    SEQ_JUMP,
    TIME_TOLERANCE_MS,
    Classified,
    Counted,
    Decision,
    LedgerView,
    _verdict,
    admit,
    balance_breaks,
    classify,
    counter_ranges,
    decide,
    own_keys,
    records_wanted,
    tac_time_ms,
)
from farelab.backend._registry import DeviceEntry
from farelab.backend._store import ledger_rows
from farelab.bench.ingest import bench_entry, make_batches
from farelab.card import DEMO_ISSUER_ID, DEMO_KEYS, TacVerifier
from farelab.protocol import Batch, Record, decode_batch, encode_batch

DEVICE = "bench-3-0"
ENTRY = bench_entry(DEVICE, 0)
EPOCH = 77
# Four rides of one card, as the wire delivers them.
RECORDS = decode_batch(
    encode_batch(make_batches(4, 1, 4, run=3, cards_per_device=1)[DEVICE][0])
).records


def decide_on(
    records: tuple[Record, ...] | list[Record],
    view: LedgerView | None = None,
    entry: DeviceEntry | None = ENTRY,
    verdict: str = "ok",
) -> Decision:
    rows = [Classified(DEVICE, r, verdict) for r in records]
    return decide(DEVICE, EPOCH << 40 | 1, rows, replace(view or LedgerView(), entry=entry))


def kinds(decision: Decision) -> list[str]:
    return [a.kind for a in decision.anomalies]


def verdicts(decision: Decision) -> list[str]:
    return [stored.verdict for stored in decision.inserts]


def counted(record: Record, *, device: str = DEVICE, epoch: int = EPOCH) -> Counted:
    return Counted(
        device, epoch, record.seq, record.balance_before, record.amount, record.at_ms, record
    )


def test_batches_only_from_registered_unrevoked_validators() -> None:
    kiosk = DeviceEntry(
        id="k", role="kiosk", operator="OP", kinds=frozenset({"load"}), terminal="0000000000AA"
    )
    assert admit(DEVICE, None) == "unknown_device"
    assert admit(DEVICE, replace(ENTRY, revoked=True)) == "revoked_device"
    assert admit("k", kiosk) == "wrong_role"
    assert admit(DEVICE, ENTRY) is None


def test_the_registry_operator_station_and_line_are_stored_not_the_records() -> None:
    evil = replace(RECORDS[0], operator="EVIL", line=9, station=b"\x11" * 8)
    decision = decide_on([evil])
    assert (decision.station, decision.line, decision.operator) == (bytes(8), 0, "BENCH")
    [row] = ledger_rows(DEVICE, decision, received_ms=1)
    assert (row[-5], row[-4], row[-3]) == ("0" * 16, 0, "BENCH")  # station, line, operator
    assert verdicts(decision) == ["ok"]
    assert kinds(decision) == ["field_mismatch"]
    assert "EVIL" in decision.anomalies[0][4]


def test_a_terminal_other_than_the_registered_one_is_not_counted() -> None:
    decision = decide_on(RECORDS[:1], entry=replace(ENTRY, terminal="0000000000EE"))
    assert verdicts(decision) == ["wrong_device"]
    assert kinds(decision) == ["wrong_device"]


def test_a_kind_the_device_may_not_make_is_not_counted() -> None:
    decision = decide_on([replace(RECORDS[0], kind="load")])
    assert verdicts(decision) == ["wrong_kind"]


def test_a_kind_its_tac_covered_transaction_type_contradicts_is_not_counted() -> None:
    gate = replace(ENTRY, kinds=frozenset({"entry", "exit"}))
    assert verdicts(decide_on([replace(RECORDS[0], kind="entry")], entry=gate)) == ["ok"]
    assert verdicts(decide_on([replace(RECORDS[0], tx_type=2)])) == ["wrong_kind"]


def test_the_tac_covered_day_and_time_win_over_a_rewritten_timestamp() -> None:
    record = RECORDS[0]
    tac_ms = tac_time_ms(record.day, record.time)
    assert tac_ms is not None
    near = decide_on([replace(record, at_ms=tac_ms + TIME_TOLERANCE_MS)])
    assert (kinds(near), near.inserts[0].at_ms) == ([], tac_ms + TIME_TOLERANCE_MS)
    moved = decide_on([replace(record, at_ms=tac_ms + 86_400_000)])
    assert kinds(moved) == ["time_mismatch"]
    assert (moved.inserts[0].at_ms, verdicts(moved)) == (tac_ms, ["ok"])


def test_a_day_that_is_no_date_is_not_counted() -> None:
    decision = decide_on([replace(RECORDS[0], day=bytes.fromhex("20261399"))])
    assert verdicts(decision) == ["bad_time"]


def test_a_balance_that_does_not_follow_the_cards_chain_is_a_break() -> None:
    first, second = RECORDS[0], RECORDS[1]
    assert second.card_counter == first.card_counter + 1
    view = LedgerView(counted={(first.card_serial, first.card_counter, 9): counted(first)})
    assert decide_on([second], view).chain == []
    broken = decide_on([replace(second, balance_before=second.balance_before + 500)], view)
    assert verdicts(broken) == ["ok"]
    [check] = broken.chain
    assert [a.kind for a in balance_breaks([check], {})] == ["balance_break"]
    # A load between the two explains the difference.
    loads = {first.card_serial: [(first.at_ms, 500)]}
    assert balance_breaks([check], loads) == []


def test_a_balance_that_breaks_within_one_batch_is_a_break() -> None:
    first, second = RECORDS[0], RECORDS[1]
    broken = decide_on([first, replace(second, balance_before=second.balance_before + 500)])
    assert [(check.seq, check.got - check.expected) for check in broken.chain] == [
        (second.seq, 500)
    ]


def test_one_ledger_lookup_range_covers_a_cards_rides_and_their_predecessors() -> None:
    rows = [Classified(DEVICE, r, "ok") for r in RECORDS]  # counters 0, 1, 2, 3 of one card
    serial = RECORDS[0].card_serial
    assert counter_ranges(rows) == [(serial, 0, 3)]
    # A ride far on: its own range, from its predecessor.
    far = replace(RECORDS[3], seq=9, card_counter=40)
    assert counter_ranges([*rows[:2], Classified(DEVICE, far, "ok")]) == [
        (serial, 0, 1),
        (serial, 39, 40),
    ]
    # A load has no predecessor in the chain; a record that does not count is not looked up.
    load = replace(RECORDS[0], card_counter=7, tx_type=2, kind="load")
    forged = Classified(DEVICE, replace(RECORDS[0], card_serial=b"\x11" * 10), "forged")
    assert counter_ranges([Classified(DEVICE, load, "ok"), forged]) == [(serial, 7, 7)]


def test_a_key_several_records_of_a_batch_have_has_no_one_sequence_number() -> None:
    first = RECORDS[0]
    again = replace(first, seq=first.seq + 1000)
    key = (first.card_serial, first.card_counter, first.tx_type)
    rows = [Classified(DEVICE, r, "ok") for r in (first, first, RECORDS[1])]
    assert own_keys(rows)[key] == first.seq
    assert own_keys([*rows, Classified(DEVICE, again, "ok")])[key] is None
    assert own_keys([Classified(DEVICE, first, "forged")]) == {}


def test_a_counted_transaction_under_a_new_sequence_number_is_a_replay_not_a_clone() -> None:
    first = RECORDS[0]
    view = LedgerView(counted={(first.card_serial, first.card_counter, 9): counted(first)})
    decision = decide_on([replace(first, seq=first.seq + 50)], view)
    assert verdicts(decision) == ["replay"]
    assert (kinds(decision), decision.clones) == (["replay"], [])


def test_other_content_under_a_counted_card_counter_is_a_clone() -> None:
    first = RECORDS[0]
    view = LedgerView(counted={(first.card_serial, first.card_counter, 9): counted(first)})
    other = replace(first, seq=first.seq + 50, ttc=first.ttc + 9, tac=bytes.fromhex("01020304"))
    decision = decide_on([other], view)
    assert verdicts(decision) == ["clone"]
    assert decision.clones == [first.card_serial]


def test_a_known_identity_with_other_content_is_an_anomaly_not_a_duplicate() -> None:
    first = RECORDS[0]
    view = LedgerView(held={first.seq: first}, top_seq=first.seq)
    same = decide_on([first], view)
    assert (same.duplicates, same.inserts, same.anomalies) == (1, [], [])
    other = decide_on([replace(RECORDS[1], seq=first.seq)], view)
    assert (other.duplicates, other.inserts, other.updates) == (0, [], [])
    assert kinds(other) == ["conflicting_duplicate"]


def test_a_new_journal_epoch_of_a_known_device_is_a_reset_and_its_records_count() -> None:
    view = LedgerView(top_seq=None, other_epochs=frozenset({EPOCH - 1}))
    decision = decide_on(RECORDS, view)
    assert kinds(decision) == ["journal_reset"]
    assert verdicts(decision) == ["ok"] * len(RECORDS)
    assert decision.epoch == EPOCH
    assert {row[1] for row in ledger_rows(DEVICE, decision, received_ms=1)} == {EPOCH}
    # Rows from before epochs existed (epoch 0) are no reset.
    legacy = decide_on(RECORDS, LedgerView(other_epochs=frozenset({0})))
    assert kinds(legacy) == []


def test_an_implausible_sequence_jump_is_one_anomaly() -> None:
    jumped = [replace(RECORDS[0], seq=0xFFFFFFFF)]
    decision = decide_on(jumped, LedgerView(top_seq=3))
    assert kinds(decision) == ["seq_jump"]
    assert kinds(decide_on([replace(RECORDS[0], seq=3 + SEQ_JUMP)], LedgerView(top_seq=3))) == []


def test_a_batch_from_a_device_the_registry_does_not_admit_is_refused_whole() -> None:
    kiosk = DeviceEntry(
        id=DEVICE, role="kiosk", operator="OP", kinds=frozenset({"load"}), terminal="0000000000AA"
    )
    for entry, reason in (
        (None, "unknown_device"),
        (replace(ENTRY, revoked=True), "revoked_device"),
        (kiosk, "wrong_role"),
    ):
        decision = decide_on(RECORDS, entry=entry)
        assert decision.rejected == reason
        assert (decision.inserts, decision.anomalies, decision.duplicates) == ([], [], 0)
    assert decide_on(RECORDS).rejected == ""


def test_a_record_sent_twice_in_one_batch_is_stored_once() -> None:
    first = RECORDS[0]
    decision = decide_on([first, first])
    assert [s.record for s in decision.inserts] == [first]
    assert (decision.duplicates, kinds(decision)) == (1, [])


def test_a_grey_record_the_ledger_holds_resolves_when_its_outcome_arrives() -> None:
    first = RECORDS[0]
    grey = replace(first, status="grey", tac=bytes(4))
    view = LedgerView(held={first.seq: grey}, top_seq=first.seq)
    decision = decide_on([first], view)
    assert decision.inserts == []
    assert [(s.record, s.verdict) for s in decision.updates] == [(first, "ok")]
    assert (decision.resolved, decision.duplicates) == (1, 0)
    # The grey record sent again is a duplicate: it changes nothing.
    again = decide_on([grey], view)
    assert (again.updates, again.duplicates) == ([], 1)


def test_a_grey_record_and_its_outcome_in_one_batch_are_stored_once_resolved() -> None:
    first = RECORDS[0]
    decision = decide_on([replace(first, status="grey", tac=bytes(4)), first])
    assert [(s.record, s.verdict) for s in decision.inserts] == [(first, "ok")]
    assert (decision.updates, decision.resolved) == ([], 1)


def test_a_completed_record_again_with_another_tac_is_a_conflicting_duplicate() -> None:
    first = RECORDS[0]
    view = LedgerView(held={first.seq: first}, top_seq=first.seq)
    decision = decide_on([replace(first, tac=bytes.fromhex("01020304"))], view)
    assert kinds(decision) == ["conflicting_duplicate"]
    assert (decision.inserts, decision.updates, decision.duplicates) == ([], [], 0)


def test_a_forged_tac_is_flagged_and_not_counted() -> None:
    decision = decide_on(RECORDS[:1], verdict="forged")
    assert (verdicts(decision), kinds(decision), decision.forged) == (["forged"], ["forged_tac"], 1)
    assert counter_ranges([Classified(DEVICE, RECORDS[0], "forged")]) == []


def test_a_field_the_registry_knows_otherwise_is_a_mismatch_that_still_counts() -> None:
    decision = decide_on([replace(RECORDS[0], station=b"\x11" * 8)])
    assert (kinds(decision), verdicts(decision)) == (["field_mismatch"], ["ok"])
    assert (
        decision.anomalies[0].detail == "station '1111111111111111' (registry '0000000000000000')"
    )


def test_clones_of_one_card_put_it_on_the_hotlist_once() -> None:
    first, second = RECORDS[0], RECORDS[1]
    view = LedgerView(
        counted={
            (r.card_serial, r.card_counter, 9): counted(r, device="elsewhere")
            for r in (first, second)
        }
    )
    others = [replace(r, ttc=r.ttc + 9, tac=bytes.fromhex("01020304")) for r in (first, second)]
    decision = decide_on(others, view)
    assert verdicts(decision) == ["clone", "clone"]
    assert decision.hotlist == [first.card_serial]


def test_a_counted_transaction_is_read_in_full_only_under_another_identity() -> None:
    first = RECORDS[0]
    key = (first.card_serial, first.card_counter, first.tx_type)
    own = own_keys([Classified(DEVICE, first, "ok")])
    ours = {key: counted(first)}
    theirs = {key: counted(first, device="elsewhere")}
    assert records_wanted(DEVICE, EPOCH, own, ours) == []
    assert records_wanted(DEVICE, EPOCH, own, {}) == []
    assert records_wanted(DEVICE, EPOCH, own, theirs) == [(first.card_serial, 0, 0)]
    # Without the transaction in full, the rules cannot tell a replay: a clone, as the store
    # reads every one records_wanted names.
    unread = {key: counted(first, device="elsewhere")._replace(record=None)}
    assert verdicts(decide_on([first], LedgerView(counted=unread))) == ["clone"]


def test_a_decided_record_is_the_ledgers_row_of_text_columns() -> None:
    first = RECORDS[0]
    [row] = ledger_rows(DEVICE, decide_on([first]), received_ms=5)
    assert row == (
        DEVICE,
        EPOCH,
        first.seq,
        "completed",
        "ok",
        9,
        "bus",
        "3des",
        first.card_serial.hex(),
        "1310000000000000",
        first.card_counter,
        first.ttc,
        200,
        first.balance_before,
        "0000B0000000",
        "20261123",
        "083000",
        first.at_ms,
        "0" * 16,
        0,
        "BENCH",
        first.tac.hex().upper(),
        5,
    )


def test_a_mixed_batch_gets_each_records_own_verdict() -> None:
    # Completed purchases are verified in one call of the verifier, the rest one by one: in
    # any mix, each record keeps the verdict it has alone.
    verifier = TacVerifier.of({DEMO_ISSUER_ID: DEMO_KEYS})
    [batch] = make_batches(8, 1, 8, run=4)["bench-4-0"]
    r = batch.records
    mixed = (
        r[0],
        replace(r[1], tac=bytes.fromhex("DEADBEEF")),
        replace(r[2], status="grey", tac=bytes(4)),
        replace(r[3], issuer=bytes(8)),
        replace(r[4], alg="SM4"),
        replace(r[5], tx_type=2, kind="load"),
        replace(r[6], status="void"),
        r[7],
    )
    got = [c.verdict for c in classify(Batch(1, batch.device, mixed), verifier)]
    assert got == [_verdict(record, verifier) for record in mixed]
    assert got == ["ok", "forged", "grey", "unknown_issuer", "forged", "forged", "void", "ok"]
    assert [c.verdict for c in classify(batch, verifier)] == ["ok"] * 8
