"""AES-256-GCM encryption of single values in the dashboard's `enc:v1:` format.

`enc:v1:` + base64(nonce[12] || ciphertext || tag[16]), standard alphabet with
padding, a fresh random 96-bit nonce per value, no associated data. Values
without an `enc:` prefix are legacy plaintext and read as they are. The
format, with test vectors, is written down in docs/encryption-format.md.

The API follows pyca/cryptography: a key type that cannot be built from bad
material, one cipher object per key (built once, reused on every call), and
typed errors whose messages never carry key or value bytes.
"""

from __future__ import annotations

import base64
import binascii
import os
import re

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
V1_PREFIX = "enc:v1:"
ENCRYPTED_MARKER = "enc:"
_HEX_KEY = re.compile(r"[0-9a-fA-F]{64}")


class InvalidKey(ValueError):
    """The key material is not 32 bytes given as base64 or 64 hex characters."""


class InvalidCiphertext(Exception):
    """A stored value is malformed, tampered with, or under another key."""


class EncryptionKey:
    """A 256-bit AES key. Its repr and str never show the key bytes."""

    __slots__ = ("_material",)

    def __init__(self, material: bytes) -> None:
        if len(material) != KEY_BYTES:
            raise InvalidKey(f"an encryption key must be {KEY_BYTES} bytes, got {len(material)}")
        self._material = bytes(material)

    @classmethod
    def generate(cls) -> EncryptionKey:
        return cls(os.urandom(KEY_BYTES))

    @classmethod
    def from_text(cls, text: str) -> EncryptionKey:
        """Parse 64 hex characters or base64 (standard or URL-safe) of 32 bytes."""
        text = text.strip()
        if _HEX_KEY.fullmatch(text):
            return cls(bytes.fromhex(text))
        try:
            material = base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)
        except (binascii.Error, ValueError):
            raise InvalidKey(
                "an encryption key must be 32 bytes given as base64 or as 64 hex characters"
            ) from None
        return cls(material)

    def to_text(self) -> str:
        """The key as standard base64, the form `gen-key` prints."""
        return base64.b64encode(self._material).decode("ascii")

    def __repr__(self) -> str:
        return "EncryptionKey(<redacted>)"

    __str__ = __repr__


class ValueCipher:
    """Encrypts and decrypts single values under one key.

    Build it once at start-up: the AES key schedule is set up here, not per call.
    """

    __slots__ = ("_aead",)

    def __init__(self, key: EncryptionKey) -> None:
        self._aead = AESGCM(key._material)

    def encrypt(self, plaintext: str) -> str:
        """Encrypt under a fresh random nonce; two calls never give the same text."""
        return self.encrypt_with_nonce(plaintext, os.urandom(NONCE_BYTES))

    def encrypt_with_nonce(self, plaintext: str, nonce: bytes) -> str:
        """Encrypt with a given nonce. Only for test vectors: a reused nonce breaks GCM."""
        if len(nonce) != NONCE_BYTES:
            raise ValueError(f"a nonce must be {NONCE_BYTES} bytes")
        sealed = self._aead.encrypt(nonce, plaintext.encode("utf-8"), None)
        return V1_PREFIX + base64.b64encode(nonce + sealed).decode("ascii")

    def decrypt(self, stored: str) -> str:
        """Return the clear text of a stored value; legacy plaintext passes through."""
        if not stored.startswith(ENCRYPTED_MARKER):
            return stored
        if not stored.startswith(V1_PREFIX):
            raise InvalidCiphertext("unknown encrypted value format version")
        blob = _decode_blob(stored[len(V1_PREFIX) :])
        try:
            clear = self._aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], None)
        except InvalidTag:
            raise InvalidCiphertext("authentication failed: wrong key or tampered value") from None
        try:
            return clear.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidCiphertext("decrypted value is not UTF-8") from None

    @staticmethod
    def is_encrypted(stored: str) -> bool:
        return stored.startswith(ENCRYPTED_MARKER)


def _decode_blob(encoded: str) -> bytes:
    try:
        blob = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidCiphertext("encrypted value is not valid base64") from None
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise InvalidCiphertext("encrypted value is too short")
    return blob
