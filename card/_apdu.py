"""ISO 7816-4 command/response APDUs and the status words the card answers with.

Only short APDUs are accepted (the T-Union purse uses nothing longer); an extended-length APDU is
answered ``6700`` like any other malformed length.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["SW", "ApduFormatError", "Command", "Response", "parse_command", "parse_response"]


class SW(enum.IntEnum):
    """Status words (docs/card-protocol.md B3, plus the ISO 7816-4 ones the card needs for the
    social-security PIN, for files and records, and for classes it does not take)."""

    OK = 0x9000
    END_OF_FILE = 0x6282
    WRONG_LENGTH = 0x6700
    CHANNEL_NOT_SUPPORTED = 0x6881
    SM_NOT_SUPPORTED = 0x6882
    FILE_INCOMPATIBLE = 0x6981
    SECURITY_STATUS = 0x6982
    AUTH_BLOCKED = 0x6983
    CONDITIONS = 0x6985
    WRONG_DATA = 0x6A80
    APP_BLOCKED = 0x6A81
    NOT_FOUND = 0x6A82
    RECORD_NOT_FOUND = 0x6A83
    WRONG_P1P2 = 0x6A86
    OFFSET_BEYOND_END = 0x6B00
    INS_NOT_SUPPORTED = 0x6D00
    CLA_NOT_SUPPORTED = 0x6E00
    MAC_INVALID = 0x9302
    INSUFFICIENT_BALANCE = 0x9401
    COUNTER_EXHAUSTED = 0x9402
    KEY_NOT_FOUND = 0x9403
    MAC_NOT_AVAILABLE = 0x9406

    @property
    def hex(self) -> str:
        """Four upper-case hex digits, as people write status words."""
        return f"{self.value:04X}"


def pin_tries_left(tries: int) -> int:
    """``63Cx``: a wrong PIN, ``x`` tries left."""
    return 0x63C0 | min(tries, 15)


def exact_length(n: int) -> int:
    """``6Cxx``: wrong Le, ``xx`` the number of bytes the card has (``00`` for 256)."""
    return 0x6C00 | (n & 0xFF)


def bytes_remaining(n: int) -> int:
    """``61xx``: done, ``xx`` bytes still to fetch with GET RESPONSE (``00`` for 256 or more)."""
    return 0x6100 | (min(n, 256) & 0xFF)


class ApduFormatError(ValueError):
    """A C-APDU whose length fields do not add up; carries the status word to answer."""

    def __init__(self, message: str, sw: int) -> None:
        super().__init__(message)
        self.sw = sw


@dataclass(frozen=True, slots=True)
class Command:
    """A parsed short C-APDU. ``le`` is None when absent; an Le byte of 00 means 256."""

    cla: int
    ins: int
    p1: int
    p2: int
    data: bytes = b""
    le: int | None = None

    def encode(self) -> bytes:
        """The wire form (short APDU, ISO 7816-4 cases 1 to 4)."""
        if len(self.data) > 255:
            raise ValueError("short APDUs carry at most 255 data bytes")
        out = bytes((self.cla, self.ins, self.p1, self.p2))
        if self.data:
            out += bytes((len(self.data),)) + self.data
        if self.le is not None:
            if not 1 <= self.le <= 256:
                raise ValueError(f"Le must be 1..256, got {self.le}")
            out += bytes((self.le & 0xFF,))
        return out


def parse_command(apdu: bytes) -> Command:
    """Parse a short C-APDU; ApduFormatError (with ``6700``) when its lengths are inconsistent."""
    n = len(apdu)
    if n < 4:
        raise ApduFormatError(f"a C-APDU has at least 4 bytes, got {n}", SW.WRONG_LENGTH)
    cla, ins, p1, p2 = apdu[0], apdu[1], apdu[2], apdu[3]
    if n == 4:
        return Command(cla, ins, p1, p2)
    if n == 5:
        return Command(cla, ins, p1, p2, le=apdu[4] or 256)
    lc = apdu[4]
    if lc == 0:
        raise ApduFormatError("extended-length APDUs are not supported", SW.WRONG_LENGTH)
    if n == 5 + lc:
        return Command(cla, ins, p1, p2, data=bytes(apdu[5:]))
    if n == 6 + lc:
        return Command(cla, ins, p1, p2, data=bytes(apdu[5:-1]), le=apdu[-1] or 256)
    raise ApduFormatError(
        f"Lc={lc} does not match the {n - 5} bytes that follow it", SW.WRONG_LENGTH
    )


@dataclass(frozen=True, slots=True)
class Response:
    """An R-APDU: response data and the status word."""

    data: bytes
    sw: int

    @property
    def ok(self) -> bool:
        """True for ``9000``."""
        return self.sw == SW.OK

    def encode(self) -> bytes:
        """The wire form: data followed by SW1 SW2."""
        return self.data + self.sw.to_bytes(2, "big")

    @property
    def sw_hex(self) -> str:
        """The status word as four hex digits."""
        return f"{self.sw:04X}"


def parse_response(rapdu: bytes) -> Response:
    """Split an R-APDU; ValueError if it is shorter than a status word."""
    if len(rapdu) < 2:
        raise ValueError(f"an R-APDU has at least 2 bytes, got {len(rapdu)}")
    return Response(bytes(rapdu[:-2]), int.from_bytes(rapdu[-2:], "big"))
