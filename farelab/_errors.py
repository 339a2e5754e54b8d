"""The one error type commands raise for a clean, traceback-free message."""

from __future__ import annotations

__all__ = ["CliError"]


class CliError(Exception):
    """A problem the user can fix; printed as ``farelab: error: …`` with exit status 2."""

    def __init__(self, message: str, *, status: int = 2) -> None:
        super().__init__(message)
        self.status = status
