"""APDU conformance of the card (docs/card-protocol.md), run in-process and through real pcscd +
vpcd, with every MAC and TAC checked against the independent reference in
tests/card_reference.py."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import date
from typing import Any

import pytest

from farelab.card import (
    Alg,
    CardImage,
    Industry,
    InProcessReader,
    LogRecord,
    MemoryStore,
    MetroRecord,
    MetroStatus,
    Reader,
    SimulatedCard,
    TripRecord,
    personalise,
)
from tests import card_reference as ref

PURCHASE = bytes.fromhex("000102030405060708090A0B0C0D0E0F")
LOAD = bytes.fromhex("101112131415161718191A1B1C1D1E1F")
TAC = bytes.fromhex("202122232425262728292A2B2C2D2E2F")
MAINT = bytes.fromhex("303132333435363738393A3B3C3D3E3F")
ISSUER = bytes.fromhex("1310000000000000")
TERMINAL = bytes.fromhex("001122334455")
DAY, TIME = bytes.fromhex("20261123"), bytes.fromhex("083000")
SELECT_TRANSIT = "00A4040008A000000632010105"
SELECT_SOCIAL = "00A4040006D15600000100"
SELECT_BANK = "00A4040008A000000333010101"


class Link:
    """A card and the reader it is in; commands as hex, answers as (data, sw)."""

    def __init__(self, card: SimulatedCard, reader: Reader) -> None:
        self.card = card
        self.reader = reader

    def send(self, apdu: str | bytes) -> tuple[bytes, int]:
        raw = bytes.fromhex(apdu.replace(" ", "")) if isinstance(apdu, str) else apdu
        answer = self.reader.transmit(raw)
        return answer[:-2], int.from_bytes(answer[-2:], "big")

    def sw(self, apdu: str | bytes) -> int:
        return self.send(apdu)[1]

    def repower(self) -> None:
        self.reader.disconnect()
        self.reader.connect()

    def reissue(self, image: CardImage) -> None:
        self.card.reissue(image)
        self.repower()

    @property
    def image(self) -> CardImage:
        return self.card.image


class _Presented:
    def __init__(self) -> None:
        from farelab.card._pcsc import PcscReader  # noqa: PLC0415
        from farelab.card._vicc import ViccClient  # noqa: PLC0415

        image = personalise(serial="1", issued=date(2026, 1, 1))
        self.card = SimulatedCard(image, store=MemoryStore(), entropy=bytes)
        self.client = ViccClient(self.card)
        self.client.connect(timeout=5)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.client.serve, kwargs={"stop": self.stop})
        self.thread.start()
        self.reader = PcscReader("Virtual PCD 00 00")
        assert self.reader.wait_for_card(5)
        self.reader.connect()

    def close(self) -> None:
        self.reader.close()
        self.stop.set()
        self.thread.join(5)
        from farelab.card._pcsc import PcscReader  # noqa: PLC0415

        probe = PcscReader("Virtual PCD 00 00")
        probe.wait_for_removal(3)
        probe.close()


@pytest.fixture(scope="module")
def presented(request: pytest.FixtureRequest) -> Iterator[_Presented]:
    request.getfixturevalue("pcscd")
    held = _Presented()
    yield held
    held.close()


@pytest.fixture(params=["in-process", pytest.param("pcscd", marks=pytest.mark.pcsc)])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def make_link(request: pytest.FixtureRequest, transport: str, image: CardImage) -> Link:
    if transport == "pcscd":
        held: _Presented = request.getfixturevalue("presented")
        link = Link(held.card, held.reader)
        link.reissue(image)
        return link
    card = SimulatedCard(
        image, store=MemoryStore(), entropy=bytes, today=lambda: date(2026, 11, 23)
    )
    reader = InProcessReader()
    reader.insert(card)
    reader.connect()
    return Link(card, reader)


def issue(alg: str = "3des", balance: int = 5000, **changes: Any) -> CardImage:
    image = personalise(
        serial="3100000000000042", issued=date(2026, 1, 1), balance=balance, alg=Alg.from_label(alg)
    )
    return image.replace(**changes) if changes else image


@pytest.fixture
def link(request: pytest.FixtureRequest, transport: str) -> Link:
    return make_link(request, transport, issue())


@pytest.fixture(params=["3des", "sm4"])
def alg(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def alink(request: pytest.FixtureRequest, transport: str, alg: str) -> Link:
    return make_link(request, transport, issue(alg))


# --- reference computations -----------------------------------------------------------------


def keys(link: Link, master: bytes) -> bytes:
    public = link.image.public
    return ref.card_key(link.image.alg.label, master, public.issuer_id, public.serial8)


def init(link: Link, amount: int, p1: int = 0x01) -> bytes:
    data, sw = link.send(f"8050{p1:02X}020B01{amount:08X}{TERMINAL.hex()}0F")
    assert sw == 0x9000, hex(sw)
    return data


def debit(
    link: Link, init_answer: bytes, amount: int, tx_type: int, ttc: int = 7, forge: bool = False
) -> tuple[bytes, int, bytes]:
    """DEBIT with MAC1 from the reference; returns (answer, sw, reference session key)."""
    alg = link.image.alg.label
    random, counter = init_answer[11:15], init_answer[4:6]
    ttc_b = ttc.to_bytes(4, "big")
    sespk = ref.session(alg, keys(link, PURCHASE), random + counter + ttc_b[2:4])
    mac1 = ref.mac(
        alg, sespk, amount.to_bytes(4, "big") + bytes((tx_type,)) + TERMINAL + DAY + TIME
    )
    if forge:
        mac1 = bytes(b ^ 0x01 for b in mac1)
    data, sw = link.send(b"\x80\x54\x01\x00\x0f" + ttc_b + DAY + TIME + mac1 + b"\x08")
    return data, sw, sespk


def purse_state(image: CardImage) -> tuple[object, ...]:
    return (
        image.balance,
        image.offline_counter,
        image.online_counter,
        image.log,
        image.metro,
        image.bus,
        image.trips,
        image.proofs,
        image.blocked,
    )


# --- selection --------------------------------------------------------------------------------


def test_select_transit_returns_fci_with_ef15_and_the_algorithm(link: Link) -> None:
    data, sw = link.send(SELECT_TRANSIT + "00")
    assert sw == 0x9000
    assert data[0] == 0x6F
    i = data.index(b"\x9f\x0c\x1e")
    assert data[i + 3 : i + 33] == link.image.ef15
    assert b"\xdf\x01\x01\x00" in data


@pytest.mark.parametrize(
    ("apdu", "sw"),
    [
        ("00A4040008A000000632010199", 0x6A82),  # unknown AID
        ("00A4020008A000000632010105", 0x6A86),  # P1 not by-name / by-FID
        ("00A4041008A000000632010105", 0x6A86),  # P2 neither 00 nor 0C
        ("00A4040005A000000632", 0x6A82),  # partial AIDs do not select
        ("00A404000332010105", 0x6700),  # too short to be an AID
        ("00A40000023F00", 0x9000),  # the MF
        ("00A4000002AAAA", 0x6A82),  # unknown file id
    ],
)
def test_select_status_words(link: Link, apdu: str, sw: int) -> None:
    assert link.sw(apdu) == sw


# --- files ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("apdu", "sw", "length"),
    [
        ("00B0950000", 0x9000, 30),  # EF15, Le 00 = all
        ("00B095001E", 0x9000, 30),
        ("00B0950A0A", 0x9000, 10),  # offset 10
        ("00B095001F", 0x6282, 30),  # Le beyond the file: what there is, end of file
        ("00B0951E00", 0x6B00, 0),  # offset at the end
        ("00B0960037", 0x9000, 55),  # EF16
        ("00B097003C", 0x9000, 60),  # EF17
        ("00B0980000", 0x6981, 0),  # EF18 is a record file
        ("00B0990000", 0x6A82, 0),  # no such file
        ("00B0000000", 0x6A82, 0),  # no current file
        ("00B0B50000", 0x6A86, 0),  # P1 bits 6-7 must be 0
    ],
)
def test_read_binary(link: Link, apdu: str, sw: int, length: int) -> None:
    link.send(SELECT_TRANSIT)
    data, got = link.send(apdu)
    assert got == sw
    assert len(data) == length


@pytest.mark.parametrize(
    ("apdu", "sw", "length"),
    [
        ("00B201D480", 0x9000, 128),  # EF1A record 1: metro
        ("00B202D400", 0x9000, 128),  # record 2: bus
        ("00B203D400", 0x6A83, 0),
        ("00B201C417", 0x6A83, 0),  # empty log
        ("00B201F430", 0x6A83, 0),  # empty trips
        ("00B201D420", 0x6C80, 0),  # wrong Le: the record's length
        ("00B201AC00", 0x6981, 0),  # EF15 is binary
        ("00B201D000", 0x6A86, 0),  # P2 low bits must be 100
        ("00B201FC00", 0x6A82, 0),  # SFI 1F does not exist
        ("00B200D400", 0x6A83, 0),
    ],
)
def test_read_record(link: Link, apdu: str, sw: int, length: int) -> None:
    link.send(SELECT_TRANSIT)
    data, got = link.send(apdu)
    assert got == sw
    assert len(data) == length
    if apdu.startswith("00B201D4") and sw == 0x9000:
        assert data[:3] == bytes.fromhex("27017D")


# --- class, instruction, state ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("apdu", "sw"),
    [
        ("10A4040008A000000632010105", 0x6E00),  # unknown class
        ("80A4040008A000000632010105", 0x6E00),  # known INS, wrong class
        ("00CA000000", 0x6D00),  # unknown INS
        ("805C", 0x6700),  # too short
        ("805C000204AA", 0x6700),  # Lc does not match
        ("805C00020000000000", 0x6700),  # extended length
    ],
)
def test_malformed_and_unknown_commands(link: Link, apdu: str, sw: int) -> None:
    link.send(SELECT_TRANSIT)
    assert link.sw(apdu) == sw


@pytest.mark.parametrize(
    ("select", "sw"),
    [(None, 0x6985), (SELECT_BANK, 0x6982), (SELECT_SOCIAL, 0x6D00)],
)
def test_purse_commands_outside_the_transit_application(
    link: Link, select: str | None, sw: int
) -> None:
    if select:
        link.send(select)
    assert link.sw("805C000204") == sw
    assert link.sw(f"8050010 20B0100000001{TERMINAL.hex()}".replace(" ", "")) == sw


def test_bank_application_refuses_the_transit_terminal_R1(link: Link) -> None:
    assert link.sw(SELECT_BANK) == 0x9000
    for apdu in ("00B0950000", "00B201D400", "805C000204", "0020000003888888"):
        assert link.sw(apdu) == 0x6982
    assert len(link.send("0084000004")[0]) == 4


# --- purchase -------------------------------------------------------------------------------------


def test_get_balance(link: Link) -> None:
    link.send(SELECT_TRANSIT)
    assert link.send("805C000204") == ((5000).to_bytes(4, "big"), 0x9000)
    assert link.sw("805C000104") == 0x6A86
    assert link.sw("805C000205") == 0x6C04


def test_purchase_with_independent_mac_and_tac(alink: Link) -> None:
    link = alink
    alg = link.image.alg.label
    link.send(SELECT_TRANSIT)
    answer = init(link, 200)
    assert answer[0:4] == (5000).to_bytes(4, "big")
    assert answer[4:6] == b"\x00\x00"
    assert answer[6:9] == b"\x00\x00\x00"
    assert answer[10] == (0x04 if alg == "sm4" else 0x00)
    data, sw, sespk = debit(link, answer, 200, 0x06)
    assert sw == 0x9000
    tac, mac2 = data[:4], data[4:]
    assert mac2 == ref.mac(alg, sespk, (200).to_bytes(4, "big"))
    dtk = ref.tac_key(alg, keys(link, TAC))
    ttc = (7).to_bytes(4, "big")
    assert tac == ref.mac(
        alg, dtk, (200).to_bytes(4, "big") + b"\x06" + TERMINAL + ttc + DAY + TIME
    )
    assert link.send("805C000204")[0] == (4800).to_bytes(4, "big")
    rec = LogRecord.decode(link.send("00B201C417")[0])
    assert (rec.counter, rec.amount, rec.tx_type, rec.terminal, rec.day, rec.time) == (
        0,
        200,
        0x06,
        TERMINAL,
        DAY,
        TIME,
    )
    assert link.send("805A0006020001 08".replace(" ", "")) == (mac2 + tac, 0x9000)


def test_debit_with_forged_mac1_is_refused_and_changes_nothing(alink: Link) -> None:
    link = alink
    link.send(SELECT_TRANSIT)
    before = purse_state(link.image)
    answer = init(link, 200)
    assert debit(link, answer, 200, 0x06, forge=True)[1] == 0x9302
    assert purse_state(link.image) == before
    assert debit(link, answer, 200, 0x06)[1] == 0x6985  # the failed DEBIT ended the transaction


def test_no_overdraft_9401(link: Link) -> None:
    link.send(SELECT_TRANSIT)
    assert link.sw(f"8050010 20B01{5001:08X}{TERMINAL.hex()}".replace(" ", "")) == 0x9401
    assert link.sw(f"805001020B01{5000:08X}{TERMINAL.hex()}") == 0x9000


@pytest.mark.parametrize(
    ("apdu", "sw"),
    [
        (f"805001020B02000000C8{TERMINAL.hex()}", 0x9403),  # unknown key index
        (f"805001020A01000000C8{TERMINAL.hex()[:-2]}", 0x6700),
        (f"805001010B01000000C8{TERMINAL.hex()}", 0x6A86),  # e-deposit
        (f"805002020B01000000C8{TERMINAL.hex()}", 0x6A86),
        (f"805001020B01000000C8{TERMINAL.hex()}05", 0x6C0F),  # Le of 5: the exact length
    ],
)
def test_initialize_status_words(link: Link, apdu: str, sw: int) -> None:
    link.send(SELECT_TRANSIT)
    assert link.sw(apdu) == sw


def test_exhausted_counters_refuse_9402(request: pytest.FixtureRequest, transport: str) -> None:
    link = make_link(request, transport, issue(offline_counter=0xFFFF, online_counter=0xFFFF))
    link.send(SELECT_TRANSIT)
    assert link.sw(f"805001020B01000000C8{TERMINAL.hex()}") == 0x9402
    assert link.sw(f"805000020B01000000C8{TERMINAL.hex()}") == 0x9402


def test_debit_without_initialize_and_after_another_command(link: Link) -> None:
    link.send(SELECT_TRANSIT)
    assert link.sw("805401000F" + "00" * 15 + "08") == 0x6985
    answer = init(link, 100)
    link.send("805C000204")  # anything else cancels the pending transaction
    assert debit(link, answer, 100, 0x06)[1] == 0x6985


def test_card_powered_off_after_initialize_keeps_its_old_state(link: Link) -> None:
    link.send(SELECT_TRANSIT)
    before = purse_state(link.image)
    answer = init(link, 100, p1=0x03)
    link.send("80DC01D080" + MetroRecord(status=MetroStatus.ENTERED).encode().hex())
    link.repower()
    link.send(SELECT_TRANSIT)
    assert debit(link, answer, 100, 0x09)[1] == 0x6985
    assert purse_state(link.image) == before


# --- composite purchase -----------------------------------------------------------------------


def test_composite_purchase_commits_records_with_the_debit(alink: Link) -> None:
    link = alink
    link.send(SELECT_TRANSIT)
    answer = init(link, 0, p1=0x03)
    from datetime import datetime  # noqa: PLC0415

    from farelab.card import CST  # noqa: PLC0415

    when = datetime(2026, 11, 23, 8, 30, tzinfo=CST)
    metro = MetroRecord(status=MetroStatus.ENTERED, entry_time=when, marked_amount=600).encode()
    trip = TripRecord(0x09, b"T", Industry.METRO, 2, b"S", 0, 5000, when, "0310", 0).encode()
    assert link.sw("80DC01D080" + metro.hex()) == 0x9000
    assert link.sw("80DC00F030" + trip.hex()) == 0x9000
    assert link.image.metro != metro  # cached, not written
    assert debit(link, answer, 0, 0x09)[1] == 0x9000
    assert link.send("00B201D480") == (metro, 0x9000)
    assert link.send("00B201F430") == (trip, 0x9000)
    assert LogRecord.decode(link.send("00B201C417")[0]).tx_type == 0x09


@pytest.mark.parametrize(
    ("apdu", "sw"),
    [
        ("80DC03D080" + "27017D" + "00" * 125, 0x6A83),  # EF1A has two records
        ("80DC01D07F" + "27017D" + "00" * 124, 0x6700),
        ("80DC01D080" + "27027D" + "00" * 125, 0x6A80),  # record 1 must stay a metro record
        ("80DC01D480" + "27017D" + "00" * 125, 0x6A86),  # P2 low bits
        ("80DC01C017" + "00" * 23, 0x6982),  # EF18 is written by the card only
        ("80DC01A81E" + "00" * 30, 0x6981),  # EF15 is not a record file
        ("80DC01F830" + "00" * 48, 0x6A82),
    ],
)
def test_update_capp_status_words(link: Link, apdu: str, sw: int) -> None:
    link.send(SELECT_TRANSIT)
    init(link, 0, p1=0x03)
    assert link.sw(apdu) == sw


def test_update_capp_needs_a_composite_initialize(link: Link) -> None:
    link.send(SELECT_TRANSIT)
    record = "27017D" + "00" * 125
    assert link.sw("80DC01D080" + record) == 0x6985
    init(link, 0, p1=0x01)
    assert link.sw("80DC01D080" + record) == 0x6985


# --- load (R4) ---------------------------------------------------------------------------------


def load(link: Link, amount: int, *, forge: bool = False) -> tuple[bytes, int]:
    """INIT FOR LOAD checked against the reference, CREDIT with the host's reference MAC2."""
    alg = link.image.alg.label
    data, sw = link.send(f"805000020B01{amount:08X}{TERMINAL.hex()}10")
    if sw != 0x9000:
        return data, sw
    balance, counter, random, mac1 = data[0:4], data[4:6], data[8:12], data[12:16]
    seslk = ref.session(alg, keys(link, LOAD), random + counter + b"\x80\x00")
    assert mac1 == ref.mac(alg, seslk, balance + amount.to_bytes(4, "big") + b"\x02" + TERMINAL)
    mac2 = ref.mac(alg, seslk, amount.to_bytes(4, "big") + b"\x02" + TERMINAL + DAY + TIME)
    if forge:
        mac2 = bytes(b ^ 0x80 for b in mac2)
    answer, sw = link.send(b"\x80\x52\x00\x00\x0b" + DAY + TIME + mac2 + b"\x04")
    if sw == 0x9000:
        new = (int.from_bytes(balance, "big") + amount).to_bytes(4, "big")
        body = new + counter + amount.to_bytes(4, "big") + b"\x02" + TERMINAL + DAY + TIME
        assert answer == ref.mac(alg, ref.tac_key(alg, keys(link, TAC)), body)
    return answer, sw


