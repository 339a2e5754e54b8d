"""The card's persistent state (its EEPROM) as an immutable value, and its file image.

The applet never mutates a :class:`CardImage`; a command that commits returns a new one, and the
shell writes it with :func:`save_image` before the answer leaves the card.  ``save_image`` replaces
the file atomically (write, fsync, rename, fsync the folder), so a process killed at any instant
leaves either the old image or the new one — never a mixture.  That is the card's anti-tearing.
A powered card (:class:`card.FileStore`) commits without creating a file: it rewrites its shadow
file ``.<name>.shadow`` (the image before its last commit) in place and swaps it with the image in
one rename (:func:`exchange_image_file`); a reader reads under a shared flock of the file it
opened, so a rewrite of the file that was the image a moment ago is never seen half done.

A card is in one field at a time: :class:`ImageLock` is an flock on ``.<name>.lock`` beside the
image that a file-backed card holds while it is powered, so two processes (or two readers) never
work from the same image at once.  Whoever holds it also removes the temporary files a killed
writer left behind: no one else can be writing that card then.  It finds them in a listing of the
folder that a process takes at most every :data:`LISTING_MAX_AGE_S` seconds (the first time it
takes a card there, then again only once the listing is that old): a folder of thousands of cards
is not listed at every tap, and a killed writer's file is removed by the next holder of its card
after the next listing, not necessarily by the very next one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import date
from pathlib import Path
from typing import Any, Literal

from farelab.card._crypto import Alg
from farelab.card._files import (
    EF1A_LEN,
    EF1E_LEN,
    EF18_LEN,
    BusRecord,
    MetroRecord,
    PublicInfo,
)
from farelab.card._keys import CardKeys
from farelab.card._messages import describe_path
from farelab.card._money import fen_to_yuan

__all__ = [
    "BUSY_WAIT_S",
    "IMAGE_FORMAT",
    "CardBusyError",
    "CardImage",
    "ImageError",
    "ImageLock",
    "Proof",
    "SocialSecurity",
    "load_image",
    "save_image",
]

IMAGE_FORMAT = "farelab-card/1"
LOG_RECORDS = 10
TRIP_RECORDS = 10
PROOFS_KEPT = 16
MAX_BALANCE_FEN = 100_000
BUSY_WAIT_S = 2.0
"""How long a card waits for another field to release it before it is ``card busy``."""


class ImageError(ValueError):
    """A card image file that cannot be read or written (unreadable, not a card image, a bad
    field, a full disk); the message says which file and why.  A write that failed left the
    old image in place: the card did not commit."""


class CardBusyError(ImageError):
    """The card is in another field (another process or reader holds its image)."""


@dataclass(frozen=True, slots=True)
class Proof:
    """What GET TRANSACTION PROOF returns for one completed transaction.

    ``counter`` is the counter after the transaction (INITIALIZE's counter + 1).  For a load,
    ``mac`` is the host's MAC2 the card accepted; for a purchase, the card's MAC2.
    """

    tx_type: int
    counter: int
    mac: bytes
    tac: bytes


@dataclass(frozen=True, slots=True)
class SocialSecurity:
    """The social-security application: holder data and its PIN (R8)."""

    holder: bytes = bytes(64)
    pin: str = "888888"
    initial_pin: str = "888888"
    try_limit: int = 5
    failures: int = 0
    failure_day: date | None = None
    locked: bool = False

    @property
    def pin_changed(self) -> bool:
        """Once the PIN differs from the initial one it is always asked (R8)."""
        return self.pin != self.initial_pin


@dataclass(frozen=True, slots=True)
class CardImage:
    """Everything the card keeps across power cycles."""

    alg: Alg
    ef15: bytes
    ef16: bytes
    ef17: bytes
    keys: CardKeys
    balance: int = 0
    offline_counter: int = 0
    online_counter: int = 0
    log: tuple[bytes, ...] = ()
    metro: bytes = field(default_factory=lambda: MetroRecord().encode())
    bus: bytes = field(default_factory=lambda: BusRecord().encode())
    trips: tuple[bytes, ...] = ()
    proofs: tuple[Proof, ...] = ()
    blocked: bool = False
    max_balance: int = MAX_BALANCE_FEN
    social: SocialSecurity = field(default_factory=SocialSecurity)
    bank_balance: int = 0
    ef15_damaged: bool = False
    """EF15 holds bytes no terminal can decode (a card zoo's damaged card): the image loads
    without checking it, and :attr:`public` raises ValueError."""
    transit: bool = True
    """The card carries the transit application; False for a card with only the bank and
    social-security applications (a card zoo's), which answers SELECT of the transit AID with
    ``6A82`` and leaves it out of its PSE/PPSE directory."""

    @property
    def public(self) -> PublicInfo:
        """EF15 decoded."""
        return PublicInfo.decode(self.ef15)

    @property
    def serial(self) -> str:
        """The card number's 20 digits as EF15 holds them (read even where EF15 is damaged)."""
        return self.ef15[10:20].hex()

    def with_log(self, record: bytes) -> tuple[bytes, ...]:
        """EF18 after one more record (cyclic: newest first, oldest dropped)."""
        return (record, *self.log)[:LOG_RECORDS]

    def with_trip(self, record: bytes) -> tuple[bytes, ...]:
        """EF1E after one more record (cyclic: newest first)."""
        return (record, *self.trips)[:TRIP_RECORDS]

    def with_proof(self, proof: Proof) -> tuple[Proof, ...]:
        """Proofs after one more completed transaction."""
        return (proof, *self.proofs)[:PROOFS_KEPT]

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (bytes as upper-case hex)."""
        ss = self.social
        return {
            "format": IMAGE_FORMAT,
            "alg": self.alg.label,
            "ef15": self.ef15.hex().upper(),
            "ef16": self.ef16.hex().upper(),
            "ef17": self.ef17.hex().upper(),
            "keys": {
                "dpk": self.keys.dpk.hex().upper(),
                "dlk": self.keys.dlk.hex().upper(),
                "dtk": self.keys.dtk.hex().upper(),
                "damk": self.keys.damk.hex().upper(),
                "version": self.keys.version,
            },
            "balance": self.balance,
            "offline_counter": self.offline_counter,
            "online_counter": self.online_counter,
            "log": [r.hex().upper() for r in self.log],
            "metro": self.metro.hex().upper(),
            "bus": self.bus.hex().upper(),
            "trips": [r.hex().upper() for r in self.trips],
            "proofs": [
                [p.tx_type, p.counter, p.mac.hex().upper(), p.tac.hex().upper()]
                for p in self.proofs
            ],
            "blocked": self.blocked,
            "max_balance": self.max_balance,
            "social": {
                "holder": ss.holder.hex().upper(),
                "pin": ss.pin,
                "initial_pin": ss.initial_pin,
                "try_limit": ss.try_limit,
                "failures": ss.failures,
                "failure_day": ss.failure_day.isoformat() if ss.failure_day else None,
                "locked": ss.locked,
            },
            "bank_balance": self.bank_balance,
            # Written only when set, so that every other image keeps its bytes.
            **({"ef15_damaged": True} if self.ef15_damaged else {}),
            **({"transit": False} if not self.transit else {}),
        }

    @classmethod
    def from_json(cls, doc: Any) -> CardImage:
        """Rebuild an image; ImageError naming the first bad field."""
        if not isinstance(doc, dict) or doc.get("format") != IMAGE_FORMAT:
            raise ImageError(f"not a farelab card image (expected format {IMAGE_FORMAT!r})")
        p = _Fields(doc, "")
        keys = p.sub("keys")
        ss = p.sub("social")
        try:
            alg = Alg.from_label(p.text("alg"))
        except ValueError as exc:
            raise ImageError(f"field 'alg': {exc}") from None
        image = cls(
            alg=alg,
            ef15=p.hexbytes("ef15", 30),
            ef16=p.hexbytes("ef16", 55),
            ef17=p.hexbytes("ef17", 60),
            keys=CardKeys(
                dpk=keys.hexbytes("dpk", 16),
                dlk=keys.hexbytes("dlk", 16),
                dtk=keys.hexbytes("dtk", 16),
                damk=keys.hexbytes("damk", 16),
                version=keys.integer("version", 0, 0xFF),
            ),
            balance=p.integer("balance", 0, 0xFFFFFFFF),
            offline_counter=p.integer("offline_counter", 0, 0xFFFF),
            online_counter=p.integer("online_counter", 0, 0xFFFF),
            log=tuple(p.hex_list("log", EF18_LEN)),
            metro=p.hexbytes("metro", EF1A_LEN),
            bus=p.hexbytes("bus", EF1A_LEN),
            trips=tuple(p.hex_list("trips", EF1E_LEN)),
            proofs=tuple(p.proofs("proofs")),
            blocked=p.flag("blocked"),
            max_balance=p.integer("max_balance", 0, MAX_BALANCE_FEN),
            social=SocialSecurity(
                holder=ss.hexbytes("holder", 64),
                pin=ss.digits("pin"),
                initial_pin=ss.digits("initial_pin"),
                try_limit=ss.integer("try_limit", 1, 15),
                failures=ss.integer("failures", 0, 15),
                failure_day=ss.day("failure_day"),
                locked=ss.flag("locked"),
            ),
            bank_balance=p.integer("bank_balance", 0, 0xFFFFFFFF),
            ef15_damaged=doc.get("ef15_damaged", False) is True,
            transit=doc.get("transit", True) is not False,
        )
        try:
            if not image.ef15_damaged:
                image.public  # noqa: B018 - validates EF15 once, at load
        except ValueError as exc:
            raise ImageError(f"field 'ef15': {exc}") from None
        if image.balance > image.max_balance:
            # No card commits a balance past its cap (R4): such an image was edited by hand.
            raise ImageError(
                f"field 'balance' is {fen_to_yuan(image.balance)} yuan, over the card's cap of "
                f"{fen_to_yuan(image.max_balance)} yuan (R4): not an image a card wrote"
            )
        return image

    def replace(self, **changes: Any) -> CardImage:
        """A copy with some fields changed (TypeError for a name that is not a field).

        A card changes its image several times a tap: this copies the fields itself, at half
        the cost of :func:`dataclasses.replace`'s walk over them and call of ``__init__``."""
        copy = _new_object(CardImage)
        changed = 0
        for name in _IMAGE_FIELDS:
            if name in changes:
                _set_field(copy, name, changes[name])
                changed += 1
            else:
                _set_field(copy, name, getattr(self, name))
        if changed != len(changes):
            unknown = ", ".join(sorted(set(changes).difference(_IMAGE_FIELDS)))
            raise TypeError(f"CardImage has no field {unknown}")
        return copy


_IMAGE_FIELDS = tuple(f.name for f in fields(CardImage))
_new_object = object.__new__
_set_field = object.__setattr__


class _Fields:
    """Typed access to one JSON object, with errors that name the field."""

    def __init__(self, doc: dict[str, Any], prefix: str) -> None:
        self._doc = doc
        self._prefix = prefix

    def _get(self, name: str) -> Any:
        if name not in self._doc:
            raise ImageError(f"field {self._prefix + name!r} is missing")
        return self._doc[name]

    def _bad(self, name: str, want: str) -> ImageError:
        return ImageError(f"field {self._prefix + name!r} must be {want}")

    def sub(self, name: str) -> _Fields:
        value = self._get(name)
        if not isinstance(value, dict):
            raise self._bad(name, "an object")
        return _Fields(value, f"{self._prefix}{name}.")

    def text(self, name: str) -> str:
        value = self._get(name)
        if not isinstance(value, str):
            raise self._bad(name, "a string")
        return value

    def digits(self, name: str) -> str:
        value = self.text(name)
        if len(value) != 6 or not value.isdigit():
            raise self._bad(name, "6 digits")
        return value

    def flag(self, name: str) -> bool:
        value = self._get(name)
        if not isinstance(value, bool):
            raise self._bad(name, "true or false")
        return value

    def integer(self, name: str, low: int, high: int) -> int:
        value = self._get(name)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise self._bad(name, f"an integer in {low}..{high}")
        return value

    def _hex_value(self, name: str, value: Any, length: int) -> bytes:
        try:
            raw = bytes.fromhex(value) if isinstance(value, str) else None
        except ValueError:
            raw = None
        if raw is None or len(raw) != length:
            raise self._bad(name, f"{length} bytes of hex")
        return raw

    def hexbytes(self, name: str, length: int) -> bytes:
        return self._hex_value(name, self._get(name), length)

    def hex_list(self, name: str, length: int) -> list[bytes]:
        value = self._get(name)
        if not isinstance(value, list):
            raise self._bad(name, "a list")
        return [self._hex_value(f"{name}[{i}]", v, length) for i, v in enumerate(value)]

    def day(self, name: str) -> date | None:
        value = self._get(name)
        if value is None:
            return None
        try:
            return date.fromisoformat(value)
        except (TypeError, ValueError):
            raise self._bad(name, "null or a YYYY-MM-DD date") from None

    def proofs(self, name: str) -> list[Proof]:
        value = self._get(name)
        if not isinstance(value, list):
            raise self._bad(name, "a list")
        out = []
        for i, item in enumerate(value):
            ok = (
                isinstance(item, list)
                and len(item) == 4
                and all(isinstance(x, int) for x in item[:2])
                and all(isinstance(x, str) for x in item[2:])
            )
            if not ok:
                raise self._bad(f"{name}[{i}]", "[type, counter, mac hex, tac hex]")
            out.append(
                Proof(
                    item[0],
                    item[1],
                    self._hex_value(f"{name}[{i}]", item[2], 4),
                    self._hex_value(f"{name}[{i}]", item[3], 4),
                )
            )
        return out


def load_image(path: Path, *, held: bool = False) -> CardImage:
    """Read a card image file; ImageError with the path and the reason if it is unusable.
    ``held``: the caller holds the card's :class:`ImageLock`, so no one else can be rewriting
    the file it opens (the read then skips the shared flock a reader otherwise takes)."""
    where = describe_path(path)
    try:
        raw = _read_whole(path) if held else _read_shared(path)
    except FileNotFoundError:
        raise ImageError(f"{where}: no such card image") from None
    except OSError as exc:
        raise ImageError(f"{where}: cannot read card image: {exc.strerror or exc}") from None
    try:
        doc = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ImageError(f"{where}: not a farelab card image (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        raise ImageError(f"{where}: not JSON ({exc.msg} at line {exc.lineno})") from None
    except (ValueError, RecursionError) as exc:
        raise ImageError(f"{where}: not a farelab card image ({str(exc)[:80]})") from None
    try:
        return CardImage.from_json(doc)
    except ImageError as exc:
        raise ImageError(f"{where}: {exc}") from None


SHARED_READ_WAIT_S = 1.0
"""How long a read waits for a writer to finish rewriting the file it opened (a writer holds it
for a write and a rename: microseconds; a stopped writer must not stop every reader)."""


_HELD_BY_ANOTHER = frozenset({errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES})


def _flock_within(fd: int, operation: int, wait: float, pause: float) -> bool:
    """flock ``fd`` (``operation``: LOCK_SH or LOCK_EX), trying every ``pause`` seconds while
    another holds it: True once held, False if another still holds it after ``wait`` seconds;
    OSError for any other failure (a file system without flock)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in _HELD_BY_ANOTHER:
                raise
        else:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(pause)


def _read_whole(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _read_all(fd)
    finally:
        os.close(fd)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _read_shared(path: Path) -> bytes:
    """The file's bytes, read under a shared flock of the file itself: a card's
    :class:`FileStore` rewrites in place the file that was the image one commit ago (see
    :meth:`FileStore.save`), under an exclusive flock of it, and a reader that opened that file
    just before it stopped being the image must not see half a rewrite."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        # Read it anyway after the wait (a torn read is an unusable image, said so), or on a
        # file system without flock (nobody rewrites in place there).
        with contextlib.suppress(OSError):
            _flock_within(fd, fcntl.LOCK_SH, SHARED_READ_WAIT_S, 0.0005)
        return _read_all(fd)
    finally:
        os.close(fd)


_IMAGE_JSON = json.JSONEncoder(separators=(",", ":")).encode


def encode_image(image: CardImage) -> bytes:
    """A card image file's bytes: compact JSON (json's C encoder takes no indent, and an
    indented image costs ten times as much to write, at every commit of a card; ``farelab card
    show`` prints an image for people)."""
    return _IMAGE_JSON(image.to_json()).encode("utf-8")


def _temporary_name(path: Path) -> str:
    # Only a card that is written needs secrets (hashlib, OpenSSL): not ``card show``'s start-up.
    import secrets  # noqa: PLC0415

    return f".{path.name}.{secrets.token_hex(4)}.tmp"


# Exactly the names _temporary_name (and, before it, tempfile.mkstemp) makes: the card's name and
# eight characters between it and ".tmp", so a card's are never another card's.
_TEMPORARY = re.compile(r"\.(.+)\.[a-z0-9_]{8}\.tmp")

LISTING_MAX_AGE_S = 10.0
"""How old a folder's listing of temporary files may be when a card there is taken."""


class _Listings:
    """Per folder, the temporary files of each card in it, as a listing found them: one
    listing serves every card taken there until it is :data:`LISTING_MAX_AGE_S` old."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._folders: dict[str, tuple[float, dict[str, list[str]]]] = {}

    def take(self, folder: Path, card: str) -> list[str]:
        """The temporary files of ``card`` in ``folder`` (names), forgotten once returned."""
        key = str(folder)
        now = time.monotonic()
        with self._lock:
            listed = self._folders.get(key)
            if listed is None or now - listed[0] >= LISTING_MAX_AGE_S:
                listed = self._folders[key] = (now, self._list(folder))
            return listed[1].pop(card, [])

    @staticmethod
    def _list(folder: Path) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        with contextlib.suppress(OSError):
            for name in os.listdir(folder):
                if name.endswith(".tmp"):
                    match = _TEMPORARY.fullmatch(name)
                    if match is not None:
                        found.setdefault(match.group(1), []).append(name)
        return found


_LISTINGS = _Listings()


def _folder(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def save_image(path: Path, image: CardImage, *, durable: bool = True) -> None:
    """Replace the image file atomically; with ``durable`` it is on disk when this returns.

    ImageError if it cannot be written (full disk, read-only folder): the old image is then
    still the file's content, untouched.
    """
    write_image_file(path, encode_image(image), durable=durable)


def write_image_file(path: Path, data: bytes, *, durable: bool = True) -> None:
    """:func:`save_image` of an image's bytes (:func:`encode_image`)."""
    folder = _folder(path)
    tmp = folder / _temporary_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        raise _cannot_write(path, exc.strerror or exc) from None
    if durable:
        _sync_folder(folder)


ExchangeOutcome = Literal["done", "not_now", "unsupported"]

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_UNSUPPORTED = frozenset(
    {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EPERM}
)
_swap: tuple[Callable[..., int], Callable[[], int]] | bool | None = False
_swap_lock = threading.Lock()


def _renameat2() -> tuple[Callable[..., int], Callable[[], int]] | None:
    """libc's renameat2 and ctypes' errno getter, loaded at the first commit (None where there
    is none: not Linux, or a C library older than glibc 2.28)."""
    global _swap  # noqa: PLW0603
    if _swap is False:
        with _swap_lock:
            if _swap is False:
                import ctypes  # noqa: PLC0415

                try:
                    fn = ctypes.CDLL(None, use_errno=True).renameat2
                except (OSError, AttributeError):
                    _swap = None
                else:
                    fn.argtypes = [
                        ctypes.c_int,
                        ctypes.c_char_p,
                        ctypes.c_int,
                        ctypes.c_char_p,
                        ctypes.c_uint,
                    ]
                    fn.restype = ctypes.c_int
                    _swap = (fn, ctypes.get_errno)
    return _swap if isinstance(_swap, tuple) else None


def shadow_path(path: Path) -> Path:
    """The file a :class:`FileStore` writes a card's next image into before it swaps it with
    the image: ``.<name>.shadow`` beside it (it holds the image before the last commit)."""
    return _folder(path) / f".{path.name}.shadow"


def exchange_image_file(path: Path, data: bytes, *, durable: bool = True) -> ExchangeOutcome:
    """Make ``data`` the image at ``path`` without creating a file: rewrite the card's shadow
    file (:func:`shadow_path`) in place under an exclusive flock of it, then swap it with the
    image in one atomic rename (``renameat2`` with ``RENAME_EXCHANGE``).  A process killed at
    any instant leaves the old image or the new one, as with :func:`save_image`; the shadow then
    holds the image before, and is rewritten whole at the next commit.  Creating a file costs
    this machine's file system far more than rewriting one (ext4 here: about 0.4 ms of system
    time against 6 µs), at every commit of every card.

    Only the holder of the card's :class:`ImageLock` may call this.  "done": written (ImageError
    if it could not be); "not_now": write it with :func:`save_image` this time (a reader still
    reads the shadow, which was the image a commit ago; or the image is gone); "unsupported":
    this file system or C library cannot swap two files — use :func:`save_image` from now on.
    """
    swap = _renameat2()
    if swap is None:
        return "unsupported"
    rename, get_errno = swap
    # Bytes, not Paths: this runs at every commit of every card.
    image = os.fsencode(path)
    head, name = os.path.split(image)
    shadow = os.path.join(head, b"." + name + b".shadow")
    try:
        fd = os.open(shadow, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise _cannot_write(path, exc.strerror or exc) from None
    try:
        try:
            if not _flock_within(fd, fcntl.LOCK_EX, 0.0, 0.0):
                return "not_now"
        except OSError:
            return "unsupported"  # no flock here: readers could not be kept from a rewrite
        try:
            view = memoryview(data)
            while view:
                view = view[os.pwrite(fd, view, len(data) - len(view)) :]
            os.ftruncate(fd, len(data))
            if durable:
                os.fsync(fd)
        except OSError as exc:
            raise _cannot_write(path, exc.strerror or exc) from None
        if rename(_AT_FDCWD, shadow, _AT_FDCWD, image, _RENAME_EXCHANGE):
            code = get_errno()
            if code == errno.ENOENT:
                return "not_now"  # the image is gone: save_image makes it anew
            if code in _UNSUPPORTED:
                return "unsupported"
            raise _cannot_write(path, os.strerror(code))
    finally:
        os.close(fd)  # the flock goes with it
    if durable:
        _sync_folder(_folder(path))
    return "done"


def _cannot_write(path: Path, reason: object) -> ImageError:
    return ImageError(f"{describe_path(path)}: cannot write card image: {reason}")


def _sync_folder(folder: Path) -> None:
    # The rename is done: every reader sees the new image, so the card has committed.  A failing
    # folder fsync cannot undo that, and must not make the card answer as if it had not; at
    # worst a power cut (not a killed process) brings the old image back.
    with contextlib.suppress(OSError):
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class ImageLock:
    """The one field a card image can be in: an flock on ``.<name>.lock`` beside the image.

    The lock file stays (removing it would race with a process about to lock it); the flock
    goes with the process, so a killed holder never leaves a card busy.
    """

    def __init__(self, path: Path) -> None:
        """``path``: the card image file."""
        self.path = path
        self._lockfile = _folder(path) / f".{path.name}.lock"
        self._release: weakref.finalize[[int], ImageLock] | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the card."""
        return self._release is not None and self._release.alive

    def acquire(self, wait: float = BUSY_WAIT_S) -> None:
        """Take the card, waiting up to ``wait`` seconds for another holder to let it go.

        CardBusyError if it is still held then; ImageError if the lock file cannot be opened.
        Once held, stale temporary files of this card (a killed writer's) are removed.
        """
        if self.held:
            return
        where = describe_path(self.path)
        try:
            fd = os.open(self._lockfile, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ImageError(f"{where}: cannot lock card image: {exc.strerror or exc}") from None
        try:
            held = _flock_within(fd, fcntl.LOCK_EX, wait, 0.01)
        except OSError as exc:
            os.close(fd)
            raise ImageError(f"{where}: cannot lock card image: {exc.strerror or exc}") from None
        if not held:
            os.close(fd)
            raise CardBusyError(
                f"card busy: {where} is in another reader's field (another process or "
                f"reader is using it); present it again once it has left"
            ) from None
        # Closing the descriptor releases the flock: at release(), or when a holder that was
        # never released is collected.
        self._release = weakref.finalize(self, os.close, fd)
        self._remove_stale_temporaries()

    def release(self) -> None:
        """Let the card go (nothing if not held)."""
        release, self._release = self._release, None
        if release is not None:
            release()

    def _remove_stale_temporaries(self) -> None:
        # Only a holder of the lock writes this card, and that is us: any temporary file of
        # this card is a killed writer's (one listed earlier may be gone since: its writer
        # finished before we took the card).
        folder = _folder(self.path)
        for name in _LISTINGS.take(folder, self.path.name):
            with contextlib.suppress(OSError):
                os.unlink(folder / name)
