"""Read-only conformance of a card in a reader: farelab's terminal asks the card what a T-Union
card must answer, and says where the card's answer differs.

Read-only, the check selects each application (transit, social security, bank, the PSE and the
PPSE), reads the transit files and records, asks GET BALANCE and sends malformed commands whose
status words ISO 7816-4 and docs/card-protocol.md fix — none of which changes the card.  Only with
the issuer's keys (:class:`DebitKeys`) does it buy one fen and check the card's MAC2, its TAC (with
the issuer's TAC key), GET TRANSACTION PROOF and the balance after.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime

from farelab.card import (
    BANK_AID,
    PPSE_NAME,
    PSE_NAME,
    SOCIAL_AID,
    SW,
    TRANSIT_AID,
    Alg,
    CardSnapshot,
    IssuerKeys,
    ProofFound,
    Psam,
    PsamKeys,
    PublicInfo,
    Purchase,
    PurchaseDone,
    ReadCard,
    Reader,
    ReaderError,
    Refused,
    Response,
    TacVerifier,
    TransactionProof,
    TxType,
    drive,
    parse_response,
)

__all__ = ["CHECK_TERMINAL", "CardCheckError", "CardReport", "Check", "DebitKeys", "check_card"]

CHECK_TERMINAL = bytes.fromhex("0F0000000001")
"""The terminal id the one-fen purchase carries (EF18 and the TAC name it)."""


class CardCheckError(Exception):
    """The card could not be checked: the reader failed or the card left the field."""


@dataclass(frozen=True, slots=True)
class Check:
    """One question put to the card: what a conforming card answers and what this one did."""

    name: str
    expected: str
    seen: str
    conforms: bool

    def to_json(self) -> dict[str, object]:
        """The check as a JSON object (``check``, ``expected``, ``seen``, ``conforms``)."""
        return {
            "check": self.name,
            "expected": self.expected,
            "seen": self.seen,
            "conforms": self.conforms,
        }


@dataclass(frozen=True, slots=True)
class CardReport:
    """Every check, in the order they were made; ``debited`` when the one-fen purchase ran."""

    reader: str
    checks: tuple[Check, ...]
    debited: bool

    @property
    def conforms(self) -> bool:
        """True when every check conforms."""
        return all(c.conforms for c in self.checks)

    def to_json(self) -> dict[str, object]:
        """``{"reader", "conforms", "debited", "checks": [...]}``."""
        return {
            "reader": self.reader,
            "conforms": self.conforms,
            "debited": self.debited,
            "checks": [c.to_json() for c in self.checks],
        }


@dataclass(frozen=True, slots=True)
class DebitKeys:
    """What the one-fen purchase needs: the issuer's master keys (the PSAM's purchase key, the
    TAC key to check the card's TAC) and the moment written into the transaction."""

    keys: IssuerKeys
    when: datetime


def _hex(data: bytes) -> str:
    return data.hex().upper()


def _seen(response: Response) -> str:
    if not response.data:
        return f"{response.sw:04X}"
    data = _hex(response.data)
    shown = data if len(data) <= 24 else f"{data[:20]}… ({len(response.data)} bytes)"
    return f"{shown} {response.sw:04X}"


