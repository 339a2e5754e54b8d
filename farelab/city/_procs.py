"""The city's child processes: start one by its command line, SIGKILL it as a crash, start it
again, write lines to its stdin and hand each JSON line of its stdout to a callback.

The backend's supervisor restarts its own workers; :meth:`Child.worker_pids` finds them in
``/proc`` so that the chaos can kill one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from farelab.protocol import ending_with_parent

__all__ = ["Child", "children_of"]

log = logging.getLogger(__name__)

_TAIL: Final = 200  # lines of stdout and of stderr kept for a failure message
_OUTPUT_GRACE: Final = 2.0  # seconds to read what a dead child left in its pipes
_STREAM_LIMIT: Final = 1 << 20  # longest line read from a child


class Child:
    """One child process, started, killed and started again by the city."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        on_json: Callable[[Child, dict[str, Any]], None] | None = None,
        on_stderr: Callable[[Child, str], None] | None = None,
        log_file: Path | None = None,
    ) -> None:
        """``name``: what the city calls it (a device id, ``backend``, ``kiosk-1``); ``argv``:
        its command line; ``env``: its whole environment (none: the city's own); ``cwd``: its
        folder (none: the city's own); ``on_json``: called with the child and the object for
        every stdout line that is a JSON object (other lines are only kept in :attr:`stdout`);
        ``on_stderr``: called with every stderr line; ``log_file``: where every stderr line is
        appended as well (over all its runs)."""
        if not argv:
            raise ValueError("a child needs a command line")
        self.name = name
        self.argv = list(argv)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.on_json = on_json
        self.on_stderr = on_stderr
        self.log_file = log_file
        self.stdout: deque[str] = deque(maxlen=_TAIL)
        """The last lines it wrote to stdout, over all its runs."""
        self.stderr: deque[str] = deque(maxlen=_TAIL)
        """The last lines it wrote to stderr, over all its runs."""
        self.starts = 0
        """How many times it was started."""
        self.kills = 0
        """How many times :meth:`kill` sent it SIGKILL."""
        self._proc: asyncio.subprocess.Process | None = None
        self._readers: set[asyncio.Task[None]] = set()

    @property
    def pid(self) -> int | None:
        """Its process id while started (also after it died, until the next start)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        """None while it runs (or before it starts); then its exit status, negative for the
        signal that ended it (-9 after :meth:`kill`)."""
        return self._proc.returncode if self._proc is not None else None

    @property
    def running(self) -> bool:
        """Whether it was started and has not been seen to end."""
        return self._proc is not None and self._proc.returncode is None

    async def start(self) -> None:
        """Start it; its stdin, stdout and stderr are pipes."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        await self._drain_readers()
        self._proc = await asyncio.create_subprocess_exec(
            *ending_with_parent(self.argv),  # no device outlives a killed city
            env=self.env,
            cwd=self.cwd,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=_STREAM_LIMIT,
        )
        self.starts += 1
        out, err = self._proc.stdout, self._proc.stderr
        if out is None or err is None:
            raise RuntimeError("asyncio gave a child without the pipes asked for")
        for stream, on_line in ((out, self._stdout_line), (err, self._stderr_line)):
            task = asyncio.create_task(self._read(stream, on_line), name=f"{self.name} output")
            self._readers.add(task)
            task.add_done_callback(self._readers.discard)

    def kill(self) -> bool:
        """SIGKILL it, as a crash, and count it; False if it was not running."""
        if not self.running or self._proc is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            self._proc.send_signal(signal.SIGKILL)
        self.kills += 1
        return True

    async def wait(self) -> int:
        """Wait for it to end and for its output to be read (for up to 2 s after it ended);
        its exit status."""
        if self._proc is None:
            raise RuntimeError(f"{self.name} was never started")
        code = await self._proc.wait()
        await self._drain_readers()
        return code

    async def restart(self) -> None:
        """Start it again: SIGKILLed first (and counted) if it still runs."""
        if self.running:
            self.kill()
            await self.wait()
        await self.start()

    async def stop(self, *, grace: float = 10.0) -> int | None:
        """SIGTERM it and wait ``grace`` seconds, then SIGKILL it (not counted as a kill);
        its exit status, or None if it was never started."""
        if self._proc is None:
            return None
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self._proc.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self._proc.send_signal(signal.SIGKILL)
        return await self.wait()

    def send_line(self, text: str) -> bool:
        """Write ``text`` and a newline to its stdin; False if it is not running or its stdin
        is closed (the line is lost, as a request to a crashed device is)."""
        if not self.running or self._proc is None or self._proc.stdin is None:
            return False
        if self._proc.stdin.is_closing():
            return False
        self._proc.stdin.write(text.encode() + b"\n")
        return True

    def worker_pids(self) -> list[int]:
        """The process ids of its children other than multiprocessing's resource tracker: for
        ``farelab backend run``, its workers (empty if it is not running)."""
        if not self.running or self._proc is None:
            return []
        return [
            pid for pid in children_of(self._proc.pid) if "resource_tracker" not in _cmdline(pid)
        ]

    async def _read(self, stream: asyncio.StreamReader, on_line: Callable[[str], None]) -> None:
        tail = self.stdout if on_line == self._stdout_line else self.stderr
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line longer than the limit: keep its start, go on
                raw = await stream.read(_STREAM_LIMIT)
            if not raw:
                return
            line = raw.decode(errors="replace").rstrip("\n")
            tail.append(line)
            on_line(line)

    def _stderr_line(self, line: str) -> None:
        if self.log_file is not None:
            with contextlib.suppress(OSError), self.log_file.open("a", encoding="utf-8") as f:
                f.write(line + "\n")
        if self.on_stderr is not None:
            try:
                self.on_stderr(self, line)
            except Exception:
                log.exception("%s: the handler of its error line failed", self.name)

    def _stdout_line(self, line: str) -> None:
        if self.on_json is None:
            return
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            return
        if isinstance(doc, dict):
            try:
                self.on_json(self, doc)
            except Exception:
                # a failing observer must not stop the reading: the child would block on a
                # full pipe
                log.exception("%s: the handler of its output line failed", self.name)

    async def _drain_readers(self) -> None:
        """Wait for the output of the last run to be read, giving up after a while: a child's
        own children (a supervisor's workers) may hold its pipes open after it died."""
        if not self._readers:
            return
        _, pending = await asyncio.wait(set(self._readers), timeout=_OUTPUT_GRACE)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)


def children_of(pid: int) -> list[int]:
    """The process ids of ``pid``'s children, from ``/proc/<pid>/task/*/children`` (empty if
    it is gone or the kernel does not list them)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.scandir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                text = Path(task.path, "children").read_text()
                found.extend(int(x) for x in text.split())
    return sorted(set(found))


def _cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""
