"""The validator's asyncio shell (``farelab validator run``).

Small named tasks under one TaskGroup: a watcher per reader (card arrival → one tap → wait for
removal; an unplugged reader is retried with capped backoff and reported once), the feeder of
simulated readers (tap requests as JSON lines on stdin), the display, the parameter updater and
the uplink seam.  A tap never waits for anything but its reader and the journal: it runs whole on
the reader's own thread, so a slow or absent network cannot delay it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
import logging
import os
import stat
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, TextIO, runtime_checkable

from farelab.card import (
    CST,
    ImageError,
    InProcessReader,
    Reader,
    ReaderError,
    SimulatedCard,
    TraceCard,
    TraceWriter,
    TracingReader,
    describe_path,
    step_of,
)
from farelab.protocol import Backoff, ParamsError, decode_params, lines_of
from farelab.validator._config import Config
from farelab.validator._decision import Rejected, TapResult
from farelab.validator._device import Parameters
from farelab.validator._journal import Journal
from farelab.validator._network import NetworkError, parse_networks
from farelab.validator._priority import TapGate
from farelab.validator._replay import PULL_STEPS, result_json
from farelab.validator._runtime import Validator, failure_text, favour_taps
from farelab.validator._stats import TapCounts, TapStats

__all__ = [
    "ParamsHandler",
    "ReportingUplink",
    "StatusSource",
    "Uplink",
    "load_params",
    "parse_params",
    "run",
]

log = logging.getLogger("farelab.validator")
# One encoder for every answer line (json.dumps with options makes one a call).
_ANSWER_JSON = json.JSONEncoder(ensure_ascii=False).encode


ParamsHandler = Callable[[str, bytes], int | None]
"""Called with (device id, the backend's parameters message); returns the version in force."""


class Uplink(Protocol):
    """The seam the uplink fills: started with the loop, cancelled when it stops."""

    async def run(self, journal: Journal) -> None:
        """Send the journal's outbox for as long as the loop runs."""
        ...

    def attach_params(self, handler: ParamsHandler) -> None:
        """Where parameters received from the backend go."""
        ...


StatusSource = Callable[[str], tuple[int, TapCounts] | None]
"""Called with a device id; returns the parameters version it runs and its tap counters (None:
not a device of this loop)."""


@runtime_checkable
class ReportingUplink(Uplink, Protocol):
    """An uplink that also publishes the devices' status reports."""

    def attach_status(self, source: StatusSource) -> None:
        """Where the devices' parameters versions and tap counters are read."""
        ...


def load_params(path: Path, current: Parameters) -> Parameters:
    """``{"version": n, "hotlist": [...], "whitelist": [...]}``; omitted lists are kept."""
    where = describe_path(path)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise ParamsError(f"{where}: no such parameters file") from None
    except OSError as exc:
        raise ParamsError(f"{where}: cannot read: {exc.strerror}") from None
    try:
        return parse_params(text, current)
    except ParamsError as exc:
        raise ParamsError(f"{where}: {exc}") from None


def parse_params(text: str | bytes, current: Parameters) -> Parameters:
    """Parameters from their JSON form (a file, or the backend's retained message); what the
    message leaves out is kept from ``current``."""
    message = decode_params(text)
    networks = current.networks
    if message.networks is not None:
        try:
            networks = parse_networks(message.networks)
        except NetworkError as exc:
            raise ParamsError(str(exc)) from None
    return Parameters(
        message.version,
        current.hotlist if message.hotlist is None else message.hotlist,
        current.whitelist if message.whitelist is None else message.whitelist,
        networks,
    )


@dataclass
class _Station:
    """A device at run time with its reader and the one thread that drives it."""

    validator: Validator
    reader: Reader
    thread: ThreadPoolExecutor
    trace: TraceWriter | None = None


def _now() -> datetime:
    return datetime.now(CST)


@dataclass(frozen=True, slots=True)
class _Tapped:
    """A tap's result, the time the tap took place (the device's clock, or the request's) and
    how long it took (seconds; None when no tap was attempted)."""

    result: TapResult
    at: datetime
    elapsed_s: float | None = None


Shown = _Tapped | str | asyncio.Future[_Tapped]
"""What the display shows, in order: a tap's result, a notice, or a tap still going on (shown
once it has ended, after everything queued before it)."""


async def _in_thread(station: _Station, fn: Callable[[], Any]) -> Any:
    return await asyncio.get_running_loop().run_in_executor(station.thread, fn)


def _tap_once(station: _Station, at: datetime | None = None) -> _Tapped:
    """One tap at ``at`` (default: now), the card connected and let go around it."""
    at = at or _now()
    started = time.perf_counter()
    reader = (
        station.reader if station.trace is None else TracingReader(station.reader, station.trace)
    )
    try:
        reader.connect()
    except ReaderError:
        result = _tap_safely(station, reader, at)
        return _Tapped(result, at, time.perf_counter() - started)
    try:
        result = _tap_safely(station, reader, at)
        return _Tapped(result, at, time.perf_counter() - started)
    finally:
        with contextlib.suppress(Exception):  # the tap's result is decided and journalled
            reader.disconnect()


def _tap_safely(station: _Station, reader: Reader, at: datetime) -> TapResult:
    """One tap; whatever fails inside it is that tap's result, never the device loop's end
    (the other devices go on)."""
    validator = station.validator
    try:
        return validator.tap(reader, at)
    except Exception as exc:  # the validator turns card and journal failures into results
        detail = failure_text(exc)
        log.error("device %s: tap failed: %s", validator.device.id, detail)  # noqa: TRY400
        return Rejected(validator.device.id, "", "card_error", detail=detail)


async def _watch(
    station: _Station, results: asyncio.Queue[Shown], make_reader: Callable[[], Reader]
) -> None:
    """Wait for a card, tap it once, wait for it to leave; survive the reader going away."""
    backoff = Backoff(base=0.4, cap=5.0)  # 0.2–0.4 s after the first failure, 2.5–5 s at most
    while True:
        try:
            present = await _in_thread(station, lambda: station.reader.wait_for_card(0.5))
            if not present:
                continue
            results.put_nowait(await _in_thread(station, lambda: _tap_once(station)))
            while not await _in_thread(station, lambda: station.reader.wait_for_removal(0.5)):
                pass
            backoff.reset()
        except Exception as exc:  # a reader's failure of any kind: retried, this device only
            delay = backoff.next_delay()
            if backoff.failures == 1:
                results.put_nowait(f"reader {station.reader.name!r} unavailable: {exc}")
                log.warning("device %s: reader unavailable: %s", station.validator.device.id, exc)
            await asyncio.sleep(delay)
            with contextlib.suppress(ReaderError):
                station.reader = await _in_thread(station, make_reader)


async def _feed(
    stations: dict[str, _Station],
    source: TextIO,
    results: asyncio.Queue[Shown],
    *,
    durable: bool = True,
) -> None:
    """Tap requests for ``sim`` readers, one JSON object a line: {"device": ID, "card": PATH}
    (or "from_trace": PATH in place of "card", a stub card answering from a recording), with
    optionally "at" (ISO-8601 with offset: the tap's time, for a simulated clock; default now)
    and "pull_after" (a step: the card leaves right after that command reached it).

    ``durable``: whether a card's committed image is fsync'd before the card answers (a power
    cut); it is always replaced atomically (a killed process), as the journal commits are.

    The devices tap at once, each one card at a time: a request for one device does not wait
    for another device's tap, as gates at a station do not.  The answers come out in the order
    of the requests.  A card is in one field at a time: a request for a card whose previous tap
    is still going on waits for it (reading no further requests meanwhile).

    A tap that cannot wait for anything — its card free (taken without waiting), its device's
    thread idle, nothing fsync'd (``durable`` off) — runs here on the event loop: a sim tap is
    all interpreter work, and handing each one to its device's thread cost the process as much
    CPU again in thread switches, for taps that the interpreter's lock ran one at a time anyway.
    Any other tap (its card in another process's field, its device still busy, a durable
    write) goes to its device's thread and waits there, at most :data:`TAPS_IN_FLIGHT` of them
    at once, while the other devices go on."""
    loop = asyncio.get_running_loop()
    recorded: dict[Path, TraceCard] = {}  # a recording's taps go on where the last one ended
    in_field: dict[Path, asyncio.Future[_Tapped]] = {}  # each card's latest tap on a thread
    in_flight: deque[asyncio.Future[_Tapped]] = deque()
    threaded: dict[str, asyncio.Future[_Tapped]] = {}  # each device's latest tap on its thread

    async def submit(
        path: Path, station: _Station, work: Callable[[], _Tapped], card: object = None
    ) -> None:
        while in_flight and in_flight[0].done():
            in_flight.popleft()
        if len(in_flight) >= TAPS_IN_FLIGHT:
            await asyncio.wait({in_flight.popleft()})
        before = in_field.get(path)
        if before is not None and not before.done():
            await asyncio.wait({before})
        device = station.validator.device.id
        busy = threaded.get(device)
        if not durable and (busy is None or busy.done()) and _taken_now(card):
            future = loop.create_future()
            try:
                future.set_result(work())
            except Exception as exc:  # shown where the display awaits it, as a thread's would be
                future.set_exception(exc)
            results.put_nowait(future)
            await asyncio.sleep(0)  # the display, the uplink and the rest get their turn
            return
        future = loop.run_in_executor(station.thread, work)
        in_field[path] = future
        in_flight.append(future)
        threaded[device] = future
        future.add_done_callback(lambda done: _forget(in_field, path, done))
        results.put_nowait(future)

    async for line in _request_lines(source):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
            station = stations[doc["device"]]
            from_trace = "from_trace" in doc
            path = Path(doc["from_trace"] if from_trace else doc["card"])
            at = _request_time(doc.get("at"))
            pull = _request_pull(doc.get("pull_after"))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            shown = describe_path(repr(line.strip()))
            results.put_nowait(f"ignored tap request {shown}: {describe_path(repr(exc))}")
            continue
        reader = station.reader
        if not isinstance(reader, InProcessReader):
            results.put_nowait(f"device {station.validator.device.id!r} has no sim reader")
            continue
        try:
            card: SimulatedCard | TraceCard
            if from_trace:
                card = recorded[path] = recorded.get(path) or TraceCard.from_file(path)
            else:
                # Read once, under the card's lock at power-on (not also here first): an
                # image that cannot be used is then this tap's card_error, from the tap.
                card = SimulatedCard.from_file(path, durable=durable, load=False)
        except Exception as exc:  # a card that cannot be loaded is this tap's card_error
            when = at or _now()
            failed = functools.partial(station.validator.card_failed, when, failure_text(exc, path))
            await submit(path, station, functools.partial(_failed_tap, failed, when))
            continue

        def tap(
            *,
            reader: InProcessReader = reader,
            card: SimulatedCard | TraceCard = card,
            station: _Station = station,
            at: datetime | None = at,
            pull: str | None = pull,
            path: Path = path,
        ) -> _Tapped:
            reader.insert(card)
            if pull is not None:
                reader.pull_after(lambda apdu: step_of(apdu) == pull)
            elif isinstance(card, TraceCard):
                reader.pull_after(card.tears_after)  # it leaves where the recorded card left
            try:
                return _tap_once(station, at)
            except ImageError as exc:  # the image could not be read (or the card is busy)
                when = at or _now()
                failed = station.validator.card_failed(when, failure_text(exc, path))
                return _Tapped(failed, when)
            finally:
                reader.remove()
                if isinstance(card, SimulatedCard):
                    card.close()  # its image let go, even by a tap that never powered it

        await submit(path, station, tap, card)
    if in_flight:  # the source has ended: every tap it asked for ends before the feed does
        await asyncio.wait(set(in_flight))


def _taken_now(card: object) -> bool:
    """Whether a tap of ``card`` can start without waiting: a simulated card's image taken now
    (False if another field holds it, or it cannot be read: its own tap on a thread says so)."""
    if not isinstance(card, SimulatedCard):
        return True
    try:
        return card.take_if_free()
    except Exception:  # the tap itself reports it, as this tap's card_error
        return False


def _failed_tap(failed: Callable[[], TapResult], when: datetime) -> _Tapped:
    return _Tapped(failed(), when)


def _forget(
    in_field: dict[Path, asyncio.Future[_Tapped]], path: Path, done: asyncio.Future[_Tapped]
) -> None:
    if in_field.get(path) is done:
        del in_field[path]


TAPS_IN_FLIGHT = 256
"""The most taps a validator process has going on or waiting for their devices at once: past
that it reads no further requests until the oldest has ended."""

REQUEST_LINE_LIMIT = 1 << 20
"""The longest tap request line read from a pipe (bytes)."""


async def _request_lines(source: TextIO) -> AsyncIterator[str]:
    """The lines of ``source`` as they come.  A pipe (what a program feeding taps gives) is read
    on the event loop itself: no thread wakes for each line and then waits for the interpreter
    while a tap holds it (in a city, that hand-over cost as much CPU as the tap).  Anything
    else — a file, a terminal, a stream without a descriptor — is read by
    :func:`farelab.protocol.lines_of`'s thread.  Either way SIGTERM ends the process at once."""
    try:
        fd = source.fileno()
        is_pipe = stat.S_ISFIFO(os.fstat(fd).st_mode)
    except (OSError, ValueError, io.UnsupportedOperation):
        is_pipe = False
    if not is_pipe:
        async for line in lines_of(source):
            yield line
        return
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=REQUEST_LINE_LIMIT)
    pipe = os.fdopen(os.dup(fd), "rb", buffering=0)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    try:
        while True:
            try:
                raw = await reader.readline()
            except ValueError:  # a line past the limit: the rest of it is dropped
                yield "{}\n"  # (an ignored request, said so on stderr)
                continue
            if not raw:
                return
            yield raw.decode("utf-8", errors="replace")
    finally:
        transport.close()


