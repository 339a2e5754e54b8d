"""A device at run time: the decision core driven on a reader, with its PSAM and journal.

:meth:`Validator.tap` is synchronous and runs a whole tap — every APDU, both journal commits — on
the calling thread, which for a PC/SC reader is the reader's own thread (one hop per tap).
"""

from __future__ import annotations

import gc
import logging
import sys
import threading
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from farelab.card import (
    CardRemovedError,
    ImageError,
    Psam,
    PsamKeys,
    Reader,
    ReaderError,
    Step,
    Transmit,
    describe_path,
)
from farelab.validator._config import DeviceConfig
from farelab.validator._decision import Intent, Pending, Rejected, Tap, TapResult
from farelab.validator._device import Parameters
from farelab.validator._faults import checkpoint
from farelab.validator._journal import Journal, JournalError
from farelab.validator._network import NetworkError

__all__ = [
    "FEED_SWITCH_INTERVAL_S",
    "TAP_SWITCH_INTERVAL_S",
    "Validator",
    "failure_text",
    "favour_taps",
]

log = logging.getLogger("farelab.validator")

# CPython hands the GIL to a waiting thread only every ``sys.getswitchinterval()`` (5 ms by
# default): a tap thread waiting behind the uplink's Python code would wait up to that long, at
# the tap's start and again after each journal statement.  A tenth of a millisecond bounds each
# wait; it would also let the uplink preempt a tap as often, but the uplink steps aside while a
# tap is in progress (:class:`validator._priority.TapGate`).  Measured with the bench's backlog
# step: the slowest 2 % of taps under a draining backlog waited 0.26–0.49 ms for the GIL on
# average at 0.5 ms, not at all at 0.1 ms.
TAP_SWITCH_INTERVAL_S = 0.0001

# A process that taps the cards of several devices at once from a feed of requests (a city's or
# a lab's simulated devices) has its taps competing with each other, not with background work:
# there a short turn only hands the GIL from one tap thread to another and back, a futex call and
# a context switch each time.  Measured: 6 000 taps of a city's cards over 25 devices took 12.1–
# 12.4 s of CPU with 5 ms turns, 14.1–15.8 s with 0.1 ms turns (two rounds taken in turn).
FEED_SWITCH_INTERVAL_S = 0.005


def favour_taps(*, concurrent_feed: bool = False) -> None:
    """Make the process hand the GIL to a tap thread quickly, and keep the garbage collector's
    full collections short: everything alive now (modules, configuration, the journal) moves
    out of the collector's view.  Call once, in the validator process, after setting up and
    before its reader threads and uplink start.  ``concurrent_feed``: the process taps several
    devices' cards at once from a feed of requests, and gives each tap thread longer turns
    (:data:`FEED_SWITCH_INTERVAL_S`)."""
    sys.setswitchinterval(FEED_SWITCH_INTERVAL_S if concurrent_feed else TAP_SWITCH_INTERVAL_S)
    gc.freeze()


_AFTER = {
    Step.INIT: "after_init",
    Step.UPDATE_CAPP: "after_update_capp",
    Step.DEBIT: "after_debit_sent",
}


def failure_text(exc: BaseException, path: Path | None = None) -> str:
    """A card's or reader's failure as one short line for the log and the journalled tap;
    ``path``: the card image it concerns, if any."""
    if isinstance(exc, ImageError):  # the card layer's own: it names the image, cut
        return describe_path(str(exc))
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    line = describe_path(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)
    return line if path is None else f"{describe_path(path)}: {line}"


