"""docs/card-protocol.md B4 published vectors against card._crypto (tests/independent.py checks a
second implementation against the same vectors)."""

from __future__ import annotations

import pytest

from farelab.card import Alg, diversify, mac, session_key, tac_key

VECTOR_KEY = bytes.fromhex("11223344556677888877665544332211")


def test_load_session_key_vector() -> None:
    seslk = session_key(Alg.TDES, VECTOR_KEY, bytes.fromhex("1122334400008000"))
    assert seslk.hex().upper() == "9B1D924E05595603"


def test_load_mac1_and_mac2_vectors() -> None:
    seslk = bytes.fromhex("9B1D924E05595603")
    mac1 = mac(Alg.TDES, seslk, bytes.fromhex("000000000000100001001122334455"))
    mac2 = mac(Alg.TDES, seslk, bytes.fromhex("000010000100112233445520111221214822"))
    assert (mac1.hex().upper(), mac2.hex().upper()) == ("2988AE5A", "3A845BF0")


def test_purchase_vectors() -> None:
    sespk = session_key(Alg.TDES, VECTOR_KEY, bytes.fromhex("1122334400000001"))
    assert sespk.hex().upper() == "003238ABC57659DD"
    mac1 = mac(Alg.TDES, sespk, bytes.fromhex("000010000600112233445520120229135100"))
    assert mac1.hex().upper() == "F15CAB75"
    assert mac(Alg.TDES, sespk, bytes.fromhex("00001000")).hex().upper() == "56988A13"


def test_sm4_standard_vector_through_diversify_shape() -> None:
    # GB/T 32907 example: SM4(K, P) with K = P = 0123…3210. diversify(SM4) encrypts D ‖ ¬D, so
    # pick D such that D ‖ ¬D is the plaintext: 0123456789ABCDEF ‖ FEDCBA9876543210.
    key = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
    out = diversify(Alg.SM4, key, bytes.fromhex("0123456789ABCDEF"))
    assert out.hex().upper() == "681EDF34D206965E86B3E94F536E4246"


def test_tdes_diversification_is_encryption_of_data_and_its_complement() -> None:
    out = diversify(Alg.TDES, VECTOR_KEY, bytes(8))
    assert out[:8] == session_key(Alg.TDES, VECTOR_KEY, bytes(8))
    assert out[8:] == session_key(Alg.TDES, VECTOR_KEY, b"\xff" * 8)


def test_tac_key_is_xor_of_halves_for_3des_and_the_key_for_sm4() -> None:
    assert tac_key(Alg.TDES, VECTOR_KEY) == bytes(
        a ^ b for a, b in zip(VECTOR_KEY[:8], VECTOR_KEY[8:], strict=True)
    )
    assert tac_key(Alg.SM4, VECTOR_KEY) == VECTOR_KEY


def test_sm4_session_key_and_mac_lengths() -> None:
    sk = session_key(Alg.SM4, VECTOR_KEY, bytes(8))
    assert len(sk) == 16
    assert len(mac(Alg.SM4, sk, b"anything")) == 4


@pytest.mark.parametrize(
    ("alg", "key"), [(Alg.TDES, bytes(16)), (Alg.SM4, bytes(8))], ids=["3des-16", "sm4-8"]
)
def test_wrong_mac_key_length_is_a_value_error(alg: Alg, key: bytes) -> None:
    with pytest.raises(ValueError, match="key"):
        mac(alg, key, b"x")


def test_alg_labels_round_trip_and_reject_unknown() -> None:
    assert Alg.from_label("SM4") is Alg.SM4
    assert Alg.from_label("3des") is Alg.TDES
    with pytest.raises(ValueError, match="3des or sm4"):
        Alg.from_label("aes")


@pytest.mark.parametrize(("alg", "size"), [(Alg.TDES, 8), (Alg.SM4, 16)])
def test_cached_mac_key_computes_the_same_mac(alg: Alg, size: int) -> None:
    from farelab.card._crypto import MacKey  # noqa: PLC0415

    key = bytes(range(size))
    cached = MacKey(alg, key)
    for length in range(70):
        data = bytes((i * 31) & 0xFF for i in range(length))
        assert cached.compute(data) == mac(alg, key, data)


@pytest.mark.parametrize("alg", [Alg.TDES, Alg.SM4])
def test_set_up_diversifier_diversifies_as_diversify_does(alg: Alg) -> None:
    from farelab.card._crypto import Diversifier  # noqa: PLC0415

    key = bytes(range(16))
    diversifier = Diversifier(alg, key)
    for card in range(20):
        data = (card * 0x0101_0101_0101).to_bytes(8, "big")
        assert diversifier.diversify(data) == diversify(alg, key, data)


@pytest.mark.parametrize(("alg", "size"), [(Alg.TDES, 8), (Alg.SM4, 16)])
def test_kept_cbc_encryptor_restarts_at_iv_zero_for_every_message(alg: Alg, size: int) -> None:
    """``mac`` and ``MacKey`` keep one CBC encryptor per key across messages; each message's MAC
    must still be the one the independent reference computes from scratch, whatever the
    previous message on that key was (lengths 0 to 69, two keys interleaved)."""
    from farelab.card._crypto import MacKey  # noqa: PLC0415
    from tests import card_reference as ref  # noqa: PLC0415

    keys = [bytes(range(size)), bytes(range(100, 100 + size))]
    kept = [MacKey(alg, k) for k in keys]
    for length in range(70):
        for which, key in enumerate(keys):
            data = bytes((i * 37 + length + which) & 0xFF for i in range(length))
            expected = ref.mac(alg.label, key, data)
            assert mac(alg, key, data) == expected
            assert kept[which].compute(data) == expected


def test_a_mac_key_shared_by_threads_gives_every_thread_the_right_mac() -> None:
    import sys  # noqa: PLC0415
    import threading  # noqa: PLC0415

    from farelab.card._crypto import MacKey  # noqa: PLC0415
    from tests import card_reference as ref  # noqa: PLC0415

    key = bytes(range(8))
    shared = MacKey(Alg.TDES, key)
    messages = [bytes((t * 7 + i) & 0xFF for i in range(5 + t % 20)) for t in range(64)]
    expected = [ref.mac("3des", key, m) for m in messages]
    wrong: list[int] = []

    def work(offset: int) -> None:
        for r in range(2000):
            t = (offset + r) % len(messages)
            if shared.compute(messages[t]) != expected[t]:
                wrong.append(t)

    threads = [threading.Thread(target=work, args=(n * 13,)) for n in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch inside compute() as often as they can
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert wrong == []