def test_load_with_independent_macs_and_tac(alink: Link) -> None:
    alink.send(SELECT_TRANSIT)
    assert load(alink, 10_000)[1] == 0x9000
    assert alink.image.balance == 15_000
    assert alink.image.online_counter == 1
    assert alink.send("805A000202 0001".replace(" ", ""))[1] == 0x9000


def test_load_to_exactly_1000_yuan_is_accepted_R4(link: Link) -> None:
    link.send(SELECT_TRANSIT)
    assert load(link, 95_000)[1] == 0x9000
    assert link.image.balance == 100_000


def test_load_one_fen_past_1000_yuan_is_refused_and_changes_nothing_R4(link: Link) -> None:
    link.send(SELECT_TRANSIT)
    before = purse_state(link.image)
    assert load(link, 95_001)[1] == 0x6985
    assert purse_state(link.image) == before


def test_credit_with_forged_mac2_is_refused_and_changes_nothing(alink: Link) -> None:
    alink.send(SELECT_TRANSIT)
    before = purse_state(alink.image)
    assert load(alink, 100, forge=True)[1] == 0x9302
    assert purse_state(alink.image) == before


def test_zero_load_is_bad_data(link: Link) -> None:
    link.send(SELECT_TRANSIT)
    assert load(link, 0)[1] == 0x6A80


