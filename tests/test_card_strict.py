"""The card as strict as the tools that probe it (docs/card-protocol.md, "Lengths, classes and
the reader"): Le honoured, ISO status words for files and classes, GET RESPONSE, the payment-system
directory, the reader's GET UID, 1-byte commands through vpcd. In-process, through a stand-in vpcd
socket, and through pcscd with pyscard and with a third-party tool (scriptor, Debian pcsc-tools)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime

import pytest

from farelab.card import (
    ATR,
    BANK_AID,
    DEMO_ISSUER_ID,
    DEMO_KEYS,
    PPSE_NAME,
    PSE_NAME,
    SOCIAL_AID,
    TRANSIT_AID,
    VIRTUAL_READER,
    CardImage,
    CardSnapshot,
    InProcessReader,
    MemoryStore,
    PcscReader,
    Psam,
    PsamKeys,
    Purchase,
    ReadCard,
    SimulatedCard,
    Transmit,
    ViccClient,
    card_uid,
    drive,
    personalise,
)

TERMINAL = "001122334455"
SELECT_TRANSIT = "00A4040008A000000632010105"


def issue(serial: str = "3100000000000042") -> CardImage:
    return personalise(serial=serial, issued=date(2026, 1, 1), balance=5000)


class Card:
    """A card in an in-process reader; commands as hex, answers as (data, sw)."""

    def __init__(self, image: CardImage | None = None) -> None:
        self.card = SimulatedCard(
            image or issue(), store=MemoryStore(), entropy=bytes, today=lambda: date(2026, 11, 23)
        )
        self.reader = InProcessReader()
        self.reader.insert(self.card)
        self.reader.connect()

    def send(self, apdu: str) -> tuple[bytes, int]:
        answer = self.reader.transmit(bytes.fromhex(apdu.replace(" ", "")))
        return answer[:-2], int.from_bytes(answer[-2:], "big")

    def sw(self, apdu: str) -> int:
        return self.send(apdu)[1]


@pytest.fixture
def card() -> Card:
    return Card()


def fci_length(card: Card, select: str) -> int:
    data, sw = card.send(select + "00")
    assert sw == 0x9000
    return len(data)


# --- Le: no more than Ne, 6Cxx for a wrong length -------------------------------------------------


def test_select_with_le_shorter_than_the_fci_gets_6cxx_and_selects_nothing(card: Card) -> None:
    length = fci_length(Card(), SELECT_TRANSIT)
    assert card.send(SELECT_TRANSIT + "10") == (b"", 0x6C00 | length)
    assert card.sw("805C000204") == 0x6985  # not executed: nothing selected
    data, sw = card.send(SELECT_TRANSIT + f"{length:02X}")
    assert (len(data), sw) == (length, 0x9000)


def test_select_without_le_answers_no_data(card: Card) -> None:
    assert card.send(SELECT_TRANSIT) == (b"", 0x9000)
    assert card.send("805C000204") == ((5000).to_bytes(4, "big"), 0x9000)


@pytest.mark.parametrize(
    ("apdu", "answer"),
    [
        ("805C000204", ((5000).to_bytes(4, "big"), 0x9000)),
        ("805C000200", ((5000).to_bytes(4, "big"), 0x9000)),  # Le 00: all of it
        ("805C000202", (b"", 0x6C04)),
        ("805C000208", (b"", 0x6C04)),  # a longer Le is as wrong for a fixed-length answer
        ("805C0002", (b"", 0x9000)),  # no Le, no data
    ],
)
def test_get_balance_honours_le(card: Card, apdu: str, answer: tuple[bytes, int]) -> None:
    card.send(SELECT_TRANSIT)
    assert card.send(apdu) == answer


def test_initialize_with_a_wrong_le_starts_no_transaction(card: Card) -> None:
    card.send(SELECT_TRANSIT)
    assert card.sw(f"805001020B01000000C8{TERMINAL}08") == 0x6C0F
    assert card.sw("805401000F" + "00" * 15 + "08") == 0x6985


def debit_apdu(card: Card, amount: int) -> bytes:
    """Select, read and INITIALIZE as farelab's terminal does; the DEBIT it would send next."""
    snap = drive(card.reader, ReadCard())
    assert isinstance(snap, CardSnapshot)
    psam = Psam(
        terminal_id=bytes.fromhex(TERMINAL), issuers={DEMO_ISSUER_ID: PsamKeys.of(DEMO_KEYS)}
    )
    flow = Purchase(psam=psam, card=snap, amount=amount, when=datetime(2026, 11, 23, tzinfo=UTC))
    debit = flow.receive(card.reader.transmit(flow.start().apdu))
    assert isinstance(debit, Transmit)
    assert debit.apdu[-1] == 0x08
    return debit.apdu


