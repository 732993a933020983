"""AES-256-GCM `enc:v1:` values: round trips, the documented vectors, and every way to break one."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from integrations_service.crypto import EncryptionKey, InvalidCiphertext, InvalidKey, ValueCipher

FORMAT_DOC = Path(__file__).resolve().parents[2] / "docs" / "encryption-format.md"
VECTOR_KEY_HEX = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
VECTOR_KEY_B64 = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="

CIPHER = ValueCipher(EncryptionKey.generate())


def documented_vectors() -> list[tuple[str, str, str]]:
    text = FORMAT_DOC.read_text()
    table = text.split("<!-- test-vectors:v1 -->")[1].split("<!-- /test-vectors:v1 -->")[0]
    rows = re.findall(r"^\| `(.*)` \| `([0-9a-f]{24})` \| `(enc:v1:[^`]+)` \|$", table, re.MULTILINE)
    return [(json.loads(plain), nonce, stored) for plain, nonce, stored in rows]


def test_the_doc_has_vectors() -> None:
    assert len(documented_vectors()) == 3


@pytest.mark.parametrize(("plaintext", "nonce_hex", "stored"), documented_vectors())
@pytest.mark.parametrize("key_text", [VECTOR_KEY_HEX, VECTOR_KEY_B64])
def test_documented_vectors_both_ways(key_text: str, plaintext: str, nonce_hex: str, stored: str) -> None:
    cipher = ValueCipher(EncryptionKey.from_text(key_text))
    assert cipher.encrypt_with_nonce(plaintext, bytes.fromhex(nonce_hex)) == stored
    assert cipher.decrypt(stored) == plaintext


@given(st.text(max_size=4096))
def test_round_trip_any_unicode(plaintext: str) -> None:
    stored = CIPHER.encrypt(plaintext)
    assert stored.startswith("enc:v1:")
    assert CIPHER.decrypt(stored) == plaintext


def test_two_encryptions_differ() -> None:
    assert CIPHER.encrypt("sk_test_same") != CIPHER.encrypt("sk_test_same")


def test_wrong_key_is_rejected() -> None:
    stored = CIPHER.encrypt("sk_live_secret_value")
    with pytest.raises(InvalidCiphertext, match="wrong key or tampered"):
        ValueCipher(EncryptionKey.generate()).decrypt(stored)


def test_every_single_bit_flip_is_rejected() -> None:
    stored = CIPHER.encrypt("whsec_0123456789")
    blob = base64.b64decode(stored.removeprefix("enc:v1:"))
    for bit in range(len(blob) * 8):
        flipped = bytearray(blob)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(InvalidCiphertext):
            CIPHER.decrypt("enc:v1:" + base64.b64encode(bytes(flipped)).decode())


@pytest.mark.parametrize("cut", [1, 16, 27])
def test_truncation_is_rejected(cut: int) -> None:
    blob = base64.b64decode(CIPHER.encrypt("sk_test_abcdef").removeprefix("enc:v1:"))
    with pytest.raises(InvalidCiphertext):
        CIPHER.decrypt("enc:v1:" + base64.b64encode(blob[:-cut]).decode())


@pytest.mark.parametrize(
    ("stored", "says"),
    [
        ("enc:v1:not base64!", "base64"),
        ("enc:v1:AAAA", "too short"),
        ("enc:v1:", "too short"),
        ("enc:v9:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "unknown encrypted value format"),
        ("enc:", "unknown encrypted value format"),
    ],
)
def test_malformed_values_are_rejected(stored: str, says: str) -> None:
    with pytest.raises(InvalidCiphertext, match=says):
        CIPHER.decrypt(stored)


@pytest.mark.parametrize("legacy", ["sk_test_plain_from_the_dashboard", "", "https://api.easypay.pt", "enc-v1"])
def test_plaintext_without_prefix_reads_as_is(legacy: str) -> None:
    assert CIPHER.decrypt(legacy) == legacy


@pytest.mark.parametrize(
    "text",
    [
        "",
        "abc",
        "0" * 63,
        "0" * 66,
        "g" * 64,
        base64.b64encode(b"x" * 31).decode(),
        base64.b64encode(b"x" * 33).decode(),
        "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8",  # padding missing
    ],
)
def test_bad_key_material_is_refused(text: str) -> None:
    with pytest.raises(InvalidKey, match="32 bytes"):
        EncryptionKey.from_text(text)


def test_key_parsing_accepts_hex_and_both_base64_alphabets() -> None:
    raw = bytes(range(250, 256)) + bytes(26)
    urlsafe = base64.urlsafe_b64encode(raw).decode()
    standard = base64.b64encode(raw).decode()
    assert "-" in urlsafe or "_" in urlsafe
    for text in (raw.hex(), raw.hex().upper(), standard, urlsafe, f"  {standard}\n"):
        assert EncryptionKey.from_text(text).to_text() == standard


def test_key_never_shows_in_repr_or_errors() -> None:
    key = EncryptionKey.from_text(VECTOR_KEY_B64)
    assert VECTOR_KEY_B64 not in repr(key)
    assert VECTOR_KEY_B64 not in str(key)
    with pytest.raises(InvalidKey) as caught:
        EncryptionKey.from_text(VECTOR_KEY_HEX[:-2])
    assert VECTOR_KEY_HEX[:20] not in str(caught.value)