def test_credit_without_load_initialize(link: Link) -> None:
    link.send(SELECT_TRANSIT)
    init(link, 100)
    assert link.sw("805200000B" + "00" * 11 + "04") == 0x6985


# --- proof ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("apdu", "sw"),
    [
        ("805A0006020002", 0x9406),  # counter never completed
        ("805A0009020001", 0x9406),  # wrong type
        ("805A0007020001", 0x6A86),
        ("805A01060200 01".replace(" ", ""), 0x6A86),
        ("805A000603000100", 0x6700),
    ],
)
def test_transaction_proof_status_words(link: Link, apdu: str, sw: int) -> None:
    link.send(SELECT_TRANSIT)
    debit(link, init(link, 10), 10, 0x06)
    assert link.sw(apdu) == sw


# --- challenge, block, unblock -------------------------------------------------------------------


def maintenance(link: Link, header: str) -> bytes:
    challenge, sw = link.send("0084000004")
    assert sw == 0x9000
    alg = link.image.alg.label
    sk = ref.session(alg, keys(link, MAINT), challenge + bytes(4))
    return bytes.fromhex(header) + ref.mac(alg, sk, bytes.fromhex(header))


def test_get_challenge(link: Link) -> None:
    assert len(link.send("0084000008")[0]) == 8
    assert link.sw("0084000005") == 0x6700
    assert link.sw("0084010004") == 0x6A86