def _tlv(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Tag and value of each BER-TLV, constructed ones opened (enough for an FCI)."""
    i = 0
    while i + 1 < len(data):
        tag_len = 2 if data[i] & 0x1F == 0x1F else 1
        tag = data[i : i + tag_len]
        length = data[i + tag_len] if i + tag_len < len(data) else 0
        value = data[i + tag_len + 1 : i + tag_len + 1 + length]
        yield tag, value
        if tag[0] & 0x20:
            yield from _tlv(value)
        i += tag_len + 1 + length


def _tags(data: bytes, tag: bytes) -> list[bytes]:
    return [v for t, v in _tlv(data) if t == tag]


class _Session:
    """The checks made so far over one reader."""

    def __init__(self, reader: Reader) -> None:
        self.reader = reader
        self.checks: list[Check] = []

    def send(self, apdu: bytes) -> Response:
        try:
            rapdu = self.reader.transmit(apdu)
        except ReaderError as exc:
            raise CardCheckError(f"{self.reader.name}: {exc}") from exc
        try:
            return parse_response(rapdu)
        except ValueError:
            return Response(b"", 0)

    def note(self, name: str, expected: str, seen: str, *, conforms: bool) -> None:
        self.checks.append(Check(name, expected, seen, conforms))

    def ask(
        self,
        name: str,
        apdu: str | bytes,
        expected: str,
        judge: Callable[[Response], bool],
    ) -> Response:
        command = bytes.fromhex(apdu) if isinstance(apdu, str) else apdu
        response = self.send(command)
        self.note(name, expected, _seen(response), conforms=judge(response))
        return response

    def status(self, name: str, apdu: str | bytes, *sws: int) -> Response:
        expected = " or ".join(f"{sw:04X}" for sw in sws)
        return self.ask(name, apdu, expected, lambda r: r.sw in sws)


def _select(aid: bytes) -> bytes:
    return bytes((0x00, 0xA4, 0x04, 0x00, len(aid))) + aid + b"\x00"


def _is_ok(response: Response) -> bool:
    return response.sw == SW.OK


def _lists_applications(data: bytes) -> bool:
    return {TRANSIT_AID, SOCIAL_AID, BANK_AID} <= set(_tags(data, b"\x4f"))


def _transit_fci(response: Response) -> bool:
    if response.sw != SW.OK or _tags(response.data, b"\x84") != [TRANSIT_AID]:
        return False
    ef15 = _tags(response.data, b"\x9f\x0c")
    alg = _tags(response.data, b"\xdf\x01")
    try:
        PublicInfo.decode(ef15[0])
    except (IndexError, ValueError):
        return False
    return alg in ([b"\x00"], [b"\x04"])


def _transit(s: _Session) -> int | None:
    """The transit application's selection, files, records and balance; the balance seen."""
    fci = s.ask(
        "SELECT transit application",
        _select(TRANSIT_AID),
        "9000, FCI: the AID, EF15 (9F0C), algorithm (DF01)",
        _transit_fci,
    )
    ef15 = s.ask("READ BINARY EF15", "00B095001E", "9000, 30 bytes", lambda r: r.ok)
    from_fci = _tags(fci.data, b"\x9f\x0c")
    s.note(
        "EF15 as the FCI carries it",
        "the same 30 bytes",
        "same" if from_fci[:1] == [ef15.data] else "different",
        conforms=from_fci[:1] == [ef15.data] and len(ef15.data) == 30,
    )
    s.ask("READ BINARY EF16", "00B0960000", "9000, 55 bytes", lambda r: r.ok and len(r.data) == 55)
    s.ask("READ BINARY EF17", "00B0970000", "9000, 60 bytes", lambda r: r.ok and len(r.data) == 60)
    s.status("READ BINARY EF15 past its end", "00B0951E00", SW.OFFSET_BEYOND_END)
    s.status("READ RECORD EF18 (log) 1", "00B201C400", SW.OK, SW.RECORD_NOT_FOUND)
    s.status("READ RECORD EF1A (metro) 1", "00B201D400", SW.OK)
    s.status("READ RECORD EF1A (bus) 2", "00B202D400", SW.OK)
    s.status("READ RECORD EF1E (trips) 1", "00B201F400", SW.OK, SW.RECORD_NOT_FOUND)
    s.status("READ RECORD EF1A 9 (none)", "00B209D400", SW.RECORD_NOT_FOUND)
    s.status("READ RECORD of a binary file", "00B201AC00", SW.FILE_INCOMPATIBLE)
    balance = s.ask(
        "GET BALANCE", "805C000204", "9000, 4 bytes", lambda r: r.ok and len(r.data) == 4
    )
    return int.from_bytes(balance.data, "big") if balance.ok and len(balance.data) == 4 else None


def _malformed(s: _Session, balance: int | None) -> None:
    """Malformed commands with the transit application selected: each refused, nothing done."""
    s.status("wrong class (00 5C)", "005C000204", SW.CLA_NOT_SUPPORTED)
    s.status("wrong INS (80 EE)", "80EE000000", SW.INS_NOT_SUPPORTED)
    s.status("wrong P1 P2 (GET BALANCE 00 01)", "805C000104", SW.WRONG_P1P2)
    s.status("wrong Lc (GET BALANCE with data)", "805C0002010004", SW.WRONG_LENGTH)
    s.status("wrong Le (GET BALANCE Le 02)", "805C000202", 0x6C04)
    s.status("logical channel in CLA (81 5C)", "815C000204", SW.CHANNEL_NOT_SUPPORTED)
    s.status("secure messaging in CLA (8C 5C)", "8C5C000204", SW.SM_NOT_SUPPORTED)
    s.status("1-byte APDU (80)", "80", SW.WRONG_LENGTH)
    s.status("3-byte APDU (80 5C 00)", "805C00", SW.WRONG_LENGTH)
    s.ask(
        "GET BALANCE after the malformed commands",
        "805C000204",
        "9000, the balance unchanged",
        lambda r: r.ok and balance is not None and r.data == balance.to_bytes(4, "big"),
    )


def _applications(s: _Session) -> None:
    """The other applications and the payment-system environment."""
    s.ask(
        "SELECT social-security application",
        _select(SOCIAL_AID),
        "9000, FCI with its AID",
        lambda r: r.ok and _tags(r.data, b"\x84") == [SOCIAL_AID],
    )
    s.status("READ BINARY social holder (SFI 5)", "00B0850000", SW.OK, SW.SECURITY_STATUS)
    s.status("GET BALANCE in social security", "805C000204", SW.INS_NOT_SUPPORTED)
    s.ask(
        "SELECT bank application",
        _select(BANK_AID),
        "9000, FCI with its AID",
        lambda r: r.ok and _tags(r.data, b"\x84") == [BANK_AID],
    )
    s.status("GET BALANCE in the bank application", "805C000204", SW.SECURITY_STATUS)
    s.ask(
        "SELECT PSE (1PAY.SYS.DDF01)",
        _select(PSE_NAME),
        "9000, FCI naming its directory file (88)",
        lambda r: r.ok and bool(_tags(r.data, b"\x88")),
    )
    s.ask(
        "READ RECORD PSE directory 1",
        "00B2010C00",
        "9000, the transit, social and bank AIDs",
        lambda r: r.ok and _lists_applications(r.data),
    )
    s.ask(
        "SELECT PPSE (2PAY.SYS.DDF01)",
        _select(PPSE_NAME),
        "9000, FCI listing the transit, social and bank AIDs",
        lambda r: r.ok and _lists_applications(r.data),
    )
    s.status("SELECT an unknown AID", _select(bytes.fromhex("A0000000FFFFFF")), SW.NOT_FOUND)
    s.status("GET BALANCE with no application", "805C000204", SW.CONDITIONS)


def _debit(s: _Session, debit: DebitKeys) -> None:
    """One fen bought with the issuer's keys; MAC2, TAC, proof and balance checked."""
    snapshot = drive(s.reader, ReadCard(records=[]))
    if not isinstance(snapshot, CardSnapshot):
        seen = snapshot.reason if isinstance(snapshot, Refused) else "no card data"
        s.note("purchase of one fen: read the card", "the card read", seen, conforms=False)
        return
    psam = Psam(terminal_id=CHECK_TERMINAL, issuers={snapshot.issuer_id: PsamKeys.of(debit.keys)})
    purchase = Purchase(psam=psam, card=snapshot, amount=1, when=debit.when)
    done = drive(s.reader, purchase)
    if not isinstance(done, PurchaseDone):
        seen = f"{done.step} {done.sw_hex} {done.reason}" if isinstance(done, Refused) else "?"
        s.note("purchase of one fen", "INITIALIZE and DEBIT 9000", seen, conforms=False)
        return
    s.note(
        "purchase of one fen",
        "DEBIT 9000",
        f"9000, balance {done.balance_before} → {done.balance_after} fen",
        conforms=True,
    )
    s.note(
        "MAC2 of the DEBIT",
        "valid (PSAM)",
        "valid" if done.mac2_valid else "invalid",
        conforms=done.mac2_valid,
    )
    verifier = TacVerifier(issuers={snapshot.issuer_id: debit.keys.tac}, cache_size=0)
    tac = verifier.purchase_tac(
        alg=purchase.init.alg if purchase.init is not None else snapshot.alg or Alg.TDES,
        issuer_id=snapshot.issuer_id,
        serial8=snapshot.public.serial8,
        amount=1,
        tx_type=TxType.PURCHASE,
        terminal=CHECK_TERMINAL,
        ttc=done.ttc,
        day=done.day,
        time=done.time,
    )
    s.note(
        "TAC of the purchase",
        f"{_hex(tac or b'')} (issuer's TAC key)",
        _hex(done.tac),
        conforms=tac == done.tac,
    )
    proof = drive(s.reader, TransactionProof(tx_type=TxType.PURCHASE, counter=done.counter + 1))
    s.note(
        "GET TRANSACTION PROOF of the purchase",
        f"the same TAC {_hex(done.tac)}",
        _hex(proof.tac) if isinstance(proof, ProofFound) else type(proof).__name__,
        conforms=isinstance(proof, ProofFound) and proof.tac == done.tac,
    )
    s.ask(
        "GET BALANCE after the purchase",
        "805C000204",
        f"9000, {done.balance_after} fen",
        lambda r: r.ok and r.data == done.balance_after.to_bytes(4, "big"),
    )


def check_card(reader: Reader, *, debit: DebitKeys | None = None) -> CardReport:
    """Check the card in ``reader`` (already connected); read-only unless ``debit`` is given.

    Raises :class:`CardCheckError` when the reader fails or the card leaves the field.
    """
    s = _Session(reader)
    balance = _transit(s)
    _malformed(s, balance)
    _applications(s)
    if debit is not None:
        try:
            _debit(s, debit)
        except ReaderError as exc:
            raise CardCheckError(f"{reader.name}: {exc}") from exc
    return CardReport(reader.name, tuple(s.checks), debit is not None)
