"""Child processes that end with their parent, however the parent ends."""

from __future__ import annotations

import shutil
from collections.abc import Sequence

__all__ = ["ending_with_parent"]


def ending_with_parent(argv: Sequence[str]) -> list[str]:
    """``argv`` run so that the child gets SIGTERM when the thread that started it ends — its
    parent killed, even with SIGKILL — and no broker, device or backend outlives what started
    it: through util-linux's ``setpriv --pdeathsig`` (Linux), which sets it and execs the
    command, nothing of Python running between fork and exec.  Where there is no ``setpriv``,
    ``argv`` as it is.  Start such children from a thread that lives as long as they should
    (the main thread, or an asyncio loop's)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return list(argv)
    return [setpriv, "--pdeathsig", "TERM", "--", *argv]
