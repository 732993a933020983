"""Authenticated encryption of single credential values (the `enc:` formats) and the keyring."""

from integrations_service.crypto.aead import (
    LEGACY_FORMATS,
    LEGACY_PLAINTEXT,
    LEGACY_V1,
    NONCE_LIMIT,
    EncryptionMonitor,
    InvalidCiphertext,
    UnknownKeyId,
    ValueCipher,
    ValueContext,
    is_encrypted,
    key_id_of,
    legacy_format,
    seal_v1,
)
from integrations_service.crypto.keyring import DEFAULT_KEY_ID, EncryptionKey, InvalidKey, Keyring

__all__ = [
    "DEFAULT_KEY_ID",
    "LEGACY_FORMATS",
    "LEGACY_PLAINTEXT",
    "LEGACY_V1",
    "NONCE_LIMIT",
    "EncryptionKey",
    "EncryptionMonitor",
    "InvalidCiphertext",
    "InvalidKey",
    "Keyring",
    "UnknownKeyId",
    "ValueCipher",
    "ValueContext",
    "is_encrypted",
    "key_id_of",
    "legacy_format",
    "seal_v1",
]
