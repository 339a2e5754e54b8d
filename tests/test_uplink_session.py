"""The uplink's rules, without a broker, a database or a thread: batches of outbox rows, the
window of batches in flight, which ack takes which batch, refusals, resends and reconnects."""

from __future__ import annotations

import random

import pytest

from farelab.protocol import RECORD_SIZE, Ack, LinkState, encode_ack, encode_batch_records
from farelab.validator import (
    AckIgnored,
    Acknowledge,
    BatchRefused,
    ReadOutbox,
    Send,
    UplinkSession,
    Wait,
)

EPOCH = 7


def row(row_id: int) -> tuple[int, bytes]:
    """An outbox row as the journal hands it over: (id, the encoded record)."""
    return row_id, bytes([row_id % 256]) * RECORD_SIZE


class Outbox:
    """The journal's outbox as plain data: row ids of one device, oldest first."""

    def __init__(self, ids: range | list[int]) -> None:
        self.rows = dict(row(i) for i in ids)

    def read(self, command: ReadOutbox) -> list[tuple[int, bytes]]:
        after = sorted(i for i in self.rows if i > command.after)
        return [(i, self.rows[i]) for i in after[: command.limit]]

    def delete(self, ids: tuple[int, ...]) -> None:
        for i in ids:
            self.rows.pop(i, None)


def session(**options: object) -> UplinkSession:
    new = UplinkSession(device="bus-1", epoch=EPOCH, rng=random.Random(1), **options)  # type: ignore[arg-type]
    new.connecting()
    new.connected()
    return new


def drive(uplink: UplinkSession, outbox: Outbox, now: float) -> tuple[list[Send], Wait]:
    """Do what the session says at ``now`` until it says to wait, as the shell does."""
    sent: list[Send] = []
    while True:
        command = uplink.next_command(now)
        if isinstance(command, ReadOutbox):
            batch = uplink.rows_read(outbox.read(command), now)
            if batch is not None:
                sent.append(batch)
        elif isinstance(command, Send):
            sent.append(command)
        else:
            return sent, command


def ack(send: Send, *, count: int | None = None, committed: bool = True) -> bytes:
    return encode_ack(Ack(send.batch_id, send.records if count is None else count, committed))


def test_rows_leave_in_batches_named_by_the_epoch_and_their_first_row() -> None:
    uplink = session(batch_size=3, window=10)
    sent, _ = drive(uplink, Outbox(range(1, 8)), 0.0)
    assert [s.records for s in sent] == [3, 3, 1]
    assert [s.batch_id for s in sent] == [EPOCH << 40 | 1, EPOCH << 40 | 4, EPOCH << 40 | 7]
    assert sent[0].payload == encode_batch_records(
        EPOCH << 40 | 1, "bus-1", [row(i)[1] for i in (1, 2, 3)]
    )
    assert not any(s.again for s in sent)
    assert uplink.stats.batches_sent == 3
    assert uplink.in_flight == {
        EPOCH << 40 | 1: (1, 2, 3),
        EPOCH << 40 | 4: (4, 5, 6),
        EPOCH << 40 | 7: (7,),
    }


def test_no_more_batches_than_the_window_wait_for_acks() -> None:
    uplink = session(batch_size=2, window=2, ack_timeout=10.0)
    outbox = Outbox(range(1, 11))
    sent, wait = drive(uplink, outbox, 0.0)
    assert len(sent) == 2
    assert wait == Wait(10.0)  # nothing until the first batch is due again
    assert uplink.next_command(5.0) == Wait(10.0)


def test_an_ack_takes_its_batch_and_makes_room_for_the_next() -> None:
    uplink = session(batch_size=2, window=2)
    outbox = Outbox(range(1, 11))
    sent, _ = drive(uplink, outbox, 0.0)
    outcome = uplink.receive_ack(ack(sent[0]), 0.25)
    assert outcome == Acknowledge(sent[0].batch_id, (1, 2), 0.25)
    assert uplink.stats.records_acked == 2  # counted before the journal deletes the rows
    assert uplink.stats.ack_latency_s == [0.25]
    outbox.delete(outcome.ids)
    more, _ = drive(uplink, outbox, 0.25)
    assert [s.batch_id for s in more] == [EPOCH << 40 | 5]
    assert set(uplink.in_flight) == {EPOCH << 40 | 3, EPOCH << 40 | 5}


