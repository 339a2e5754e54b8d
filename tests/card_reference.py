"""A second, independent implementation of docs/card-protocol.md B4 written from its text, used
to check the card: only block-cipher ECB from ``cryptography``, with padding, CBC chaining and
diversification done here.  It does not import card._crypto."""

from __future__ import annotations

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes


def _ecb(key: bytes, block: bytes, *, sm4: bool) -> bytes:
    if sm4:
        algo: algorithms.SM4 | TripleDES = algorithms.SM4(key)
    elif len(key) == 8:
        algo = TripleDES(key + key + key)
    else:
        algo = TripleDES(key + key[:8])
    enc = Cipher(algo, modes.ECB()).encryptor()
    return enc.update(block) + enc.finalize()


def des3(key16: bytes, block8: bytes) -> bytes:
    return _ecb(key16, block8, sm4=False)


def sm4(key16: bytes, block16: bytes) -> bytes:
    return _ecb(key16, block16, sm4=True)


def not_(data: bytes) -> bytes:
    return bytes(0xFF - b for b in data)


def diversify(alg: str, key: bytes, data8: bytes) -> bytes:
    if alg == "sm4":
        return sm4(key, data8 + not_(data8))
    return des3(key, data8) + des3(key, not_(data8))


def card_key(alg: str, master: bytes, issuer: bytes, serial8: bytes) -> bytes:
    return diversify(alg, diversify(alg, master, issuer), serial8)


def session(alg: str, key: bytes, data8: bytes) -> bytes:
    if alg == "sm4":
        return sm4(key, data8 + bytes.fromhex("8000000000000000"))
    return des3(key, data8)


def mac(alg: str, key: bytes, data: bytes) -> bytes:
    size = 16 if alg == "sm4" else 8
    padded = data + b"\x80"
    while len(padded) % size:
        padded += b"\x00"
    chain = bytes(size)
    for i in range(0, len(padded), size):
        block = bytes(a ^ b for a, b in zip(chain, padded[i : i + size], strict=True))
        chain = _ecb(key, block, sm4=alg == "sm4")
    return chain[:4]


def tac_key(alg: str, dtk: bytes) -> bytes:
    return dtk if alg == "sm4" else bytes(a ^ b for a, b in zip(dtk[:8], dtk[8:], strict=True))