def test_debit_with_a_wrong_le_is_not_executed_and_keeps_the_transaction(card: Card) -> None:
    apdu = debit_apdu(card, 300)
    assert card.reader.transmit(apdu[:-1] + b"\x04") == b"\x6c\x08"
    assert card.card.image.balance == 5000
    answer = card.reader.transmit(apdu)
    assert (len(answer), answer[-2:]) == (10, b"\x90\x00")
    assert card.card.image.balance == 4700


def test_debit_without_le_commits_and_its_tac_comes_with_get_response(card: Card) -> None:
    apdu = debit_apdu(card, 300)
    assert card.reader.transmit(apdu[:-1]) == b"\x90\x00"
    assert card.card.image.balance == 4700
    tac_mac2, sw = card.send("00C0000008")
    assert sw == 0x9000
    assert card.send("805A0006020001 08") == (tac_mac2[4:] + tac_mac2[:4], 0x9000)


# --- GET RESPONSE ---------------------------------------------------------------------------------


def test_get_response_hands_out_what_a_command_without_le_kept(card: Card) -> None:
    whole, _ = Card().send(SELECT_TRANSIT + "00")
    assert card.send(SELECT_TRANSIT) == (b"", 0x9000)
    first, sw = card.send("00C0000010")
    assert (first, sw) == (whole[:16], 0x6100 | (len(whole) - 16))
    assert card.send("00C00000FF") == (b"", 0x6C00 | (len(whole) - 16))  # too long: exact length
    assert card.send("00C0000000") == (whole[16:], 0x9000)
    assert card.sw("00C0000000") == 0x6985  # nothing left


def test_get_response_only_right_after_the_command(card: Card) -> None:
    card.send(SELECT_TRANSIT)
    card.send("805C000204")
    assert card.sw("00C0000000") == 0x6985
    assert card.sw("00C0000000") == 0x6985


def test_get_response_between_initialize_and_debit_keeps_the_transaction(card: Card) -> None:
    card.send(SELECT_TRANSIT)
    assert card.send(f"805003020B0100000000{TERMINAL}") == (b"", 0x9000)
    init, sw = card.send("00C000000F")
    assert (len(init), sw) == (15, 0x9000)
    # the transaction still pends: a cache update is taken (it would be 6985 otherwise)
    assert card.sw("80DC01D080" + "27017D" + "00" * 125) == 0x9000


@pytest.mark.parametrize(
    ("apdu", "sw"),
    [("00C0010000", 0x6A86), ("00C00000", 0x6700), ("00C0000001AA00", 0x6700)],
)
def test_get_response_status_words(card: Card, apdu: str, sw: int) -> None:
    card.send(SELECT_TRANSIT)
    assert card.sw(apdu) == sw


# --- READ BINARY and READ RECORD ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("apdu", "sw", "length"),
    [
        ("00B0951E00", 0x6B00, 0),  # at the end
        ("00B0952000", 0x6B00, 0),  # past it
        ("00B0951414", 0x6282, 10),  # more than is left: what is left, end of file
        ("00B0951405", 0x9000, 5),  # less: just that
        ("00B0951400", 0x9000, 10),  # Le 00: up to the end
        ("00B09514", 0x9000, 0),  # no Le: no data
    ],
)
def test_read_binary_iso_status_words(card: Card, apdu: str, sw: int, length: int) -> None:
    card.send(SELECT_TRANSIT)
    data, got = card.send(apdu)
    assert (got, len(data)) == (sw, length)
    if length:
        assert data == card.card.image.ef15[0x14 : 0x14 + length]


def test_read_record_with_a_wrong_le_names_the_record_length(card: Card) -> None:
    card.send(SELECT_TRANSIT)
    assert card.send("00B201D410") == (b"", 0x6C80)
    assert len(card.send("00B201D480")[0]) == 128


# --- classes --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cla", "sw"),
    [
        ("01", 0x6881),  # logical channel 1
        ("03", 0x6881),
        ("41", 0x6881),  # further interindustry class: channels 4 to 19
        ("60", 0x6881),
        ("04", 0x6882),  # proprietary secure messaging
        ("08", 0x6882),  # ISO secure messaging, header not authenticated
        ("0C", 0x6882),  # ISO secure messaging, header authenticated
        ("84", 0x6882),  # SELECT with the maintenance MAC's class
        ("10", 0x6E00),  # command chaining: a class the card does not take
        ("A0", 0x6E00),
    ],
)
def test_channels_and_secure_messaging_in_cla_are_refused(card: Card, cla: str, sw: int) -> None:
    assert card.sw(cla + SELECT_TRANSIT[2:] + "00") == sw


