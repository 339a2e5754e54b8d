"""The validator's decision core: one tap as a sans-IO state machine (STYLE §1).

``Tap(device, params, psam, now, pending)`` reads the card; resolves a torn transaction of the
same card left by an earlier tap (GET TRANSACTION PROOF: completed with its TAC, or void); then
decides this tap on its own — unless it is the rider's retry of that transaction at the same
device inside the re-tap window, whose answer is the settled transaction.  Deciding checks the
rules (R3, R5, R9, R10, hotlist), prices the ride and drives the purchase — emitting
:class:`card.Transmit` for each APDU, one :class:`Intent` that the shell must journal durably
*before* the DEBIT leaves, and finally an :class:`Accepted` or :class:`Rejected` value that the
display, the journal and the uplink all consume.  If the card leaves the field, the shell calls
:meth:`Tap.card_lost` and gets the final value for that case.
Nothing here reads a clock or touches a reader; ``now`` is an aware datetime.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from farelab.card import (
    CST,
    BlockApplication,
    BusRecord,
    CappUpdate,
    CardSnapshot,
    Industry,
    InitInfo,
    MetroRecord,
    MetroStatus,
    ProofFound,
    ProofMissing,
    Psam,
    Purchase,
    PurchaseDone,
    ReadCard,
    Refused,
    Step,
    TransactionProof,
    Transmit,
    TripRecord,
    TxType,
)
from farelab.protocol import Record
from farelab.validator._device import Device, Direction, Kind, Parameters
from farelab.validator._fares import (
    PreviousRide,
    Quote,
    Rider,
    bus_fare,
    metro_entry_minimum,
    metro_trip_fare,
)

__all__ = ["Accepted", "Intent", "Pending", "Rejected", "Resolution", "Tap", "TapResult"]

SFI_TRANSIT, SFI_TRIPS = 0x1A, 0x1E


@dataclass(frozen=True, slots=True)
class Intent:
    """A DEBIT about to be sent: journal it durably before calling :meth:`Tap.proceed`.

    ``record`` is the transaction as it will travel (:class:`farelab.protocol.Record`, the
    card's fields as bytes), before the journal numbers it and before its outcome is known:
    ``seq`` 0, status ``pending``, no TAC (``b""``).  ``at`` is the tap's moment as the
    device's clock gave it (the record holds it to the millisecond): the journal keeps it so.
    """

    device: str
    record: Record
    at: datetime

    @property
    def card_serial(self) -> str:
        """The card's 20-digit serial, as its snapshot and the journal name the card."""
        return self.record.card_serial.hex()

    @property
    def proof_counter(self) -> int:
        """What GET TRANSACTION PROOF asks for if the answer never arrives."""
        return self.record.card_counter + 1


@dataclass(frozen=True, slots=True)
class Pending:
    """An intent whose DEBIT answer never arrived (journalled ``pending``): resolved on the
    card's next tap at any device sharing the journal."""

    device: str
    seq: int
    intent: Intent


@dataclass(frozen=True, slots=True)
class Resolution:
    """What the proof said about a pending transaction: completed with ``tac`` (the card's 4
    bytes), or void."""

    pending: Pending
    completed: bool
    tac: bytes = b""


@dataclass(frozen=True, slots=True)
class Accepted:
    """The ride is paid (or free). ``tac_bytes`` is the card's TAC for it (4 bytes, what the
    journal sends); :attr:`tac` shows it.  ``reason`` names an irregular case (a penalty, a
    recovered torn transaction), None for an ordinary ride."""

    device: str
    card_serial: str
    fare_fen: int
    balance_fen: int
    tac_bytes: bytes
    kind: str
    reason: str | None = None
    mac2_valid: bool = True
    notes: tuple[str, ...] = ()
    resolution: Resolution | None = None

    result = "accepted"
    grey = False

    @property
    def tac(self) -> str:
        """The TAC as people read it (upper-case hex): the display, the taps table, JSON."""
        return self.tac_bytes.hex().upper()


@dataclass(frozen=True, slots=True)
class Rejected:
    """No ride. ``grey``: a DEBIT was sent and its outcome is unknown until the card returns."""

    device: str
    card_serial: str
    reason: str
    balance_fen: int | None = None
    grey: bool = False
    blocked: bool = False
    resolution: Resolution | None = None
    detail: str = ""

    result = "rejected"
    fare_fen = 0
    tac = ""


TapResult = Accepted | Rejected


@dataclass(slots=True)
class _Plan:
    """The purchase the rules decided on."""

    kind: str
    quote: Quote
    min_balance: int
    reason: str | None
    records: list[tuple[int, int, object]] = field(default_factory=list)


class Tap:
    """One tap at one device. Use: ``start()``, then ``receive()`` per answer; journal the
    :class:`Intent` and ``proceed()``; ``card_lost()`` if the card leaves."""

    def __init__(
        self,
        *,
        device: Device,
        params: Parameters,
        psam: Psam,
        now: datetime,
        pending: Mapping[str, Pending] | None = None,
    ) -> None:
        if now.tzinfo is None:
            raise ValueError("a tap needs an aware datetime")
        self.device = device
        self.params = params
        self.psam = psam
        self.now = now
        self._pending = pending or {}
        # A gate also reads the trip before the latest: at an exit the latest is the trip's own
        # entry, and a bus ride before it is what a bus → metro transfer is judged on.
        wanted = [(SFI_TRANSIT, 2), (SFI_TRIPS, 1)]
        if device.kind is not Kind.BUS:
            wanted = [(SFI_TRANSIT, 1), (SFI_TRIPS, 1), (SFI_TRIPS, 2)]
        self._flow: ReadCard | TransactionProof | Purchase | BlockApplication = ReadCard(
            records=wanted
        )
        self._snapshot: CardSnapshot | None = None
        self._resolution: Resolution | None = None
        self._resolving: Pending | None = None
        self._plan: _Plan | None = None
        self._trip: MetroRecord | None = None
        self._intent: Intent | None = None
        self._debit: Transmit | None = None
        self._debit_sent = False
        self.step: Step | None = None
        self.done: TapResult | None = None

    # --- driving ----------------------------------------------------------------------

    def start(self) -> Transmit:
        """The first APDU (SELECT)."""
        event = self._flow.start()
        self.step = event.step
        return event

    def receive(self, rapdu: bytes) -> Transmit | Intent | TapResult:
        """Feed the card's answer to the last Transmit."""
        flow = self._flow
        event = flow.receive(rapdu)
        if isinstance(event, Transmit):
            return self._send(event)
        if isinstance(flow, ReadCard):
            return self._on_read(event)
        if isinstance(flow, TransactionProof):
            return self._on_proof(event)
        if isinstance(flow, BlockApplication):
            return self._finish(self._reject("hotlisted", blocked=event is None))
        return self._on_purchase(event)

    def proceed(self) -> Transmit:
        """After the Intent is journalled: the DEBIT."""
        if self._debit is None:
            raise RuntimeError("proceed() without an Intent")
        self._debit_sent = True
        self.step = Step.DEBIT
        return self._debit

    def card_lost(self) -> TapResult:
        """The card left the field before the last command's answer arrived."""
        if self._debit_sent and self._plan is not None:
            return self._finish(self._reject("card_removed", grey=True))
        return self._finish(self._reject("card_removed"))

    def card_failed(self, detail: str) -> TapResult:
        """The card or the reader failed (not a removal): this tap's ``card_error``; grey if
        the DEBIT had been sent, since its outcome is then unknown."""
        return self._finish(self._reject("card_error", grey=self._debit_sent, detail=detail))

    def refuse(self, reason: str, detail: str) -> TapResult:
        """The shell cannot go on before the DEBIT (the journal cannot take the intent): no
        DEBIT leaves, the card is left as it was."""
        if self._debit_sent:
            raise RuntimeError("refuse() after the DEBIT was sent")
        return self._finish(self._reject(reason, detail=detail))

    def _send(self, event: Transmit) -> Transmit | Intent:
        if event.step is Step.DEBIT and not self._debit_sent:
            self._debit = event
            self._intent = self._make_intent()
            return self._intent
        self.step = event.step
        return event

    def _finish(self, result: TapResult) -> TapResult:
        self.done = result
        return result

    @property
    def intent(self) -> Intent | None:
        """The journalled intent of this tap, if it got that far."""
        return self._intent

    # --- results ----------------------------------------------------------------------

    @property
    def _serial(self) -> str:
        return self._snapshot.serial if self._snapshot is not None else ""

    def _reject(
        self,
        reason: str,
        *,
        balance: int | None = None,
        grey: bool = False,
        blocked: bool = False,
        detail: str = "",
    ) -> Rejected:
        return Rejected(
            self.device.id, self._serial, reason, balance, grey, blocked, self._resolution, detail
        )

    # --- reading and checks -------------------------------------------------------------

    def _on_read(self, event: object) -> Transmit | TapResult:
        if isinstance(event, Refused):
            reason = "blocked" if event.reason == "blocked" else "card_error"
            return self._finish(self._reject(reason, detail=f"{event.step} {event.sw_hex}"))
        assert isinstance(event, CardSnapshot)
        self._snapshot = event
        pending = self._pending.get(event.serial)
        if pending is not None:
            self._flow = TransactionProof(
                tx_type=TxType(pending.intent.record.tx_type),
                counter=pending.intent.proof_counter,
            )
            self._resolving = pending
            return self._send_plain(self._flow.start())
        return self._decide()

    def _send_plain(self, event: Transmit) -> Transmit:
        self.step = event.step
        return event

    def _on_proof(self, event: object) -> Transmit | TapResult:
        pending = self._resolving
        assert pending is not None
        if isinstance(event, ProofFound):
            self._resolution = Resolution(pending, completed=True, tac=event.tac)
            if not self._retries(pending):
                # The torn transaction is settled; this tap is a ride of its own, decided on
                # the card as it is now (the snapshot was read after that DEBIT committed).
                return self._decide()
            torn = pending.intent.record
            return self._finish(
                Accepted(
                    self.device.id,
                    self._serial,
                    torn.amount,
                    torn.balance_before - torn.amount,
                    event.tac,
                    torn.kind,
                    "recovered",
                    resolution=self._resolution,
                )
            )
        if isinstance(event, ProofMissing):
            self._resolution = Resolution(pending, completed=False)
            return self._decide()
        assert isinstance(event, Refused)
        return self._finish(self._reject("card_error", detail=f"PROOF {event.sw_hex}"))

    def _retries(self, pending: Pending) -> bool:
        """Whether this tap is the rider's retry of the torn transaction: the same device,
        inside the re-tap window.  Its answer is then that transaction, completed."""
        if pending.device != self.device.id:
            return False
        elapsed = (self.now - pending.intent.at).total_seconds()
        return 0 <= elapsed < self.device.network.rules.antipassback_s

    def _decide(self) -> Transmit | TapResult:
        snap = self._snapshot
        assert snap is not None
        device, params = self.device, self.params
        if snap.issuer_id not in params.whitelist or not self.psam.knows(snap.issuer_id):
            return self._finish(self._reject("not_whitelisted"))
        if snap.serial in params.hotlist:
            if snap.alg is None:
                return self._finish(self._reject("hotlisted"))
            self._flow = BlockApplication(psam=self.psam, card=snap)
            return self._send_plain(self._flow.start())
        today = self.now.astimezone(CST).date()
        if not snap.public.start <= today <= snap.public.expiry:
            return self._finish(self._reject("expired"))
        rider = Rider(snap.public.card_type, device.network.is_local(snap.issuer_id))
        plan = self._plan_bus(rider) if device.kind is Kind.BUS else self._plan_metro(rider)
        if isinstance(plan, Rejected):
            return self._finish(plan)
        self._plan = plan
        self._flow = Purchase(
            psam=self.psam,
            card=snap,
            amount=plan.quote.fare_fen,
            when=self.now,
            composite=True,
            capp=self._capp,
            min_balance=plan.min_balance,
        )
        return self._send_plain(self._flow.start())

    def _previous(self, index: int = 1) -> PreviousRide | None:
        """The card's ``index``-th latest ride (EF1E record), if it has one that decodes."""
        snap = self._snapshot
        assert snap is not None
        raw = snap.records.get((SFI_TRIPS, index))
        if raw is None:
            return None
        try:
            trip = TripRecord.decode(raw)
        except ValueError:
            return None
        return PreviousRide(trip.industry, trip.time)

    def _before_entry(self, entered_at: datetime | None) -> tuple[PreviousRide | None, datetime]:
        """For an exit: the ride before this trip's entry, and the moment a transfer onto the
        metro is judged at (the entry: the rider changed from the bus to the metro there).  The
        latest EF1E record is the entry's own when the entry gate wrote it; a card whose latest
        ride is not this entry (an entry record left by another system) is judged as before."""
        latest = self._previous(1)
        if (
            entered_at is not None
            and latest is not None
            and latest.industry is Industry.METRO
            and latest.at == entered_at
        ):
            return self._previous(2), entered_at
        return latest, self.now

    def _recent(self, terminal8: bytes, moment: datetime | None) -> bool:
        if moment is None or terminal8[2:] != self.device.terminal_id:
            return False
        elapsed = (self.now - moment).total_seconds()
        return 0 <= elapsed < self.device.network.rules.antipassback_s

    def _plan_bus(self, rider: Rider) -> _Plan | Rejected:
        snap = self._snapshot
        assert snap is not None
        raw = snap.records.get((SFI_TRANSIT, 2))
        if raw is not None:
            try:
                last = BusRecord.decode(raw)
            except ValueError:
                last = BusRecord()
            if last.status == BusRecord.BOARDED and self._recent(last.terminal, last.time):
                return self._reject("already_processed", balance=None)
        try:
            quote = bus_fare(
                self.device.network,
                rider,
                route_fare_fen=self.device.route_fare_fen,
                previous=self._previous(),
                now=self.now,
            )
        except ValueError as exc:
            return self._reject("config_error", detail=str(exc))
        return _Plan("bus", quote, quote.fare_fen, None)

    def _plan_metro(self, rider: Rider) -> _Plan | Rejected:
        snap = self._snapshot
        assert snap is not None
        device, net = self.device, self.device.network
        trip = self._metro_trip()
        entered = trip.status is MetroStatus.ENTERED
        if entered and self._recent(trip.entry_terminal, trip.entry_time):
            return self._reject("already_processed")
        if trip.status is MetroStatus.EXITED and self._recent(trip.exit_terminal, trip.exit_time):
            return self._reject("already_processed")
        entry_id = self._entry_station(trip) if entered else None
        exiting = device.direction is Direction.EXIT or (
            device.direction is Direction.BOTH and entered
        )
        minimum = metro_entry_minimum(net, rider)
        max_fare = net.max_fare_fen
        if not exiting:
            if entered:
                penalty = net.rules.entry_while_entered.amount(max_fare)
                quote = Quote(penalty, penalty, ("penalty",))
                return _Plan("entry", quote, max(minimum, penalty), "entry_while_entered")
            return _Plan("entry", Quote(0, 0), minimum, None)
        if entry_id is None:
            penalty = net.rules.exit_without_entry.amount(max_fare)
            return _Plan(
                "exit", Quote(penalty, penalty, ("penalty",)), penalty, "exit_without_entry"
            )
        assert device.station is not None
        if trip.entry_time is not None and self.now < trip.entry_time:
            # This gate's clock is behind the entry gate's: the trip's length, its overtime and
            # any transfer cannot be judged, so no fare is charged; the rider goes to the
            # service desk, and the gate's log says why.
            return self._reject(
                "clock_error",
                detail=f"now {self.now.isoformat()} is before the card's entry at "
                f"{trip.entry_time.isoformat()}",
            )
        previous, transfer_at = self._before_entry(trip.entry_time)
        quote = metro_trip_fare(
            net,
            rider,
            entry=entry_id,
            exit_=device.station.id,
            entered_at=trip.entry_time,
            now=self.now,
            previous=previous,
            transfer_at=transfer_at,
        )
        reason = "overtime" if "overtime" in quote.notes else None
        return _Plan("exit", quote, quote.fare_fen, reason)

    def _metro_trip(self) -> MetroRecord:
        """The card's metro record (EF1A record 1), decoded once per tap; an unreadable or
        missing one counts as no trip."""
        if self._trip is None:
            snap = self._snapshot
            assert snap is not None
            raw = snap.records.get((SFI_TRANSIT, 1))
            try:
                self._trip = MetroRecord.decode(raw) if raw is not None else MetroRecord()
            except ValueError:
                self._trip = MetroRecord()
        return self._trip

    def _entry_station(self, trip: MetroRecord) -> int | None:
        """The entry station id if the open trip began on this network, else None."""
        code = trip.entry_station
        net = self.device.network
        if code[:2].hex() != net.city_code:
            return None
        sid = int.from_bytes(code[3:5], "big")
        return sid if sid < len(net.stations) else None

    # --- the purchase ---------------------------------------------------------------------

    def _capp(self, init: InitInfo) -> list[CappUpdate]:
        plan, snap, device = self._plan, self._snapshot, self.device
        assert plan is not None
        assert snap is not None
        amount = plan.quote.fare_fen
        after = init.balance - amount
        terminal8 = b"\x00\x00" + device.terminal_id
        journey = init.counter.to_bytes(8, "big")
        city = device.network.city_code
        if device.kind is Kind.BUS:
            route = device.route.encode()[:4]
            record = BusRecord(
                status=BusRecord.BOARDED,
                journey=journey,
                city=city,
                operator=device.operator_id,
                route=route,
                terminal=terminal8,
                time=self.now,
                amount=amount,
                balance_after=after,
            )
            updates = [CappUpdate(SFI_TRANSIT, 2, record.encode())]
            industry, line = Industry.BUS, 0
        else:
            updates = [CappUpdate(SFI_TRANSIT, 1, self._metro_record(init, amount).encode())]
            industry = Industry.METRO
            line = device.line.number if device.line is not None else 0
        trip = TripRecord(
            TxType.CAPP_PURCHASE,
            terminal8,
            industry,
            line,
            device.station_code,
            amount,
            after,
            self.now,
            city,
            init.counter,
        )
        updates.append(CappUpdate(SFI_TRIPS, 0, trip.encode()))
        return updates

    def _metro_record(self, init: InitInfo, amount: int) -> MetroRecord:
        plan, snap, device = self._plan, self._snapshot, self.device
        assert plan is not None
        assert snap is not None
        terminal8 = b"\x00\x00" + device.terminal_id
        line = device.line.number if device.line is not None else 0
        if plan.kind == "entry":
            return MetroRecord(
                status=MetroStatus.ENTERED,
                journey=init.counter.to_bytes(8, "big"),
                entry_city=device.network.city_code,
                entry_operator=device.operator_id,
                entry_station=device.station_code,
                entry_terminal=terminal8,
                entry_time=self.now,
                marked_amount=device.network.max_fare_fen,
                entry_line=line,
                entry_amount=amount,
                balance_after_entry=init.balance - amount,
            )
        trip = self._metro_trip()
        return MetroRecord(
            status=MetroStatus.EXITED,
            journey=trip.journey,
            entry_city=trip.entry_city,
            exit_city=device.network.city_code,
            entry_operator=trip.entry_operator,
            exit_operator=device.operator_id,
            entry_station=trip.entry_station,
            exit_station=device.station_code,
            entry_terminal=trip.entry_terminal,
            exit_terminal=terminal8,
            entry_time=trip.entry_time,
            exit_time=self.now,
            marked_amount=trip.marked_amount,
            entry_line=trip.entry_line,
            exit_line=line,
            entry_amount=trip.entry_amount,
            balance_after_entry=trip.balance_after_entry,
            exit_amount=amount,
        )

    def _make_intent(self) -> Intent:
        flow, plan, snap = self._flow, self._plan, self._snapshot
        assert isinstance(flow, Purchase)
        assert plan is not None
        assert snap is not None
        init, flight = flow.init, flow.in_flight
        assert init is not None
        assert flight is not None
        device = self.device
        record = Record(
            seq=0,
            status="pending",
            tx_type=TxType.CAPP_PURCHASE,
            kind=plan.kind,
            alg=init.alg.label,
            # The snapshot holds the card number as its 20 digits; the card holds them as BCD.
            card_serial=bytes.fromhex(snap.serial),
            issuer=snap.issuer_id,
            card_counter=init.counter,
            ttc=flight.ttc,
            amount=plan.quote.fare_fen,
            balance_before=init.balance,
            terminal=device.terminal_id,
            day=flight.day,
            time=flight.time,
            at_ms=int(self.now.timestamp() * 1000),
            station=device.station_code,
            line=device.line.number if device.line is not None else 0,
            operator=device.operator_id.rstrip(b"\x00").decode(errors="replace"),
            tac=b"",
        )
        return Intent(device.id, record, self.now)

    def _on_purchase(self, event: object) -> TapResult:
        plan = self._plan
        assert plan is not None
        if isinstance(event, Refused):
            balance = None
            flow = self._flow
            if isinstance(flow, Purchase) and flow.init is not None:
                balance = flow.init.balance
            if event.reason == "insufficient_balance":
                return self._finish(self._reject("insufficient_balance", balance=balance))
            return self._finish(
                self._reject("card_error", balance=balance, detail=f"{event.step} {event.sw_hex}")
            )
        assert isinstance(event, PurchaseDone)
        return self._finish(
            Accepted(
                self.device.id,
                self._serial,
                event.amount,
                event.balance_after,
                event.tac,
                plan.kind,
                plan.reason,
                event.mac2_valid,
                plan.quote.notes,
                self._resolution,
            )
        )
