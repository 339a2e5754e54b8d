"""The city's child processes: started, fed lines, their JSON output handed over, SIGKILLed as a
crash and started again, and a supervisor's workers found and killed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from farelab.city import Child, children_of

ECHO = """
import json, sys
print("starting", flush=True)
for line in sys.stdin:
    print(json.dumps({"got": line.strip()}), flush=True)
"""

SUPERVISOR = """
import signal, subprocess, sys, time
workers = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
           for _ in range(2)]
def stop(signum, frame):
    for w in workers:
        w.kill()
        w.wait()
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
while True:
    for i, w in enumerate(workers):
        if w.poll() is not None:
            workers[i] = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    time.sleep(0.05)
"""


async def _until(condition: Any, within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while not condition():
            await asyncio.sleep(0.02)


async def test_lines_to_stdin_come_back_as_json_to_the_callback() -> None:
    seen: list[tuple[str, dict[str, Any]]] = []
    child = Child(
        "echo",
        [sys.executable, "-c", ECHO],
        on_json=lambda c, doc: seen.append((c.name, doc)),
    )
    await child.start()
    try:
        assert child.pid is not None
        assert child.running
        assert child.send_line("one")
        assert child.send_line("two")
        await _until(lambda: len(seen) == 2)
        assert seen == [("echo", {"got": "one"}), ("echo", {"got": "two"})]
        assert child.stdout[0] == "starting"  # kept, but not JSON: not handed over
    finally:
        assert await child.stop() == -signal.SIGTERM  # its stdin stays open: SIGTERM ends it
    assert child.returncode == -signal.SIGTERM


async def test_kill_is_a_sigkill_counted_and_restart_runs_it_again() -> None:
    seen: list[dict[str, Any]] = []
    child = Child("echo", [sys.executable, "-c", ECHO], on_json=lambda c, doc: seen.append(doc))
    await child.start()
    first = child.pid
    assert child.kill()
    assert await child.wait() == -signal.SIGKILL
    assert not child.running
    assert not child.send_line("lost")  # a request to a crashed device is lost
    assert not child.kill()
    await child.restart()
    try:
        assert child.pid != first
        assert (child.starts, child.kills) == (2, 1)
        child.send_line("again")
        await _until(lambda: seen == [{"got": "again"}])
        await child.restart()  # a running child is killed first
        assert (child.starts, child.kills) == (3, 2)
    finally:
        await child.stop()


async def test_stderr_is_kept_and_a_failing_callback_does_not_stop_the_reading() -> None:
    script = (
        "import sys; print('oops', file=sys.stderr, flush=True); "
        "print('{\"n\": 1}'); print('{\"n\": 2}')"
    )
    seen: list[dict[str, Any]] = []

    def handle(c: Child, doc: dict[str, Any]) -> None:
        seen.append(doc)
        raise RuntimeError("a broken observer")

    child = Child("noisy", [sys.executable, "-c", script], on_json=handle)
    await child.start()
    assert await child.wait() == 0
    assert seen == [{"n": 1}, {"n": 2}]
    assert list(child.stderr) == ["oops"]


async def test_env_and_cwd_are_the_childs(tmp_path: Path) -> None:
    script = "import json, os; print(json.dumps({'v': os.environ['CITY_X'], 'cwd': os.getcwd()}))"
    seen: list[dict[str, Any]] = []
    env = {**os.environ, "CITY_X": "42"}
    argv = [sys.executable, "-c", script]
    child = Child("env", argv, env=env, cwd=tmp_path, on_json=lambda c, d: seen.append(d))
    await child.start()
    await child.wait()
    assert seen == [{"v": "42", "cwd": os.fspath(tmp_path)}]


async def test_a_supervisors_workers_are_found_and_one_killed_is_replaced() -> None:
    child = Child("backend", [sys.executable, "-c", SUPERVISOR])
    await child.start()
    every: set[int] = set()
    try:
        await _until(lambda: "ready" in child.stdout)
        workers = child.worker_pids()
        every |= set(workers)
        assert len(workers) == 2
        assert children_of(child.pid or 0) == workers
        os.kill(workers[0], signal.SIGKILL)
        await _until(lambda: workers[0] not in child.worker_pids())
        await _until(lambda: len(child.worker_pids()) == 2)
        every |= set(child.worker_pids())
        assert workers[1] in child.worker_pids()
    finally:
        await child.stop()
        for pid in every:  # in case the supervisor died without stopping them
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert child.worker_pids() == []


async def test_farelab_backend_run_workers_are_found(tmp_path: Path) -> None:
    """The supervisor of ``farelab backend run`` starts its workers with multiprocessing's
    spawn; the resource tracker beside them is not a worker."""
    from farelab.backend._mosquitto import free_port  # noqa: PLC0415

    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    broker = f"mqtt://127.0.0.1:{free_port()}"  # none: the workers retry, which is enough
    argv = [sys.executable, "-m", "farelab", "backend", "run", "--broker", broker]
    child = Child("backend", [*argv, "--db", db, "--workers", "2"])
    await child.start()
    try:
        await _until(lambda: len(child.worker_pids()) == 2, within=30)
        first = child.worker_pids()
        os.kill(first[0], signal.SIGKILL)
        await _until(lambda: first[0] not in child.worker_pids(), within=10)
        await _until(lambda: len(child.worker_pids()) == 2, within=30)
    finally:
        await child.stop(grace=15)


def test_a_child_needs_a_command_line() -> None:
    with pytest.raises(ValueError, match="command line"):
        Child("nothing", [])


async def test_a_child_never_started_has_no_pid_and_waits_for_nothing() -> None:
    child = Child("idle", [sys.executable, "-c", "pass"])
    assert (child.pid, child.returncode, child.running) == (None, None, False)
    assert child.worker_pids() == []
    assert await child.stop() is None
    with pytest.raises(RuntimeError, match="never started"):
        await child.wait()


SLOW_ECHO = """
import json, sys, time
print("ready", file=sys.stderr, flush=True)
for line in sys.stdin:
    doc = json.loads(line)
    time.sleep(doc.get("sleep", 0))
    print(json.dumps({"got": doc["n"]}), flush=True)
"""


async def test_a_request_gets_its_own_answer_none_after_its_timeout_or_its_process_death(
    tmp_path: Path,
) -> None:
    from farelab.city._run import Process  # noqa: PLC0415

    proc = Process(
        "slow",
        [sys.executable, "-c", SLOW_ECHO],
        ready="ready",
        log_file=tmp_path / "slow.log",
    )
    await proc.start()
    try:
        assert await proc.request({"n": 1}, timeout=10) == {"got": 1}
        # Gives up on the first; its late answer stays its own, not the next request's.
        assert await proc.request({"n": 2, "sleep": 0.5}, timeout=0.05) is None
        assert await proc.request({"n": 3}, timeout=10) == {"got": 3}
        answers = await asyncio.gather(*(proc.request({"n": n}) for n in range(4, 8)))
        assert answers == [{"got": n} for n in range(4, 8)]
        waiting = asyncio.create_task(proc.request({"n": 8, "sleep": 30}, timeout=60))
        await asyncio.sleep(0.2)
        proc.kill()
        assert await asyncio.wait_for(waiting, 10) is None  # died: never answered
    finally:
        proc.expected = True
        await proc.child.stop()
