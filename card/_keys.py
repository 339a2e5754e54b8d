"""Issuer master keys, the demo issuer, keys files, and two-level card key diversification.

A card stores only its own diversified keys.  Master keys live where docs/card-protocol.md B4 puts
them: the purchase master in validators' PSAMs, the load master only at the host, the TAC master at
the backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from farelab.card._crypto import Alg, diversify
from farelab.card._messages import describe_path

__all__ = [
    "DEMO_ISSUER_ID",
    "DEMO_KEYS",
    "CardKeys",
    "IssuerKeys",
    "KeysFileError",
    "card_keys",
    "diversify_card_key",
    "load_keys_file",
]

DEMO_ISSUER_ID = bytes.fromhex("1310000000000000")
"""The demo issuer id of docs/card-protocol.md B4 (Taiyuan-style code)."""


@dataclass(frozen=True, slots=True)
class IssuerKeys:
    """An issuer's 16-byte master keys, used for 3DES and SM4 cards alike.

    ``maintenance`` (application block/unblock, PIN reset) is farelab's addition:
    docs/card-protocol.md B4 does not name a maintenance key, and the demo one is ``30 31 … 3F``.
    """

    purchase: bytes
    load: bytes
    tac: bytes
    maintenance: bytes
    version: int = 1

    def __post_init__(self) -> None:
        for name in ("purchase", "load", "tac", "maintenance"):
            value = getattr(self, name)
            if len(value) != 16:
                raise ValueError(f"{name} master key must be 16 bytes, got {len(value)}")
        if not 0 <= self.version <= 0xFF:
            raise ValueError(f"key version must fit one byte, got {self.version}")


DEMO_KEYS = IssuerKeys(
    purchase=bytes.fromhex("000102030405060708090A0B0C0D0E0F"),
    load=bytes.fromhex("101112131415161718191A1B1C1D1E1F"),
    tac=bytes.fromhex("202122232425262728292A2B2C2D2E2F"),
    maintenance=bytes.fromhex("303132333435363738393A3B3C3D3E3F"),
    version=1,
)
"""Test keys of the demo issuer (docs/card-protocol.md B4). Never production keys."""


@dataclass(frozen=True, slots=True)
class CardKeys:
    """One card's diversified keys: DPK purchase, DLK load, DTK TAC, DAMK maintenance."""

    dpk: bytes
    dlk: bytes
    dtk: bytes
    damk: bytes
    version: int


@lru_cache(maxsize=4096)
def diversify_card_key(alg: Alg, master: bytes, issuer_id: bytes, serial8: bytes) -> bytes:
    """Two-level diversification: by issuer id (EF15[0:8]), then by card serial (EF15[12:20]).
    Pure, so the keys of recent cards are remembered (a PSAM sees the same riders daily)."""
    return diversify(alg, diversify(alg, master, issuer_id), serial8)


def card_keys(keys: IssuerKeys, alg: Alg, issuer_id: bytes, serial8: bytes) -> CardKeys:
    """All four card keys for one card."""
    return CardKeys(
        dpk=diversify_card_key(alg, keys.purchase, issuer_id, serial8),
        dlk=diversify_card_key(alg, keys.load, issuer_id, serial8),
        dtk=diversify_card_key(alg, keys.tac, issuer_id, serial8),
        damk=diversify_card_key(alg, keys.maintenance, issuer_id, serial8),
        version=keys.version,
    )


class KeysFileError(ValueError):
    """A keys file that cannot be used; the message names the file and the key."""


def load_keys_file(path: Path) -> IssuerKeys:
    """Read master keys from a TOML file.

    The file holds hex strings ``purchase``, ``load``, ``tac``, ``maintenance`` (16 bytes each)
    and an optional integer ``version``, at top level or under an ``[issuer]`` table.
    """
    import tomllib  # noqa: PLC0415  (few commands read a keys file: not worth every start-up)

    where = describe_path(path)
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise KeysFileError(f"{where}: cannot read keys file: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise KeysFileError(f"{where}: not valid TOML: {exc}") from exc
    except UnicodeDecodeError:
        raise KeysFileError(f"{where}: not valid TOML (not UTF-8 text)") from None
    table = doc.get("issuer", doc)
    if not isinstance(table, dict):
        raise KeysFileError(f"{where}: [issuer] must be a table")
    values: dict[str, bytes] = {}
    for name in ("purchase", "load", "tac", "maintenance"):
        raw = table.get(name)
        if not isinstance(raw, str):
            raise KeysFileError(f"{where}: key {name!r} is missing (a 32-digit hex string)")
        try:
            value = bytes.fromhex(raw)
        except ValueError as exc:
            raise KeysFileError(f"{where}: key {name!r} is not hex") from exc
        if len(value) != 16:
            raise KeysFileError(f"{where}: key {name!r} must be 16 bytes, got {len(value)}")
        values[name] = value
    version = table.get("version", 1)
    if not isinstance(version, int) or not 0 <= version <= 0xFF:
        raise KeysFileError(f"{where}: 'version' must be an integer 0..255")
    return IssuerKeys(version=version, **values)
