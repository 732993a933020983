"""AES-256-GCM encryption of single credential values: the `enc:` formats.

- `enc:v2:<key id>:` + base64(nonce[12] || ciphertext || tag[16]): written by
  this service. The AES key is a subkey derived by HKDF-SHA256 from the master
  key, and the associated data binds the value to its key id, organization,
  provider and field, so a value copied into another row, provider or field
  fails to decrypt.
- `enc:v1:` + base64(nonce || ciphertext || tag): the dashboard's format,
  AES-256-GCM under the master key itself, no associated data; read with the
  key whose id is `default`, never written any more.
- no `enc:` prefix: legacy plaintext, read as it is.

docs/encryption-format.md has the details and test vectors. The API follows
pyca/cryptography: keys that cannot be built from bad material, ciphers set
up once per key (never per call), and typed errors whose messages never carry
key or value bytes.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from integrations_service.crypto.keyring import DEFAULT_KEY_ID, KEY_ID_PATTERN, EncryptionKey, Keyring

NONCE_BYTES = 12
TAG_BYTES = 16
ENCRYPTED_MARKER = "enc:"
V1_PREFIX = "enc:v1:"
V2_PREFIX = "enc:v2:"
# NIST SP 800-38D caps random 96-bit nonces at 2**32 encryptions per key.
NONCE_LIMIT = 2**32
_HKDF_INFO_VALUES = b"integrations-credential-service/value-encryption/v2"
_HKDF_INFO_CHECK = b"integrations-credential-service/key-check/v1"
_HKDF_INFO_FINGERPRINT = b"integrations-credential-service/audit-fingerprint/v1"
_AAD_LABEL = b"integrations/v2"
# Associated data kept for this many (key id, organization, provider, field) contexts. It is made of
# identifiers only, nothing secret, and building it costs more than the AES-GCM call it feeds.
AAD_CACHE_SIZE = 4096


class InvalidCiphertext(Exception):
    """A stored value is malformed, tampered with, moved, or under another key."""


class UnknownKeyId(InvalidCiphertext):
    """A stored value names a key id that is not in the keyring."""

    def __init__(self, key_id: str) -> None:
        super().__init__(f"encrypted under key id {key_id!r}, which is not configured")
        self.key_id = key_id


@dataclass(frozen=True)
class ValueContext:
    """Where a value belongs; bound into its ciphertext as associated data."""

    organization_id: str
    provider: str
    field: str


def derive_subkey(key: EncryptionKey, info: bytes) -> bytes:
    return HKDF(algorithm=SHA256(), length=32, salt=None, info=info).derive(key.material)


def associated_data(key_id: str, context: ValueContext) -> bytes:
    """Length-prefixed parts, so no two different contexts encode alike."""
    return _associated_data(key_id, context.organization_id, context.provider, context.field)


@functools.lru_cache(maxsize=AAD_CACHE_SIZE)
def _associated_data(key_id: str, organization_id: str, provider: str, field: str) -> bytes:
    encoded = [part.encode("utf-8") for part in (key_id, organization_id, provider, field)]
    return _AAD_LABEL + b"".join(struct.pack(">I", len(e)) + e for e in encoded)


def key_id_of(stored: str) -> str | None:
    """The key id a stored value needs: None for plaintext, `default` for v1."""
    if not stored.startswith(ENCRYPTED_MARKER):
        return None
    if stored.startswith(V1_PREFIX):
        return DEFAULT_KEY_ID
    if stored.startswith(V2_PREFIX):
        key_id, sep, _ = stored[len(V2_PREFIX) :].partition(":")
        if sep and KEY_ID_PATTERN.fullmatch(key_id):
            return key_id
    raise InvalidCiphertext("unknown encrypted value format version")


LEGACY_PLAINTEXT = "plaintext"
LEGACY_V1 = "v1"
# Every value `legacy_format` returns (the `format` label of the legacy-value metrics).
LEGACY_FORMATS = (LEGACY_PLAINTEXT, LEGACY_V1)


def legacy_format(stored: str) -> str | None:
    """`plaintext` or `v1` for the formats that bind a value to nothing; None for enc:v2 (and unknown formats).

    An empty string (the dashboard's unset field) holds nothing to plant or move: None too.
    """
    if not stored:
        return None
    if not stored.startswith(ENCRYPTED_MARKER):
        return LEGACY_PLAINTEXT
    if stored.startswith(V1_PREFIX):
        return LEGACY_V1
    return None


def is_encrypted(stored: str) -> bool:
    """False for legacy plaintext."""
    return stored.startswith(ENCRYPTED_MARKER)


def seal_v1(key: EncryptionKey, plaintext: str, nonce: bytes) -> str:
    """The dashboard's format. Only for test vectors and tests: the service writes v2."""
    sealed = AESGCM(key.material).encrypt(_checked_nonce(nonce), plaintext.encode("utf-8"), None)
    return V1_PREFIX + base64.b64encode(nonce + sealed).decode("ascii")


class EncryptionMonitor(Protocol):
    """Told of every encryption, by key id (as Tink's monitoring client is): the nonce budget is counted outside.

    Called before the nonce is used, so it may refuse the encryption by raising (a spent nonce budget).
    """

    def encrypted(self, key_id: str) -> None: ...


class _Unmonitored:
    def encrypted(self, key_id: str) -> None:
        pass


class _KeyMaterial:
    """Everything derived from one master key, computed once."""

    __slots__ = ("check_value", "fingerprint_key", "v1", "v2")

    def __init__(self, key: EncryptionKey) -> None:
        self.v1 = AESGCM(key.material)
        self.v2 = AESGCM(derive_subkey(key, _HKDF_INFO_VALUES))
        check_key = derive_subkey(key, _HKDF_INFO_CHECK)
        self.check_value = hmac.new(check_key, b"integrations key check", hashlib.sha256).hexdigest()
        self.fingerprint_key = derive_subkey(key, _HKDF_INFO_FINGERPRINT)


class ValueCipher:
    """Encrypts under the keyring's active key; decrypts under any of its keys.

    Build it once at start-up: key derivation and AES key schedules happen here.
    """

    def __init__(self, keyring: Keyring, monitor: EncryptionMonitor | None = None) -> None:
        self._keyring = keyring
        self._keys = {key_id: _KeyMaterial(key) for key_id, key in keyring}
        self._active = self._keys[keyring.active_id]
        self._monitor = monitor or _Unmonitored()

    @property
    def active_key_id(self) -> str:
        return self._keyring.active_id

    @property
    def key_ids(self) -> tuple[str, ...]:
        return self._keyring.ids

    def check_values(self) -> Mapping[str, str]:
        """Per key id, a value that proves which key it is without revealing it."""
        return {key_id: material.check_value for key_id, material in self._keys.items()}

    def encrypt(self, plaintext: str, context: ValueContext) -> str:
        """enc:v2 under the active key and a fresh random nonce."""
        return self._encrypt_with_nonce(plaintext, context, os.urandom(NONCE_BYTES))

    def _encrypt_with_nonce(self, plaintext: str, context: ValueContext, nonce: bytes) -> str:
        """Encrypt with a given nonce. Private, for the documented test vectors only: a reused nonce breaks GCM."""
        key_id = self._keyring.active_id
        aad = associated_data(key_id, context)
        data = plaintext.encode("utf-8")
        self._monitor.encrypted(key_id)  # counted first: it may refuse, and a nonce it allowed is used
        sealed = self._active.v2.encrypt(_checked_nonce(nonce), data, aad)
        return f"{V2_PREFIX}{key_id}:" + base64.b64encode(nonce + sealed).decode("ascii")

    def decrypt(self, stored: str, context: ValueContext) -> str:
        """The clear text of a stored value; legacy plaintext passes through."""
        # What nearly every read meets, parsed once: enc:v2 under a configured key (so a well-formed key id).
        if stored.startswith(V2_PREFIX):
            key_id, sep, body = stored[len(V2_PREFIX) :].partition(":")
            material = self._keys.get(key_id) if sep else None
            if material is not None:
                return _open(material.v2, body, _associated_data_to_open(key_id, context))
        return self._decrypt_other(stored, context)

    def _decrypt_other(self, stored: str, context: ValueContext) -> str:
        """Plaintext, enc:v1, and the values that fail: malformed, or under a key id not configured."""
        key_id = key_id_of(stored)
        if key_id is None:
            return stored
        material = self._keys.get(key_id)
        if material is None:
            raise UnknownKeyId(key_id)
        if stored.startswith(V1_PREFIX):
            return _open(material.v1, stored[len(V1_PREFIX) :], None)
        body = stored[len(V2_PREFIX) + len(key_id) + 1 :]
        return _open(material.v2, body, _associated_data_to_open(key_id, context))

    def is_current(self, stored: str) -> bool:
        """True when the value is enc:v2 under the active key: rotation leaves it alone."""
        return stored.startswith(f"{V2_PREFIX}{self._keyring.active_id}:")

    def fingerprint(self, plaintext: str) -> str:
        """A keyed HMAC of a value, to correlate values in audit records without storing them."""
        digest = hmac.new(self._active.fingerprint_key, plaintext.encode("utf-8"), hashlib.sha256)
        return digest.hexdigest()[:32]


def _associated_data_to_open(key_id: str, context: ValueContext) -> bytes:
    try:
        return associated_data(key_id, context)
    except UnicodeEncodeError:
        # A lone surrogate in a field name or row id (SQLite's JSON text can hold one): no value was sealed for it.
        raise InvalidCiphertext("the value's organization, provider or field is not valid Unicode text") from None


def _checked_nonce(nonce: bytes) -> bytes:
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"a nonce must be {NONCE_BYTES} bytes")
    return nonce


def _open(aead: AESGCM, encoded: str, aad: bytes | None) -> str:
    try:
        blob = binascii.a2b_base64(encoded, strict_mode=True)  # base64.b64decode(validate=True), one call less
    except (binascii.Error, ValueError):
        raise InvalidCiphertext("encrypted value is not valid base64") from None
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise InvalidCiphertext("encrypted value is too short")
    try:
        clear = aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except InvalidTag:
        raise InvalidCiphertext("authentication failed: wrong key, tampered value, or value moved") from None
    try:
        return clear.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidCiphertext("decrypted value is not UTF-8") from None
