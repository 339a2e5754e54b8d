"""A Mosquitto of our own on a free loopback port (tests and benchmarks start it; they never
assume 1883 is free)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from farelab.protocol import ending_with_parent

__all__ = ["BrokerError", "Mosquitto", "free_port"]


class BrokerError(RuntimeError):
    """Mosquitto could not be started."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Mosquitto:
    """``start()``, ``kill()`` (SIGKILL, as a crash) and ``start()`` again on the same port."""

    def __init__(
        self,
        folder: Path,
        *,
        extra: str = "",
        config: str | None = None,
        port: int | None = None,
        with_parent: bool = False,
    ) -> None:
        """``with_parent``: the broker ends when the thread that starts it ends (the process
        killed, even with SIGKILL; see :func:`farelab.protocol.ending_with_parent`).
        ``folder``: where its configuration and log go.  By default an open broker
        (anonymous clients allowed, no ACL) plus the lines in ``extra``; ``config``: a whole
        configuration of its own instead (as ``farelab backend broker-config`` writes it), whose
        listener is on 127.0.0.1:``port``."""
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(binary).exists():
            raise BrokerError("mosquitto is not installed (Debian package mosquitto)")
        if (config is None) != (port is None):
            raise ValueError("a configuration of its own needs the port it listens on, and only it")
        self.binary = binary
        self.with_parent = with_parent
        self.port = port if port is not None else free_port()
        self.folder = folder
        self.log = folder / "mosquitto.log"
        self.conf = folder / "mosquitto.conf"
        base = (
            config
            if config is not None
            else (
                f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                "max_queued_messages 100000\nmax_inflight_messages 1000\nset_tcp_nodelay true\n"
            )
        )
        self.conf.write_text(
            f"{base}log_dest file {self.log}\n{extra}"
            # As root, Mosquitto drops to user "mosquitto", who cannot read pytest's folders.
            + ("user root\n" if os.geteuid() == 0 else "")
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        argv = [self.binary, "-c", str(self.conf)]
        if self.with_parent:
            argv = ending_with_parent(argv)
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise BrokerError(f"mosquitto exited at start: {err}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            except OSError:
                time.sleep(0.05)
            else:
                return
        raise BrokerError(f"mosquitto did not listen on {self.port}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
