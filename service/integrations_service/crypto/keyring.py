"""Encryption keys and the keyring: which keys exist, which one encrypts.

Keyring text, the same in a key file and in env: `id:key` entries separated by
commas or newlines, the first one active; `#` starts a comment line. A single
bare key (the dashboard's INTEGRATION_ENCRYPTION_KEY) gets the id `default`,
which is also the key `enc:v1:` values are read with. Key material is 32
bytes as base64 or 64 hex characters.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import re
from collections.abc import Iterator, Sequence

KEY_BYTES = 32
DEFAULT_KEY_ID = "default"
KEY_ID_PATTERN = re.compile(r"[a-z0-9_-]{1,32}")
_HEX_KEY = re.compile(r"[0-9a-fA-F]{64}")
# Keys printed in this project's documentation (test vectors, examples): known to anyone who reads it.
_PUBLISHED_KEYS = frozenset(
    {
        bytes(range(32)),  # docs/encryption-format.md test vectors
        bytes.fromhex("deadbeef") + bytes(28),  # docs/security.md's example keyring
    }
)
# 32 random bytes take fewer than 8 distinct values with a probability far below 2**-100.
_MIN_DISTINCT_BYTES = 8


class InvalidKey(ValueError):
    """Key material or keyring text is malformed. Never carries key bytes."""


class EncryptionKey:
    """A 256-bit master key. Its repr and str never show the key bytes."""

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
            raise InvalidKey("an encryption key must be 32 bytes given as base64 or as 64 hex characters") from None
        return cls(material)

    @property
    def material(self) -> bytes:
        return self._material

    def weakness(self) -> str | None:
        """Why this key is known or guessable (all zero, a repeated pattern, from the docs), or None.

        A key from `generate` (or any 32 random bytes) is never weak; the reason never shows key bytes.
        """
        if self._material in _PUBLISHED_KEYS:
            return "it is a key published in this project's documentation (a test vector or an example)"
        if len(set(self._material)) < _MIN_DISTINCT_BYTES:
            return "it is not random (all zero, or a few byte values repeated)"
        return None

    def to_text(self) -> str:
        """The key as standard base64, the form `gen-key` prints."""
        return base64.b64encode(self._material).decode("ascii")

    def __repr__(self) -> str:
        return "EncryptionKey(<redacted>)"

    __str__ = __repr__


class Keyring:
    """Named keys; the first is active (encrypts), all of them decrypt."""

    __slots__ = ("_keys", "active_id")

    def __init__(self, keys: Sequence[tuple[str, EncryptionKey]]) -> None:
        if not keys:
            raise InvalidKey("a keyring needs at least one key")
        ids = [key_id for key_id, _ in keys]
        for key_id in ids:
            if not KEY_ID_PATTERN.fullmatch(key_id):
                # Not echoed: a malformed id may well be key material pasted in the wrong place.
                raise InvalidKey("key ids must be 1-32 characters of a-z, 0-9, '_' or '-'")
        if len(set(ids)) != len(ids):
            raise InvalidKey("key ids must be unique")
        for n, (first_id, first) in enumerate(keys):
            for second_id, second in keys[n + 1 :]:
                if hmac.compare_digest(first.material, second.material):
                    # One key under two ids would get two nonce budgets, and a "rotation" to it would change nothing.
                    raise InvalidKey(f"keys {first_id!r} and {second_id!r} are the same key: give each key one id")
        self._keys = dict(keys)
        self.active_id = ids[0]

    @classmethod
    def single(cls, key: EncryptionKey) -> Keyring:
        return cls([(DEFAULT_KEY_ID, key)])

    @classmethod
    def parse(cls, text: str) -> Keyring:
        entries = [
            e.strip()
            for line in text.splitlines()
            if not line.lstrip().startswith("#")
            for e in line.split(",")
            if e.strip()
        ]
        if len(entries) == 1 and ":" not in entries[0]:
            return cls.single(EncryptionKey.from_text(entries[0]))
        keys = []
        for position, entry in enumerate(entries, start=1):
            key_id, sep, material = entry.partition(":")
            if not sep:
                raise InvalidKey(f"keyring entry {position} must be id:key (only a lone key may omit its id)")
            try:
                keys.append((key_id.strip(), EncryptionKey.from_text(material)))
            except InvalidKey as error:
                label = repr(key_id.strip()) if KEY_ID_PATTERN.fullmatch(key_id.strip()) else "an invalid key id"
                raise InvalidKey(f"keyring entry {position} ({label}): {error}") from None
        return cls(keys)

    def weak_keys(self) -> dict[str, str]:
        """Per key id, why the key is weak (see `EncryptionKey.weakness`): the keys production refuses."""
        return {key_id: why for key_id, key in self._keys.items() if (why := key.weakness()) is not None}

    def get(self, key_id: str) -> EncryptionKey | None:
        return self._keys.get(key_id)

    @property
    def active(self) -> EncryptionKey:
        return self._keys[self.active_id]

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def __iter__(self) -> Iterator[tuple[str, EncryptionKey]]:
        return iter(self._keys.items())

    def __repr__(self) -> str:
        return f"Keyring(ids={list(self._keys)}, active={self.active_id!r})"