def _request_time(value: object) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError('"at" must be an ISO-8601 time with its offset')
    at = datetime.fromisoformat(value)
    if at.tzinfo is None:
        raise ValueError(f'"at" {value!r} has no UTC offset')
    return at


def _request_pull(value: object) -> str | None:
    if value is None:
        return None
    if value not in PULL_STEPS:
        raise ValueError(f'"pull_after" must be one of {", ".join(PULL_STEPS)}')
    return str(value)


async def _display(
    results: asyncio.Queue[Shown],
    out: TextIO,
    gate: TapGate | None = None,
    stats: Mapping[str, TapStats] | None = None,
) -> None:
    """Show each result: one JSON line per tap on ``out``, notices on stderr; count it in its
    device's ``stats``; then let the garbage collection a tap deferred run (``gate``)."""
    while True:
        item = await results.get()
        try:
            await _show(item, out, gate, stats)
        finally:
            results.task_done()


async def _show(
    item: Shown,
    out: TextIO,
    gate: TapGate | None,
    stats: Mapping[str, TapStats] | None,
) -> None:
    if isinstance(item, asyncio.Future):
        item = await item
    if isinstance(item, str):
        print(f"farelab validator: {item}", file=sys.stderr, flush=True)
        return
    counter = None if stats is None else stats.get(item.result.device)
    if counter is not None:
        accepted = item.result.result == "accepted"
        reason = None if accepted else item.result.reason
        counter.count(accepted=accepted, reason=reason, elapsed_s=item.elapsed_s)
    doc = result_json(item.result)
    doc["at"] = item.at.isoformat(timespec="milliseconds")
    # What the gate's beeper does: one short beep to pass, a long one to stop the rider.
    doc["beep"] = "pass" if item.result.result == "accepted" else "stop"
    out.write(_ANSWER_JSON(doc) + "\n")
    out.flush()
    if gate is not None:
        gate.between_taps()


