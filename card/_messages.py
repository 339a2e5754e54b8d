"""How error messages show what a user handed in: a path or a value is cut in the middle when it
is long, so that a 50 MB argument never becomes a 50 MB message."""

from __future__ import annotations

from pathlib import Path

__all__ = ["describe_path", "shown"]


def describe_path(path: Path | str) -> str:
    """A path as an error message shows it: long ones cut in the middle."""
    text = str(path)
    return text if len(text) <= 120 else f"{text[:60]}…{text[-50:]}"


def shown(value: object, limit: int = 60) -> str:
    """``repr(value)`` as an error message echoes it: a long one cut in the middle."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit // 2]}…{text[-(limit // 2) :]}"
