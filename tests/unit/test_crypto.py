"""The `enc:` value formats: round trips, the documented vectors, and every way to break a value."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from integrations_service.crypto import (
    EncryptionKey,
    InvalidCiphertext,
    InvalidKey,
    Keyring,
    UnknownKeyId,
    ValueCipher,
    ValueContext,
    key_id_of,
    legacy_format,
    seal_v1,
)
from integrations_service.crypto.aead import AAD_CACHE_SIZE, _associated_data, associated_data

FORMAT_DOC = Path(__file__).resolve().parents[2] / "docs" / "encryption-format.md"
VECTOR_KEY_HEX = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
VECTOR_KEY_B64 = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
SECOND_KEY_B64 = base64.b64encode(bytes(range(32, 64))).decode()  # a keyring's keys must differ
CONTEXT = ValueContext("org_1", "stripe", "secretKey")

KEY_A, KEY_B = EncryptionKey.generate(), EncryptionKey.generate()
CIPHER = ValueCipher(Keyring([("a", KEY_A), ("b", KEY_B)]))


def _table(version: str) -> str:
    text = FORMAT_DOC.read_text()
    return text.split(f"<!-- test-vectors:{version} -->")[1].split(f"<!-- /test-vectors:{version} -->")[0]


def v1_vectors() -> list[tuple[str, str, str]]:
    rows = re.findall(r"^\| `(.*)` \| `([0-9a-f]{24})` \| `(enc:v1:[^`]+)` \|$", _table("v1"), re.MULTILINE)
    return [(json.loads(plain), nonce, stored) for plain, nonce, stored in rows]


def v2_vectors() -> list[tuple[str, ValueContext, str, str, str]]:
    pattern = r"^\| `(.*)` \| `(\[.*\])` \| `([0-9a-f]{24})` \| `([0-9a-f]+)` \| `(enc:v2:[^`]+)` \|$"
    rows = re.findall(pattern, _table("v2"), re.MULTILINE)
    return [(json.loads(p), ValueContext(*json.loads(c)), n, aad, s) for p, c, n, aad, s in rows]


def test_the_doc_has_vectors() -> None:
    assert len(v1_vectors()) == 3
    assert len(v2_vectors()) == 2


@pytest.mark.parametrize(("plaintext", "nonce_hex", "stored"), v1_vectors())
@pytest.mark.parametrize("key_text", [VECTOR_KEY_HEX, VECTOR_KEY_B64])
def test_v1_vectors_both_ways(key_text: str, plaintext: str, nonce_hex: str, stored: str) -> None:
    key = EncryptionKey.from_text(key_text)
    assert seal_v1(key, plaintext, bytes.fromhex(nonce_hex)) == stored
    assert ValueCipher(Keyring.single(key)).decrypt(stored, CONTEXT) == plaintext


@pytest.mark.parametrize(("plaintext", "context", "nonce_hex", "aad_hex", "stored"), v2_vectors())
def test_v2_vectors_both_ways(plaintext: str, context: ValueContext, nonce_hex: str, aad_hex: str, stored: str) -> None:
    cipher = ValueCipher(Keyring.parse(f"k2026:{VECTOR_KEY_HEX}"))
    assert associated_data("k2026", context).hex() == aad_hex
    assert cipher._encrypt_with_nonce(plaintext, context, bytes.fromhex(nonce_hex)) == stored
    assert cipher.decrypt(stored, context) == plaintext


def test_documented_key_check_value() -> None:
    cipher = ValueCipher(Keyring.parse(f"k2026:{VECTOR_KEY_HEX}"))
    assert cipher.check_values()["k2026"] in FORMAT_DOC.read_text()


@given(st.text(max_size=4096))
def test_v2_round_trip_any_unicode(plaintext: str) -> None:
    stored = CIPHER.encrypt(plaintext, CONTEXT)
    assert stored.startswith("enc:v2:a:")
    assert CIPHER.decrypt(stored, CONTEXT) == plaintext


class Encryptions:
    def __init__(self) -> None:
        self.key_ids: list[str] = []

    def encrypted(self, key_id: str) -> None:
        self.key_ids.append(key_id)


def test_two_encryptions_differ_and_each_is_told_to_the_monitor_by_key() -> None:
    monitor = Encryptions()
    cipher = ValueCipher(Keyring([("a", KEY_A), ("b", KEY_B)]), monitor=monitor)
    assert cipher.encrypt("sk_test_same", CONTEXT) != cipher.encrypt("sk_test_same", CONTEXT)
    cipher.decrypt(cipher.encrypt("x", CONTEXT), CONTEXT)
    assert monitor.key_ids == ["a", "a", "a"]  # decryptions are not counted


@pytest.mark.parametrize(
    "moved_to",
    [
        ValueContext("org_2", "stripe", "secretKey"),
        ValueContext("org_1", "easypay", "secretKey"),
        ValueContext("org_1", "stripe", "webhookSecret"),
        ValueContext("org_1s", "tripe", "secretKey"),  # same concatenation, different parts
    ],
)
def test_a_value_moved_to_another_organization_provider_or_field_is_rejected(moved_to: ValueContext) -> None:
    stored = CIPHER.encrypt("sk_live_moving_value", CONTEXT)
    with pytest.raises(InvalidCiphertext, match="moved"):
        CIPHER.decrypt(stored, moved_to)


def test_cached_associated_data_still_binds_each_value_to_its_own_context() -> None:
    here = CIPHER.encrypt("sk_live_here", CONTEXT)
    there_context = ValueContext("org_2", "stripe", "secretKey")
    there = CIPHER.encrypt("sk_live_there", there_context)
    for _ in range(2):  # the second round reads with the associated data of both contexts cached
        assert CIPHER.decrypt(here, CONTEXT) == "sk_live_here"
        assert CIPHER.decrypt(there, there_context) == "sk_live_there"
        with pytest.raises(InvalidCiphertext, match="moved"):
            CIPHER.decrypt(here, there_context)


def test_the_associated_data_cache_is_bounded() -> None:
    for n in range(AAD_CACHE_SIZE + 10):
        associated_data("a", ValueContext(f"org_{n}", "stripe", "secretKey"))
    assert _associated_data.cache_info().currsize == AAD_CACHE_SIZE


def test_every_single_bit_flip_is_rejected() -> None:
    stored = CIPHER.encrypt("whsec_0123456789", CONTEXT)
    blob = base64.b64decode(stored.removeprefix("enc:v2:a:"))
    for bit in range(len(blob) * 8):
        flipped = bytearray(blob)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(InvalidCiphertext):
            CIPHER.decrypt("enc:v2:a:" + base64.b64encode(bytes(flipped)).decode(), CONTEXT)


@pytest.mark.parametrize("cut", [1, 16, 27, 40])
def test_truncation_is_rejected(cut: int) -> None:
    stored = CIPHER.encrypt("sk_test_abcdef", CONTEXT)
    with pytest.raises(InvalidCiphertext):
        CIPHER.decrypt(stored[:-cut], CONTEXT)


def test_a_value_relabelled_with_another_key_id_is_rejected() -> None:
    stored = CIPHER.encrypt("sk_test_abcdef", CONTEXT)
    with pytest.raises(InvalidCiphertext):
        CIPHER.decrypt(stored.replace("enc:v2:a:", "enc:v2:b:"), CONTEXT)


@pytest.mark.parametrize(
    ("stored", "error", "says"),
    [
        ("enc:v2:a:not base64!", InvalidCiphertext, "base64"),
        ("enc:v2:a:AAAA", InvalidCiphertext, "too short"),
        ("enc:v1:not base64!", UnknownKeyId, "'default'"),  # no key with the v1 id in this keyring
        ("enc:v9:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", InvalidCiphertext, "unknown encrypted value format"),
        ("enc:v2:AAAA", InvalidCiphertext, "unknown encrypted value format"),
        ("enc:v2:Bad-Id:AAAA", InvalidCiphertext, "unknown encrypted value format"),
        ("enc:", InvalidCiphertext, "unknown encrypted value format"),
        ("enc:v2:zz:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", UnknownKeyId, "key id 'zz'"),
    ],
)
def test_malformed_values_are_rejected(stored: str, error: type[Exception], says: str) -> None:
    with pytest.raises(error, match=says):
        CIPHER.decrypt(stored, CONTEXT)


def test_v1_values_decrypt_with_the_default_key_beside_newer_keys() -> None:
    legacy_key = EncryptionKey.generate()
    stored = seal_v1(legacy_key, "sk_test_from_the_dashboard", b"\x01" * 12)
    cipher = ValueCipher(Keyring([("k2", KEY_A), ("default", legacy_key)]))
    assert cipher.decrypt(stored, CONTEXT) == "sk_test_from_the_dashboard"
    assert not cipher.is_current(stored)
    with pytest.raises(InvalidCiphertext, match="wrong key"):
        ValueCipher(Keyring([("default", KEY_B)])).decrypt(stored, CONTEXT)


def test_wrong_key_under_the_right_id_is_rejected() -> None:
    stored = CIPHER.encrypt("sk_live_secret_value", CONTEXT)
    with pytest.raises(InvalidCiphertext, match="wrong key"):
        ValueCipher(Keyring([("a", KEY_B)])).decrypt(stored, CONTEXT)


@pytest.mark.parametrize("legacy", ["sk_test_plain_from_the_dashboard", "", "https://api.easypay.pt", "enc-v1"])
def test_plaintext_without_prefix_reads_as_is(legacy: str) -> None:
    assert CIPHER.decrypt(legacy, CONTEXT) == legacy
    assert key_id_of(legacy) is None


def test_key_ids_of_stored_values_and_currency() -> None:
    older = ValueCipher(Keyring([("b", KEY_B), ("a", KEY_A)]))
    under_b = older.encrypt("x", CONTEXT)
    assert key_id_of(under_b) == "b"
    assert key_id_of(seal_v1(KEY_A, "x", bytes(12))) == "default"
    assert CIPHER.is_current(CIPHER.encrypt("x", CONTEXT))
    assert not CIPHER.is_current(under_b)
    assert CIPHER.decrypt(under_b, CONTEXT) == "x"  # decrypt-only keys still read


def test_fingerprints_correlate_without_revealing() -> None:
    assert CIPHER.fingerprint("sk_live_x") == CIPHER.fingerprint("sk_live_x")
    assert CIPHER.fingerprint("sk_live_x") != CIPHER.fingerprint("sk_live_y")
    assert CIPHER.fingerprint("sk_live_x") != ValueCipher(Keyring([("a", KEY_B)])).fingerprint("sk_live_x")


# --- keys and keyrings ---------------------------------------------------------------------------------


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


@pytest.mark.parametrize(
    ("text", "ids", "active"),
    [
        (VECTOR_KEY_B64, ["default"], "default"),
        (f"k2:{VECTOR_KEY_HEX},k1:{SECOND_KEY_B64}", ["k2", "k1"], "k2"),
        (f"# rotated 2026-11\nk2:{VECTOR_KEY_HEX}\n\nk1:{SECOND_KEY_B64}\n", ["k2", "k1"], "k2"),
        (f"new:{VECTOR_KEY_HEX}, default:{SECOND_KEY_B64}", ["new", "default"], "new"),
    ],
)
def test_keyring_text(text: str, ids: list[str], active: str) -> None:
    keyring = Keyring.parse(text)
    assert list(keyring.ids) == ids
    assert keyring.active_id == active


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "at least one key"),
        (f"{VECTOR_KEY_B64},{VECTOR_KEY_HEX}", "must be id:key"),
        (f"K1:{VECTOR_KEY_HEX}", "must be 1-32 characters"),
        (f"k1:{VECTOR_KEY_HEX},k1:{VECTOR_KEY_B64}", "unique"),
        ("k1:abc", "entry 1 ('k1')"),
        # One key under two ids: two nonce budgets for one key, and a "rotation" that changes nothing.
        (f"k2:{VECTOR_KEY_HEX},k1:{VECTOR_KEY_B64}", "'k2' and 'k1' are the same key"),
    ],
)
def test_bad_keyring_text(text: str, says: str) -> None:
    with pytest.raises(InvalidKey, match=re.escape(says)):
        Keyring.parse(text)


def test_keys_never_show_in_repr_or_errors() -> None:
    keyring = Keyring.parse(f"k1:{VECTOR_KEY_B64}")
    for shown in (repr(keyring), repr(keyring.active), str(keyring.active)):
        assert VECTOR_KEY_B64 not in shown
    with pytest.raises(InvalidKey) as caught:
        Keyring.parse(f"k1:{VECTOR_KEY_HEX[:-2]}")
    assert VECTOR_KEY_HEX[:20] not in str(caught.value)


def test_legacy_format_names_the_formats_that_bind_nothing() -> None:
    v2 = CIPHER.encrypt("sk_test_x", CONTEXT)
    v1 = seal_v1(KEY_A, "sk_test_x", bytes(12))
    assert [legacy_format(s) for s in ("sk_test_plain", " ", v1, v2, "enc:v9:x", "")] == [
        "plaintext",
        "plaintext",
        "v1",
        None,
        None,
        None,
    ]


def test_a_generated_key_is_never_weak_and_a_weak_one_says_why_without_its_bytes() -> None:
    assert all(EncryptionKey.generate().weakness() is None for _ in range(200))
    for material in (bytes(32), bytes(range(32)), b"\xab\xcd" * 16):
        why = EncryptionKey(material).weakness()
        assert why is not None
        assert material.hex() not in why
        assert EncryptionKey(material).to_text() not in why
    keyring = Keyring([("k1", EncryptionKey.generate()), ("k0", EncryptionKey(bytes(32)))])
    assert list(keyring.weak_keys()) == ["k0"]


@pytest.mark.parametrize("context", [ValueContext("org", "stripe", "\ud800"), ValueContext("org\udfff", "stripe", "f")])
def test_a_context_that_is_not_unicode_text_fails_as_an_unreadable_value(context: ValueContext) -> None:
    """SQLite's JSON text can hold a lone surrogate in a field name: such a value is unreadable, not a crash."""
    cipher = ValueCipher(Keyring([("k1", KEY_A), ("default", KEY_B)]))
    for stored in (cipher.encrypt("sk_test_x", ValueContext("org", "stripe", "f")), "enc:v2:k1:" + "A" * 40):
        with pytest.raises(InvalidCiphertext, match="not valid Unicode"):
            cipher.decrypt(stored, context)


def test_a_v2_value_rewritten_in_v1_form_or_back_is_rejected() -> None:
    """Under the `default` key both formats share a master key: the HKDF subkey keeps them apart."""
    cipher = ValueCipher(Keyring.single(KEY_A))
    context = ValueContext("org", "stripe", "secretKey")
    v2_body = cipher.encrypt("sk_live_x", context).removeprefix("enc:v2:default:")
    v1_body = seal_v1(KEY_A, "sk_live_x", bytes(range(12))).removeprefix("enc:v1:")
    for forged in (f"enc:v1:{v2_body}", f"enc:v2:default:{v1_body}"):
        with pytest.raises(InvalidCiphertext, match="authentication failed"):
            cipher.decrypt(forged, context)