async def _update_params(
    path: Path, stations: dict[str, _Station], results: asyncio.Queue[Shown]
) -> None:
    """Apply a new parameters file to every device atomically whenever it changes."""
    seen: float | None = None
    while True:
        try:
            mtime = path.stat().st_mtime
        except OSError:
            mtime = None
        if mtime is not None and mtime != seen:
            seen = mtime
            try:
                for station in stations.values():
                    params = load_params(path, station.validator.params)
                    if params.version > station.validator.params.version:
                        station.validator.apply(params)
                results.put_nowait(f"parameters version {params.version} in force")
            except (ParamsError, ValueError) as exc:
                results.put_nowait(f"parameters not applied: {exc}")
        await asyncio.sleep(1.0)


async def _checkpoints(journal: Journal, every: float = 2.0) -> None:
    """Fold the journal's WAL back in every few seconds, off the taps' path."""
    while True:
        await asyncio.sleep(every)
        await asyncio.to_thread(journal.checkpoint)


def _params_handler(stations: dict[str, _Station], results: asyncio.Queue[Shown]) -> ParamsHandler:
    def handle(device: str, payload: bytes) -> int | None:
        station = stations.get(device)
        if station is None:
            return None
        current = station.validator.params
        try:
            params = parse_params(payload, current)
            if params.version > current.version:
                station.validator.apply(params)
                results.put_nowait(f"device {device}: parameters version {params.version} in force")
        except (ParamsError, ValueError) as exc:
            results.put_nowait(f"device {device}: parameters from the backend refused: {exc}")
        return station.validator.params.version

    return handle