def test_maintenance_class_still_taken_for_its_commands(card: Card) -> None:
    card.send(SELECT_TRANSIT)
    assert card.sw("841E00000400000000") == 0x6985  # no challenge yet: 84 1E reached its handler


# --- payment-system environment -------------------------------------------------------------------


def _tlvs(data: bytes) -> list[tuple[bytes, bytes]]:
    out, i = [], 0
    while i < len(data):
        tag_len = 2 if data[i] & 0x1F == 0x1F else 1
        tag = data[i : i + tag_len]
        length = data[i + tag_len]
        start = i + tag_len + 1
        out.append((tag, data[start : start + length]))
        i = start + length
    return out


def directory(fci: bytes) -> list[bytes]:
    """The AIDs of a PSE/PPSE FCI's directory entries, in order."""
    [(tag, body)] = _tlvs(fci)
    assert tag == b"\x6f"
    fields = dict(_tlvs(body))
    a5 = dict(_tlvs(fields[b"\xa5"]))
    aids = []
    for tag, entry in _tlvs(a5[b"\xbf\x0c"]):
        assert tag == b"\x61"
        aids.append(dict(_tlvs(entry))[b"\x4f"])
    return aids


@pytest.mark.parametrize("name", [PSE_NAME, PPSE_NAME])
def test_select_of_the_payment_system_environment_lists_the_applications(
    card: Card, name: bytes
) -> None:
    select = f"00A40400{len(name):02X}{name.hex()}"
    data, sw = card.send(select + "00")
    assert sw == 0x9000
    assert dict(_tlvs(_tlvs(data)[0][1]))[b"\x84"] == name
    aids = directory(data)
    assert aids == [TRANSIT_AID, SOCIAL_AID, BANK_AID]
    for aid in aids:
        assert card.sw(f"00A40400{len(aid):02X}{aid.hex()}00") == 0x9000
    assert card.send(select + "05") == (b"", 0x6C00 | len(data))


def test_the_pse_keeps_its_directory_in_a_record_file_as_emv_contact_tools_read_it(
    card: Card,
) -> None:
    data, _ = card.send(f"00A404000E{PSE_NAME.hex()}00")
    a5 = dict(_tlvs(dict(_tlvs(_tlvs(data)[0][1]))[b"\xa5"]))
    assert a5[b"\x88"] == b"\x01"
    record, sw = card.send("00B2010C00")
    assert sw == 0x9000
    [(tag, body)] = _tlvs(record)
    assert tag == b"\x70"
    assert [dict(_tlvs(e))[b"\x4f"] for _, e in _tlvs(body)] == [TRANSIT_AID, SOCIAL_AID, BANK_AID]
    assert card.sw("00B2020C00") == 0x6A83
    assert card.sw("805C000204") == 0x6985  # no application selected
    card.send(f"00A404000E{PPSE_NAME.hex()}00")
    assert card.sw("00B2010C00") == 0x6A82  # the PPSE has no file


# --- the reader's GET UID -------------------------------------------------------------------------


def test_get_uid_answers_the_uid_as_a_contactless_reader(card: Card) -> None:
    uid = card_uid(card.card.image)
    assert card.send("FFCA000000") == (uid, 0x9000)
    assert len(uid) == 4
    assert card.send("FFCA000004") == (uid, 0x9000)
    assert card.send("FFCA000002") == (b"", 0x6C04)
    assert card.sw("FFCA010000") == 0x6A81
    assert Card(issue("3100000000000043")).send("FFCA000000")[0] != uid


def test_get_uid_leaves_the_transaction_pending(card: Card) -> None:
    card.send(SELECT_TRANSIT)
    card.send(f"805003020B0100000000{TERMINAL}0F")
    assert card.sw("FFCA000000") == 0x9000
    assert card.sw("80DC01D080" + "27017D" + "00" * 125) == 0x9000


# --- 1-byte commands through vpcd's framing -------------------------------------------------------


def _frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(2, "big") + payload


def _read_frame(sock: socket.socket) -> bytes:
    head = b""
    while len(head) < 2:
        head += sock.recv(2 - len(head))
    length = int.from_bytes(head, "big")
    body = b""
    while len(body) < length:
        body += sock.recv(length - len(body))
    return body