def test_application_block_and_unblock(alink: Link) -> None:
    link = alink
    link.send(SELECT_TRANSIT)
    assert link.sw("841E00000400000000") == 0x6985  # no challenge
    link.send("0084000004")
    assert link.sw("841E00000400000000") == 0x9302
    assert link.sw(maintenance(link, "841E000004")) == 0x9000
    assert link.image.blocked
    assert link.sw("805C000204") == 0x6A81
    link.repower()
    assert link.sw(SELECT_TRANSIT) == 0x6A81
    assert link.sw(maintenance(link, "8418000004")) == 0x9000
    assert not link.image.blocked
    assert link.sw(SELECT_TRANSIT) == 0x9000


# --- social security (R8) ------------------------------------------------------------------------


def test_pin_rules_R8(link: Link) -> None:
    link.send(SELECT_SOCIAL)
    assert link.sw("00B0850000") == 0x9000  # unchanged initial PIN: not asked
    assert link.sw("0020000003888888") == 0x9000
    assert link.sw("0024000006888888111111") == 0x6A80  # six identical digits
    assert link.sw("0024000006888888345678") == 0x6A80  # consecutive
    assert link.sw("0024000006888888271828") == 0x9000
    link.repower()
    link.send(SELECT_SOCIAL)
    assert link.sw("00B0850000") == 0x6982  # changed: always asked
    assert link.sw("0020000003271828") == 0x9000
    assert link.sw("00B0850000") == 0x9000