def _status_source(stations: dict[str, _Station], stats: Mapping[str, TapStats]) -> StatusSource:
    def status(device: str) -> tuple[int, TapCounts] | None:
        station = stations.get(device)
        if station is None:
            return None
        return station.validator.params.version, stats[device].snapshot()

    return status


def _reader_factory(spec: str) -> Callable[[], Reader]:
    if spec == "sim":
        return InProcessReader
    name = spec.removeprefix("pcsc:")

    def make() -> Reader:
        from farelab.card import PcscReader  # noqa: PLC0415 - pyscard only for PC/SC devices

        reader: Reader = PcscReader(name)
        return reader

    return make


async def run(
    config: Config,
    journal: Journal,
    *,
    source: TextIO | None,
    out: TextIO,
    params_file: Path | None = None,
    uplink: Uplink | None = None,
    stop: asyncio.Event | None = None,
    trace: TraceWriter | None = None,
) -> None:
    """Run every configured device until ``stop`` is set (or, with only sim readers, until
    ``source`` ends); ``trace``: where every tap's APDU exchanges are recorded, if anywhere.

    This is the application: it tunes the process for its taps — the uplink and the journal's
    background work yield to taps in progress (a :class:`TapGate` on ``journal``, unless it has
    one), a tap defers garbage collection to after its result is shown, and the interpreter
    hands a tap thread the GIL quickly, or, feeding several sim devices at once, in longer turns
    (:func:`favour_taps`)."""
    if journal.gate is None:
        journal.gate = TapGate()
    gate = journal.gate
    sim_devices = sum(dc.device.reader == "sim" for dc in config.devices)
    favour_taps(concurrent_feed=source is not None and sim_devices > 1)
    stop = stop or asyncio.Event()
    results: asyncio.Queue[Shown] = asyncio.Queue()
    stations: dict[str, _Station] = {}
    factories: dict[str, Callable[[], Reader]] = {}
    for dc in config.devices:
        factory = _reader_factory(dc.device.reader)
        factories[dc.device.id] = factory
        thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"reader-{dc.device.id}")
        try:
            reader = await asyncio.get_running_loop().run_in_executor(thread, factory)
        except ReaderError as exc:
            results.put_nowait(f"device {dc.device.id}: reader not available yet: {exc}")
            reader = InProcessReader(dc.device.reader)
        validator = Validator(config=dc, journal=journal)
        stations[dc.device.id] = _Station(validator, reader, thread, trace)
    only_sim = all(dc.device.reader == "sim" for dc in config.devices)
    stats = {device_id: TapStats() for device_id in stations}
    tasks: list[asyncio.Task[None]] = []
    try:
        async with asyncio.TaskGroup() as group:
            display = _display(results, out, gate, stats)
            tasks.append(group.create_task(display, name="display"))
            tasks.append(group.create_task(_checkpoints(journal), name="checkpoints"))
            if params_file is not None:
                tasks.append(
                    group.create_task(_update_params(params_file, stations, results), name="params")
                )
            if uplink is not None:
                uplink.attach_params(_params_handler(stations, results))
                if isinstance(uplink, ReportingUplink):
                    uplink.attach_status(_status_source(stations, stats))
                tasks.append(group.create_task(uplink.run(journal), name="uplink"))
            for device_id, station in stations.items():
                if not isinstance(station.reader, InProcessReader):
                    watch = _watch(station, results, factories[device_id])
                    tasks.append(group.create_task(watch, name=f"watch-{device_id}"))
            feeder = None
            if source is not None:
                # A simulated card's image is as durable as the journal: with synchronous=normal
                # both survive a killed process at any instant, with full a power cut as well.
                durable = journal.synchronous == "full"
                feed = _feed(stations, source, results, durable=durable)
                feeder = group.create_task(feed, name="sim-feeder")
                tasks.append(feeder)
            waiter = group.create_task(stop.wait(), name="stop")
            if only_sim and feeder is not None:
                await asyncio.wait({feeder, waiter}, return_when=asyncio.FIRST_COMPLETED)
            else:
                await waiter
            # Everything queued is shown before the end, the taps still going on included.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(results.join(), 30.0)
            for task in (*tasks, waiter):
                task.cancel()
    finally:
        for station in stations.values():
            station.thread.shutdown(wait=False, cancel_futures=True)