def test_a_one_byte_apdu_through_vpcd_framing_gets_6700_and_the_next_command_works() -> None:
    """A stand-in vpcd: its controls (04 ATR) get their answer, any other 1-byte message is a
    command the card answers 6700, and the card goes on answering."""
    server = socket.create_server(("127.0.0.1", 0))
    client = ViccClient(Card().card, port=server.getsockname()[1])
    client.connect(timeout=2)
    peer, _ = server.accept()
    stop = threading.Event()
    thread = threading.Thread(target=client.serve, kwargs={"stop": stop})
    thread.start()
    try:
        peer.settimeout(5)
        peer.sendall(_frame(b"\x01") + _frame(b"\x04"))
        assert _read_frame(peer) == ATR
        for one in (0x80, 0x03, 0xFF):
            peer.sendall(_frame(bytes((one,))))
            assert _read_frame(peer) == b"\x67\x00"
        peer.sendall(_frame(bytes.fromhex(SELECT_TRANSIT + "00")))
        assert _read_frame(peer)[-2:] == b"\x90\x00"
    finally:
        stop.set()
        thread.join(5)
        peer.close()
        server.close()


# --- through pcscd --------------------------------------------------------------------------------


class Served:
    """A card served in pcscd's virtual reader on a background thread."""

    def __init__(self) -> None:
        self.card = SimulatedCard(issue(), store=MemoryStore(), entropy=bytes)
        self.client = ViccClient(self.card)
        self.client.connect(timeout=5)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.client.serve, kwargs={"stop": self.stop})
        self.thread.start()
        probe = PcscReader(VIRTUAL_READER)
        try:
            assert probe.wait_for_card(5)
        finally:
            probe.close()

    def remove(self) -> None:
        self.stop.set()
        self.thread.join(5)
        probe = PcscReader(VIRTUAL_READER)
        try:
            probe.wait_for_removal(3)
        finally:
            probe.close()


@pytest.fixture
def served(request: pytest.FixtureRequest) -> Iterator[Served]:
    request.getfixturevalue("pcscd")
    held = Served()
    yield held
    held.remove()


@pytest.mark.pcsc
def test_pyscard_through_pcscd(served: Served) -> None:
    reader = PcscReader(VIRTUAL_READER)
    try:
        reader.connect()
        assert reader.transmit(b"\x80") == b"\x67\x00"
        fci = reader.transmit(bytes.fromhex(SELECT_TRANSIT + "00"))
        assert fci[-2:] == b"\x90\x00"
        assert reader.transmit(bytes.fromhex(SELECT_TRANSIT + "10")) == bytes((0x6C, len(fci) - 2))
        ppse = reader.transmit(bytes.fromhex("00A404000E" + PPSE_NAME.hex() + "00"))
        assert directory(ppse[:-2]) == [TRANSIT_AID, SOCIAL_AID, BANK_AID]
        assert reader.transmit(bytes.fromhex("FFCA000000")) == card_uid(served.card.image) + (
            b"\x90\x00"
        )
    finally:
        reader.close()


def _scriptor(commands: list[str]) -> str:
    """Run scriptor on the virtual reader; its stdout (one ``> cmd`` / ``< answer : text`` pair
    a command)."""
    out = ""
    for _ in range(3):  # pcscd may still be powering the card that just came
        run = subprocess.run(
            ["scriptor", "-r", VIRTUAL_READER],
            input="".join(f"{c}\n" for c in commands),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        out = run.stdout
        if run.returncode == 0:
            return out
        time.sleep(0.5)
    raise AssertionError(f"scriptor failed: {out}{run.stderr}")


def _answers(out: str) -> list[str]:
    """scriptor's answers, each as its hex bytes without spaces (a long answer spans lines)."""
    answers: list[str] = []
    current: list[str] | None = None
    for line in out.splitlines():
        if line.startswith("< "):
            current = [line[2:]]
        elif current is not None and not line.startswith(">"):
            current.append(line)
        if current is not None and " : " in current[-1]:
            text = " ".join(current).split(" : ")[0]
            answers.append(text.replace(" ", "").upper())
            current = None
    return answers


@pytest.mark.pcsc
@pytest.mark.skipif(shutil.which("scriptor") is None, reason="needs scriptor (pcsc-tools)")
def test_scriptor_through_pcscd(served: Served) -> None:
    fci_len = fci_length(Card(), SELECT_TRANSIT)
    ppse = "00A404000E" + PPSE_NAME.hex().upper() + "00"
    answers = _answers(
        _scriptor(["80", SELECT_TRANSIT + "00", "805C000204", SELECT_TRANSIT + "10", ppse])
    )
    assert answers[0] == "6700"  # a 1-byte APDU, answered
    assert answers[1].endswith("9000")  # and the next commands work
    assert answers[2] == "00001388" + "9000"
    assert answers[3] == f"6C{fci_len:02X}"  # Le shorter than the FCI
    aids = directory(bytes.fromhex(answers[4])[:-2])
    assert aids == [TRANSIT_AID, SOCIAL_AID, BANK_AID]