def test_an_ack_with_another_count_is_stale_and_takes_nothing() -> None:
    """A batch of an earlier connection that began at the same row with fewer rows: taking its
    ack would delete rows the backend never saw."""
    uplink = session()
    sent, _ = drive(uplink, Outbox(range(1, 4)), 0.0)
    outcome = uplink.receive_ack(ack(sent[0], count=2), 0.1)
    assert outcome == AckIgnored("wrong_count", sent[0].batch_id, 2, 3)
    assert uplink.in_flight == {sent[0].batch_id: (1, 2, 3)}
    assert (uplink.stats.stale_acks, uplink.stats.records_acked) == (1, 0)


def test_an_ack_of_another_journal_file_takes_nothing() -> None:
    uplink = session()
    sent, _ = drive(uplink, Outbox(range(1, 4)), 0.0)
    earlier_file = Ack((EPOCH + 1) << 40 | 1, 3, committed=True)
    assert uplink.receive_ack(encode_ack(earlier_file), 0.1) == AckIgnored(
        "not_in_flight", earlier_file.batch_id, 3
    )
    assert list(uplink.in_flight) == [sent[0].batch_id]
    assert uplink.stats.stale_acks == 1


def test_a_malformed_ack_takes_nothing() -> None:
    uplink = session()
    drive(uplink, Outbox(range(1, 4)), 0.0)
    assert uplink.receive_ack(b"not an ack", 0.1) == AckIgnored("malformed")
    assert (uplink.stats.malformed_acks, len(uplink.in_flight)) == (1, 1)


def test_a_refused_batch_stays_and_goes_again_with_growing_backoff() -> None:
    uplink = session(ack_timeout=10.0, window=1)
    outbox = Outbox(range(1, 4))
    [batch], _ = drive(uplink, outbox, 0.0)
    now = 0.0
    delays = []
    for failures in (1, 2, 3, 4):
        outcome = uplink.receive_ack(ack(batch, committed=False), now)
        assert isinstance(outcome, BatchRefused)
        assert outcome.failures == failures
        ceiling = min(60.0, 2.0 ** (failures - 1))
        assert ceiling / 2 <= outcome.retry_in <= ceiling
        delays.append(outcome.retry_in)
        assert uplink.next_command(now) == Wait(now + outcome.retry_in)
        now += outcome.retry_in
        again = uplink.next_command(now)
        assert again == Send(batch.batch_id, batch.payload, 3, again=True)
    assert uplink.stats.rejected == 4
    assert uplink.stats.resends == 4
    assert uplink.in_flight == {batch.batch_id: (1, 2, 3)}  # the rows stay in the outbox
    assert isinstance(uplink.receive_ack(ack(batch), now), Acknowledge)
    assert uplink.rejections.failures == 0  # admitted: the next refusal starts over


def test_the_refusal_backoff_is_capped_at_a_minute() -> None:
    uplink = session()
    [batch], _ = drive(uplink, Outbox(range(1, 2)), 0.0)
    for _ in range(12):
        outcome = uplink.receive_ack(ack(batch, committed=False), 0.0)
    assert isinstance(outcome, BatchRefused)
    assert 30.0 <= outcome.retry_in <= 60.0


