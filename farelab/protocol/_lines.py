"""Lines of a blocking text stream (a process's stdin), read where they cannot hold the process
up: the request loops of ``validator run`` and ``topup serve``."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from typing import TextIO

__all__ = ["lines_of"]


async def lines_of(stream: TextIO) -> AsyncIterator[str]:
    """Each line of ``stream`` as it comes, until it ends.

    A daemon thread does the blocking reads: a process told to stop (SIGTERM) while its stdin
    is still open ends at once, where a read on asyncio's default executor would keep
    ``asyncio.run`` waiting for that thread until the stream ends.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    def read() -> None:
        try:
            with contextlib.suppress(OSError, ValueError):  # closed under us: the end
                for line in iter(stream.readline, ""):
                    loop.call_soon_threadsafe(queue.put_nowait, line)
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody listens
                loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=read, name="stdin-lines", daemon=True).start()
    while (line := await queue.get()) is not None:
        yield line
