"""The barrier between clear text and the store: the only code that seals and unseals values.

Above it, the domain handles clear text; below it, the store holds
`StoredValue`s. Nothing else calls the cipher, so "the store only sees
ciphertext" holds by construction: a clear-text `str` handed to a store is a
type error, and every stored value the service writes was sealed here, bound
to its organization, provider and field.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from integrations_service.crypto import InvalidCiphertext, ValueCipher, ValueContext, is_encrypted, legacy_format
from integrations_service.errors import CorruptConfig, CorruptCredential
from integrations_service.sealing.legacy import LegacyPolicy, refusal_reason
from integrations_service.store import StoredIntegration, StoredValue, UnreadableConfig


@dataclass(frozen=True)
class Target:
    """The row values are sealed for: bound into each value with its field name."""

    organization_id: str
    provider: str

    def context(self, field: str) -> ValueContext:
        return ValueContext(self.organization_id, self.provider, field)


def target_of(row: StoredIntegration) -> Target:
    return Target(row.organization_id, row.provider)


def holds_no_clear_text(row: StoredIntegration) -> bool:
    """Whether every value of `row` is sealed (or empty): a row that may be kept in memory as it is stored.

    A legacy plaintext value (the dashboard's, until `rotate` rewrites it) is a secret as the database holds it;
    the row cache asks this, so no clear text is ever kept in the service's memory beyond the call that read it.
    """
    return all(not stored or is_encrypted(stored) for stored in row.config.values())


class Sealer:
    """Seals clear values for the store and unseals what it returns, under one legacy-value policy."""

    def __init__(self, cipher: ValueCipher, legacy: LegacyPolicy = LegacyPolicy()) -> None:  # noqa: B008 (frozen)
        self._cipher = cipher
        self._legacy = legacy

    @property
    def active_key_id(self) -> str:
        return self._cipher.active_key_id

    def seal(self, values: Mapping[str, str], target: Target) -> dict[str, StoredValue]:
        """enc:v2 of each value under the active key, bound to its target and field.

        An empty value (the dashboard's unset field) stays empty: sealed, it
        would count as stored, and the listing would call the provider
        configured while a read answers the field unset.
        """
        return {key: self._sealed(value, target.context(key)) for key, value in values.items()}

    def _sealed(self, value: str, context: ValueContext) -> StoredValue:
        return StoredValue(self._cipher.encrypt(value, context)) if value else StoredValue("")

    def unseal(self, row: StoredIntegration, fields: Collection[str]) -> dict[str, str]:
        """Clear text of the row's values in `fields` (the others are not decrypted).

        Raises CorruptConfig for a config that is not a JSON object, and
        CorruptCredential naming every field that cannot be read: tampered,
        moved or under an unknown key, or legacy (plaintext, enc:v1) when the
        policy refuses those, so a save that keeps such a field fails too
        instead of re-encrypting it as genuine.
        """
        if isinstance(row.config, UnreadableConfig):
            raise CorruptConfig(row.organization_id, row.provider, row.config.reason)
        organization_id, provider = row.organization_id, row.provider  # each value is bound to its own row
        clear: dict[str, str] = {}
        broken: dict[str, str] = {}
        legacy_read: list[str] = []
        for key, stored in row.config.items():
            if key not in fields:
                continue
            legacy = legacy_format(stored)
            if legacy and self._legacy.refuses:
                self._legacy.count_refused(legacy, row.provider)
                broken[key] = refusal_reason(legacy)
                continue
            try:
                clear[key] = self._cipher.decrypt(stored, ValueContext(organization_id, provider, key))
            except InvalidCiphertext as error:
                broken[key] = str(error)
                continue
            if legacy:
                legacy_read.append(legacy)
        if broken:
            names = sorted(broken)
            raise CorruptCredential(row.organization_id, row.provider, names, reason=broken[names[0]])
        for legacy in legacy_read:
            self._legacy.count_read(legacy, row.provider)
        return clear

    def merge(
        self,
        current: StoredIntegration | None,
        kept_clear: Mapping[str, str],
        values: Mapping[str, str],
        touched: Collection[str],
        target: Target,
    ) -> dict[str, StoredValue]:
        """The config a save stores: `values` sealed, the untouched fields of `current` kept.

        Untouched fields keep their stored ciphertext (nothing is re-encrypted
        needlessly), except legacy plaintext (whose clear text `kept_clear`
        holds, from `unseal`), which a write never carries back in the clear.
        """
        kept = {k: v for k, v in current.config.items() if k not in touched} if current else {}
        plaintext = {k: kept_clear[k] for k, v in kept.items() if not is_encrypted(v) and k in kept_clear}
        return kept | self.seal(plaintext | dict(values), target)

    def refused_fields(self, row: StoredIntegration, fields: Collection[str]) -> list[str]:
        """The fields among `fields` whose legacy values a read would refuse under the policy."""
        if not self._legacy.refuses:
            return []
        return [k for k, v in row.config.items() if k in fields and legacy_format(v)]

    def readable(self, row: StoredIntegration, fields: Collection[str]) -> bool:
        """False for a row that `unseal` would refuse without trying a key: unreadable config, refused legacy."""
        return not isinstance(row.config, UnreadableConfig) and not self.refused_fields(row, fields)

    def fingerprints(self, values: Mapping[str, str]) -> dict[str, str]:
        """Per field, a keyed HMAC of its clear value: audit records correlate values without holding them."""
        return {key: self._cipher.fingerprint(value) for key, value in values.items()}

    # --- rotation -----------------------------------------------------------------------------------

    def is_current(self, stored: StoredValue) -> bool:
        """True when the value is enc:v2 under the active key, or empty (unset): rotation leaves it alone.

        By its prefix alone: whether it also decrypts, bound to its row and field, `opens` tells.
        """
        return not stored or self._cipher.is_current(stored)

    def opens(self, stored: StoredValue, context: ValueContext) -> bool:
        """True when the value decrypts as bound to `context` (an empty value does): not damaged, not moved."""
        if not stored:
            return True
        try:
            self._cipher.decrypt(stored, context)
        except InvalidCiphertext:
            return False
        return True

    def reseal(self, stored: StoredValue, context: ValueContext) -> StoredValue:
        """The same clear value sealed again under the active key; raises InvalidCiphertext when unreadable.

        Legacy values pass through decryption as they are: the caller decides whether they may.
        An empty value stays empty (see `seal`).
        """
        if not stored:
            return StoredValue("")
        clear = self._cipher.decrypt(stored, context)
        try:
            return self._sealed(clear, context)
        except UnicodeEncodeError:
            # A lone surrogate, which SQLite's JSON text can hold: as malformed as a value that does not decrypt.
            raise InvalidCiphertext("the stored value is not valid Unicode text (a lone surrogate)") from None