class Validator:
    """One device: its configuration, current parameters, PSAM and the shared journal."""

    def __init__(self, *, config: DeviceConfig, journal: Journal) -> None:
        """``journal`` may be shared by several devices of one process."""
        self.device = config.device
        self._params = config.params
        self._journal = journal
        keys = {issuer: PsamKeys.of(k) for issuer, k in config.keys.items()}
        self.psam = Psam(
            terminal_id=self.device.terminal_id,
            issuers=keys,
            ttc=journal.next_ttc(self.device.id),
        )
        self._lock = threading.Lock()
        self.last: TapResult | None = None

    @property
    def params(self) -> Parameters:
        """The parameters in force."""
        return self._params

    def apply(self, params: Parameters) -> None:
        """Replace hotlist, whitelist and fare table at once; a tap in progress keeps what it
        began with.  ValueError (and nothing changed) if the new fare table lacks this
        device's line or station."""
        if params.version < self._params.version:
            raise ValueError(
                f"parameter version {params.version} is older than {self._params.version}"
            )
        device = self.device
        network = params.networks.get(device.network.key)
        if network is not None:
            try:
                line = network.line(device.line.key) if device.line is not None else None
                station = (
                    network.station(device.station.name_zh) if device.station is not None else None
                )
            except NetworkError as exc:
                raise ValueError(f"fare table refused for {device.id}: {exc}") from None
            device = replace(device, network=network, line=line, station=station)
        with self._lock:
            self.device = device
            self._params = params

    def tap(self, reader: Reader, now: datetime) -> TapResult:
        """Run one tap on the card in ``reader``; the result is journalled when this returns."""
        gate = self._journal.gate
        if gate is None:
            return self._tap(reader, now)
        gate.begin()  # first, before anything allocates: no deferred collection starts here
        try:
            return self._tap(reader, now)
        finally:
            gate.end()

    def _tap(self, reader: Reader, now: datetime) -> TapResult:
        with self._lock:
            failure = self._journal.write_failure()
            if failure is not None:
                # Nothing could be journalled: the card is not touched at all.
                result: TapResult = Rejected(
                    self.device.id, "", "out_of_service", detail=f"journal: {failure}"
                )
                self.last = result
                return result
            if not self._journal.has_room():
                result = Rejected(self.device.id, "", "out_of_service", detail="journal full")
                self._record(result, now, None)
                return result
            tap = Tap(
                device=self.device,
                params=self._params,
                psam=self.psam,
                now=now,
                pending=self._journal.pending(),
            )
            result, pending = self._drive(reader, tap)
            if pending is not None:
                checkpoint("after_debit_answered")
            self._record(result, now, pending)
            checkpoint("after_journal")
            self.last = result
            return result

    def card_failed(self, now: datetime, detail: str) -> TapResult:
        """A tap on a card that cannot be read at all (say, its image file is damaged): that
        tap's ``card_error``, journalled, with the reason logged."""
        with self._lock:
            log.warning("device %s: card error: %s", self.device.id, detail)
            result: TapResult = Rejected(self.device.id, "", "card_error", detail=detail)
            self._record(result, now, None)
            self.last = result
            return result

    def _record(self, result: TapResult, now: datetime, pending: Pending | None) -> None:
        try:
            self._journal.record_tap(result, at=now.isoformat(), pending=pending)
        except JournalError as exc:
            # The journal keeps what moved money and writes it once it can (its intent is in
            # the intent log meanwhile); the rider's result stands, and the next taps are
            # refused until then.
            log.debug("device %s: tap not journalled yet: %s", self.device.id, exc)

    def _drive(self, reader: Reader, tap: Tap) -> tuple[TapResult, Pending | None]:
        pending: Pending | None = None
        event: Transmit | Intent | TapResult = tap.start()
        while True:
            if isinstance(event, Transmit):
                if event.step is Step.INIT:
                    checkpoint("before_init")
                try:
                    answer = reader.transmit(event.apdu)
                except (CardRemovedError, ReaderError):
                    return tap.card_lost(), pending
                except Exception as exc:  # any failure of the card or reader is this tap's result
                    detail = failure_text(exc)
                    log.warning(
                        "device %s: card error at %s: %s", self.device.id, event.step, detail
                    )
                    return tap.card_failed(f"{event.step} {detail}"), pending
                if event.step in _AFTER:
                    checkpoint(_AFTER[event.step])
                event = tap.receive(answer)
            elif isinstance(event, Intent):
                try:
                    pending = self._journal.record_intent(event)
                except JournalError as exc:
                    log.warning("device %s: tap refused: %s", self.device.id, exc)
                    return tap.refuse("out_of_service", f"journal: {exc}"), None
                event = tap.proceed()
            else:
                return event, pending
