"""SIGTERM and Ctrl-C for the commands that run on threads (``card serve``, ``card relay``).

A Python signal handler runs in the main thread between two bytecodes of whatever it was
doing, so it must not take a lock: one that set a :class:`threading.Event` itself would wait
for the Event's own lock when the signal lands inside ``Event.wait`` while the main thread holds
it, and the process would never stop.  Here the handlers do nothing; the interpreter's
wake-up descriptor (written by its C-level handler, whichever thread the signal found) wakes a
thread of our own, which sets the event in an ordinary thread.

That thread also bounds the stop: a command still running :data:`STOP_GRACE_S` seconds after
the signal (its reader or pcscd does not answer) ends at once with status 1 and a message, as
does a second signal.  Where Python's fault handler is on (``PYTHONFAULTHANDLER=1``, ``-X
faulthandler``), the threads' stacks go to stderr first, to show what it was waiting for.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import socket
import sys
import threading

__all__ = ["STOP_GRACE_S", "stop_on_signals"]

STOP_GRACE_S = 10.0
"""Seconds a command may take to stop after SIGTERM or Ctrl-C."""

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _noted(signum: int, frame: object) -> None:
    """The Python-level handler: nothing (the wake-up descriptor has carried the signal)."""


def stop_on_signals(stop: threading.Event, *, grace: float = STOP_GRACE_S) -> None:
    """Set ``stop`` at SIGTERM or SIGINT; end the process if it has not ended ``grace`` seconds
    later, or at a second signal.  Call it from the main thread, before the command's work."""
    receiver, sender = socket.socketpair()
    sender.setblocking(False)  # noqa: FBT003 (the socket API)
    signal.set_wakeup_fd(sender.fileno(), warn_on_full_buffer=False)
    for signum in _SIGNALS:
        signal.signal(signum, _noted)
    watching = threading.Thread(
        target=_watch, args=(receiver, sender, stop, grace), name="signals", daemon=True
    )
    watching.start()


def _watch(
    receiver: socket.socket, sender: socket.socket, stop: threading.Event, grace: float
) -> None:
    """The signals thread (``sender`` is here to stay open while the interpreter writes to it)."""
    wanted = {int(s) for s in _SIGNALS}
    seen = 0
    while True:
        receiver.settimeout(grace if seen else None)
        try:
            data = receiver.recv(64)
        except TimeoutError:
            _exit(f"still stopping {grace:g} s after the signal: giving up on tidying up")
            return
        except OSError:
            return
        if not data:
            return
        seen += sum(1 for signum in data if signum in wanted)
        if seen >= 2:
            _exit("a second signal: stopping at once, without tidying up")
            return
        if seen == 1:
            stop.set()


def _exit(reason: str) -> None:
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    with contextlib.suppress(Exception):
        if faulthandler.is_enabled():
            faulthandler.dump_traceback(all_threads=True)
        sys.stderr.write(f"farelab: error: {reason}\n")
        sys.stderr.flush()
    os._exit(1)
