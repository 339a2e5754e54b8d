"""A full disk under a card image, for both of the card layer's ways of writing one: a new file
renamed over the image (``os.replace``) and the card's shadow file rewritten in place
(``os.pwrite``) and swapped with it."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from farelab.card._image import shadow_path


def full_disk_under(monkeypatch: pytest.MonkeyPatch, image: Path | None = None) -> None:
    """Every write of card image ``image`` (of any file, with None) fails with ENOSPC, until
    ``monkeypatch.undo()``."""
    real_replace, real_pwrite, real_fdopen = os.replace, os.pwrite, os.fdopen
    shadow = None if image is None else shadow_path(image).resolve()

    def full() -> OSError:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def replace(src: Any, dst: Any, **kwargs: Any) -> None:
        if image is None or Path(dst).resolve() == image.resolve():
            raise full()
        real_replace(src, dst, **kwargs)

    def pwrite(fd: int, data: Any, offset: int) -> int:
        if shadow is None or Path(os.readlink(f"/proc/self/fd/{fd}")) == shadow:
            raise full()
        return real_pwrite(fd, data, offset)

    class Unwritable:
        """A new file that takes no bytes (the whole disk full)."""

        def __init__(self, fd: int, mode: str = "r", *args: Any, **kwargs: Any) -> None:
            self._file = real_fdopen(fd, mode, *args, **kwargs)

        def __enter__(self) -> Unwritable:
            return self

        def __exit__(self, *exc: object) -> None:
            self._file.close()

        def write(self, data: bytes) -> int:
            raise full()

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "pwrite", pwrite)
    if image is None:
        monkeypatch.setattr(os, "fdopen", Unwritable)