def test_a_batch_without_an_ack_goes_again_after_the_timeout() -> None:
    uplink = session(ack_timeout=10.0, window=1)
    outbox = Outbox(range(1, 4))
    [batch], wait = drive(uplink, outbox, 0.0)
    assert wait == Wait(10.0)
    assert drive(uplink, outbox, 9.9) == ([], Wait(10.0))
    again, wait = drive(uplink, outbox, 10.0)
    assert again == [Send(batch.batch_id, batch.payload, 3, again=True)]
    assert wait == Wait(20.0)
    assert drive(uplink, outbox, 20.0)[0] == again  # and again, a timeout later
    assert (uplink.stats.resends, uplink.stats.batches_sent) == (2, 1)
    assert isinstance(uplink.receive_ack(ack(batch), 20.5), Acknowledge)
    assert uplink.stats.ack_latency_s == [0.5]  # from the last time it went


def test_a_drained_outbox_is_read_again_after_the_poll_interval_or_an_ack() -> None:
    uplink = session(poll_interval=0.5)
    outbox = Outbox([])
    assert drive(uplink, outbox, 0.0) == ([], Wait(0.5))
    outbox.rows.update([row(1)])
    assert uplink.next_command(0.4) == Wait(0.5)
    [batch], _ = drive(uplink, outbox, 0.5)
    assert batch.batch_id == EPOCH << 40 | 1
    outbox.rows.update([row(2)])
    uplink.receive_ack(ack(batch), 0.6)
    assert uplink.next_command(0.6) == ReadOutbox(1, 200)  # at once: the ack may have made room


def test_a_new_connection_sends_again_what_was_in_flight() -> None:
    uplink = session(batch_size=2, window=4)
    outbox = Outbox(range(1, 6))
    sent, _ = drive(uplink, outbox, 0.0)
    uplink.receive_ack(ack(sent[0]), 0.1)
    outbox.delete((1, 2))
    delay = uplink.connection_lost()
    assert uplink.stats.state is LinkState.BACKOFF
    assert 0.1 <= delay <= 0.2
    uplink.connecting()
    assert uplink.connected()  # back after a failure
    assert uplink.stats.connects == 2
    assert uplink.in_flight == {}
    again, _ = drive(uplink, outbox, 5.0)
    assert [(s.batch_id, s.records, s.again) for s in again] == [
        (EPOCH << 40 | 3, 2, False),
        (EPOCH << 40 | 5, 1, False),
    ]
    assert uplink.stats.batches_sent == 5


def test_an_ack_of_the_previous_connection_is_stale_after_a_reconnect() -> None:
    """The batch that began at row 1 held one row before the reconnect and three after."""
    uplink = session()
    outbox = Outbox([1])
    [old], _ = drive(uplink, outbox, 0.0)
    uplink.connection_lost()
    uplink.connected()
    outbox.rows.update([row(2), row(3)])
    [new], _ = drive(uplink, outbox, 1.0)
    assert new.batch_id == old.batch_id
    assert isinstance(uplink.receive_ack(ack(old), 1.1), AckIgnored)
    assert isinstance(uplink.receive_ack(ack(new), 1.2), Acknowledge)


def test_link_failures_back_off_and_log_loudly_only_the_first() -> None:
    uplink = session()
    delays = [uplink.connection_lost() for _ in range(8)]
    assert uplink.link.failures == 8
    assert all(d <= 10.0 for d in delays)
    assert delays[-1] >= 5.0
    uplink.connecting()
    assert uplink.stats.state is LinkState.CONNECTING
    assert uplink.connected()
    assert uplink.link.failures == 0
    assert not uplink.connected()  # a reconnect without a failure in between


def test_the_latencies_kept_are_bounded() -> None:
    uplink = session(batch_size=1, window=1)
    for i in range(10_002):
        assert uplink.next_command(float(i)) == ReadOutbox(i, 1)
        batch = uplink.rows_read([row(i + 1)], float(i))
        assert batch is not None
        uplink.receive_ack(ack(batch), i + 0.5)
    assert len(uplink.stats.ack_latency_s) <= 10_000
    assert uplink.stats.records_acked == 10_002


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        UplinkSession(device="d", epoch=1, batch_size=501)
    with pytest.raises(ValueError, match="window"):
        UplinkSession(device="d", epoch=1, window=0)
