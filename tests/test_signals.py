"""SIGTERM and Ctrl-C for the thread-run commands: the stop is set outside the interrupted
frame, and a stop that hangs (or a second signal) ends the process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PRELUDE = """
import os, signal, sys, threading, time
from farelab._signals import stop_on_signals
stop = threading.Event()
stop_on_signals(stop, grace=float(sys.argv[1]))
print("ready", flush=True)
"""


def run(body: str, *, grace: float = 10.0, env: dict[str, str] | None = None) -> Script:
    return Script(PRELUDE + body, grace, env)


class Script:
    def __init__(self, source: str, grace: float, env: dict[str, str] | None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", source, str(grace)],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline() == "ready\n"

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def end(self, timeout: float) -> tuple[int, str, str]:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            raise AssertionError(f"still running after {timeout} s: {out!r} {err!r}") from None
        return self.proc.returncode, out, err


def test_a_signal_inside_the_events_own_lock_still_stops() -> None:
    # A signal handler runs between two bytecodes of the main thread: here, while it holds the
    # stop Event's lock, as it does for a moment in every stop.wait().  A handler that set the
    # Event itself would wait for that lock for ever.
    script = run(
        """
with stop._cond:
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(1000):
        pass
print("set" if stop.wait(5) else "not set", flush=True)
"""
    )
    assert script.end(15) == (0, "set\n", "")


def test_sigterm_and_ctrl_c_set_the_stop_and_the_command_ends_its_own_way() -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        script = run('stop.wait(30)\nprint("tidied up", flush=True)\n')
        script.signal(signum)
        assert script.end(15) == (0, "tidied up\n", "")


def test_a_signal_found_by_another_thread_sets_the_stop() -> None:
    script = run(
        """
blocked = threading.Thread(target=time.sleep, args=(30,), daemon=True)
blocked.start()
time.sleep(0.1)
signal.pthread_kill(blocked.ident, signal.SIGTERM)
while not stop.is_set():
    stop.wait(0.01)
print("stopped", flush=True)
"""
    )
    assert script.end(15) == (0, "stopped\n", "")


def test_a_stop_that_hangs_ends_the_process_after_the_grace_with_the_stacks() -> None:
    script = run(
        'stop.wait(30)\nprint("stopping", flush=True)\ntime.sleep(60)\n',
        grace=1.0,
        env={"PYTHONFAULTHANDLER": "1"},
    )
    started = time.monotonic()
    script.signal()
    code, out, err = script.end(20)
    assert (code, out) == (1, "stopping\n")
    assert err.endswith(
        "farelab: error: still stopping 1 s after the signal: giving up on tidying up\n"
    )
    assert 'File "<string>", line 9 in <module>' in err  # the stacks: where it waits
    assert time.monotonic() - started < 15


def test_without_the_fault_handler_a_hung_stop_says_one_line() -> None:
    script = run("stop.wait(30)\ntime.sleep(60)\n", grace=0.5)
    script.signal()
    assert script.end(20) == (
        1,
        "",
        "farelab: error: still stopping 0.5 s after the signal: giving up on tidying up\n",
    )


def test_a_second_signal_ends_the_process_at_once() -> None:
    script = run('stop.wait(30)\nprint("stopping", flush=True)\ntime.sleep(60)\n')
    script.signal(signal.SIGINT)
    assert script.proc.stdout is not None
    assert script.proc.stdout.readline() == "stopping\n"
    script.signal(signal.SIGINT)
    assert script.end(5) == (
        1,
        "",
        "farelab: error: a second signal: stopping at once, without tidying up\n",
    )
