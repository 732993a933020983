"""Authenticated encryption of single credential values (the `enc:` formats)."""

from integrations_service.crypto.aead import (
    EncryptionKey,
    InvalidCiphertext,
    InvalidKey,
    ValueCipher,
)

__all__ = ["EncryptionKey", "InvalidCiphertext", "InvalidKey", "ValueCipher"]