def test_five_wrong_pins_lock_and_the_outlet_resets(link: Link) -> None:
    link.send(SELECT_SOCIAL)
    assert [link.sw("0020000003123123") for _ in range(5)] == [
        0x63C4,
        0x63C3,
        0x63C2,
        0x63C1,
        0x63C0,
    ]
    assert link.sw("0020000003888888") == 0x6983
    # RESET RETRY COUNTER: the maintenance MAC covers the header and the new PIN
    challenge = link.send("0084000004")[0]
    alg = link.image.alg.label
    sk = ref.session(alg, keys(link, MAINT), challenge + bytes(4))
    body = bytes.fromhex("842C000007888888")
    assert link.sw(body + ref.mac(alg, sk, body)) == 0x9000
    assert link.sw("0020000003888888") == 0x9000


def test_transit_application_has_no_pin_R5(link: Link) -> None:
    link.send(SELECT_TRANSIT)
    assert link.sw("0020000003888888") == 0x6D00


# --- the flows of card/_terminal.py over both transports ------------------------------------------


def test_terminal_flows(alink: Link) -> None:
    from datetime import UTC, datetime  # noqa: PLC0415

    from farelab.card import (  # noqa: PLC0415
        DEMO_ISSUER_ID,
        DEMO_KEYS,
        BlockApplication,
        CardSnapshot,
        Load,
        LoadAuthority,
        LoadAuthorization,
        LoadDone,
        NeedAuthorization,
        ProofFound,
        Psam,
        PsamKeys,
        Purchase,
        PurchaseDone,
        ReadCard,
        TransactionProof,
        Transmit,
        TxType,
        drive,
    )

    link = alink
    snap = drive(link.reader, ReadCard())
    assert isinstance(snap, CardSnapshot)
    assert snap.alg is not None
    assert snap.alg.label == link.image.alg.label
    psam = Psam(terminal_id=TERMINAL, issuers={DEMO_ISSUER_ID: PsamKeys.of(DEMO_KEYS)})
    when = datetime(2026, 11, 23, tzinfo=UTC)
    done = drive(link.reader, Purchase(psam=psam, card=snap, amount=300, when=when))
    assert isinstance(done, PurchaseDone)
    assert done.mac2_valid
    proof = drive(link.reader, TransactionProof(tx_type=TxType.PURCHASE, counter=1))
    assert isinstance(proof, ProofFound)
    assert proof.tac == done.tac
    flow = Load(terminal_id=TERMINAL, card=snap, amount=1000)
    event = flow.receive(link.reader.transmit(flow.start().apdu))
    assert isinstance(event, NeedAuthorization)
    auth = LoadAuthority(issuers={DEMO_ISSUER_ID: DEMO_KEYS}).authorize(event.request, when=when)
    assert isinstance(auth, LoadAuthorization)
    result = flow.receive(
        link.reader.transmit(flow.authorize(mac2=auth.mac2, day=auth.day, time=auth.time).apdu)
    )
    assert isinstance(result, LoadDone)
    assert result.balance_after == 5700
    block = BlockApplication(psam=psam, card=snap)
    step: object = block.start()
    while isinstance(step, Transmit):
        step = block.receive(link.reader.transmit(step.apdu))
    assert step is None
    assert link.image.blocked
