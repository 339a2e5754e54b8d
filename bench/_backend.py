"""A ``farelab backend run`` process for benchmarks, and the memory of its process tree."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["process_tree", "rss_mb", "running_backend"]


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (read from /proc; gone processes are skipped)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                todo.extend(int(child) for child in task.read_text().split())
            except OSError:
                continue
    return out


def rss_mb(pids: list[int]) -> float:
    """The summed resident set size of ``pids`` in MB (VmRSS; gone processes count 0)."""
    total_kb = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total_kb += int(line.split()[1])
                break
    return total_kb / 1024


@contextmanager
def running_backend(
    broker_url: str, db_url: str, *, workers: int, log: Path, timeout: float = 60.0
) -> Iterator[subprocess.Popen[bytes]]:
    """``farelab backend run`` with ``workers`` workers, its output in ``log``; yields once
    every worker has subscribed, and stops it (SIGTERM) on exit."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "farelab",
                "backend",
                "run",
                "--broker",
                broker_url,
                "--db",
                db_url,
                "--workers",
                str(workers),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + timeout
        while log.read_text(errors="replace").count("ingesting from") < workers:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the backend exited ({proc.returncode}): {tail}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the backend's workers did not subscribe within {timeout} s")
            time.sleep(0.1)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
