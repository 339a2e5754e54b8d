"""What several commands open the same way: the ``--trace`` file and the ``--log`` file."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from farelab._errors import CliError
from farelab.card import describe_path

if TYPE_CHECKING:
    from farelab.card import TraceWriter

__all__ = ["append_log", "trace_writer"]


def trace_writer(path: Path | None) -> TraceWriter | None:
    """The ``--trace`` file opened for appending, or None; CliError if it cannot be written."""
    if path is None:
        return None
    # Only here: the trace module loads the simulated card, which the other commands leave out.
    from farelab.card import TraceWriter  # noqa: PLC0415

    try:
        return TraceWriter(path)
    except OSError as exc:
        raise CliError(f"--trace {describe_path(path)}: cannot write: {exc.strerror}") from None


def append_log(stack: contextlib.ExitStack, path: Path | None) -> TextIO | None:
    """The ``--log`` file opened for appending (closed with ``stack``), or None; CliError if it
    cannot be opened."""
    if path is None:
        return None
    try:
        return stack.enter_context(path.open("a", encoding="utf-8"))
    except OSError as exc:
        raise CliError(f"{describe_path(path)}: {exc.strerror or exc}") from None
