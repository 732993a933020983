"""The credential service's use cases, independent of gRPC.

Sits above the crypto layer and the store: values are encrypted here before
the store sees them and decrypted here after it returns them, so the store
(and its database) only ever hold ciphertext. Every change, every decrypted
read and every refusal of either leaves an audit record.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from integrations_service.crypto import InvalidCiphertext, ValueCipher, ValueContext, is_encrypted, legacy_format
from integrations_service.domain import validation
from integrations_service.domain.audit import OUTCOME_OK, AuditTrail, Caller
from integrations_service.domain.legacy import LegacyPolicy, refusal_reason
from integrations_service.domain.registry import Category, ProviderSpec, providers_in
from integrations_service.domain.resolution import ConfigView, EffectiveConfig, is_ready, resolve_values
from integrations_service.errors import Conflict, CorruptConfig, CorruptCredential, NotFound, ServiceError
from integrations_service.store import IntegrationStore, StoredIntegration, UnreadableConfig
from integrations_service.store.changes import ChangeKind, ConfigChanged

RPC_GET = "GetProviderConfig"
RPC_SAVE = "SaveIntegration"
RPC_DELETE = "DeleteIntegration"


@dataclass(frozen=True)
class ProviderStatus:
    """A catalog entry; `configured` and `ready` only when an organization was given."""

    spec: ProviderSpec
    configured: bool | None = None
    ready: bool | None = None


def etag_of(row: StoredIntegration) -> str:
    """Opaque, changes with every write, and never repeats after a delete and re-create."""
    return _etag(row.id, row.version)


def etag_of_change(change: ConfigChanged) -> str:
    """The etag a save produced (equal to `etag_of` of the row it saved); empty for a delete."""
    return "" if change.kind is ChangeKind.DELETED else _etag(change.row_id, change.version)


def _etag(row_id: str, version: int) -> str:
    return hashlib.blake2b(f"{row_id}:{version}".encode(), digest_size=9).hexdigest()


class CredentialService:
    def __init__(
        self,
        store: IntegrationStore,
        cipher: ValueCipher,
        environment: Mapping[str, str],
        audit: AuditTrail,
        legacy: LegacyPolicy = LegacyPolicy(),  # noqa: B008 (frozen, shared safely)
    ) -> None:
        self._store = store
        self._cipher = cipher
        self._environment = dict(environment)
        self._audit = audit
        self._legacy = legacy

    async def list_providers(self, organization_id: str, category: Category | None) -> list[ProviderStatus]:
        if not organization_id:
            return [ProviderStatus(spec) for spec in providers_in(category)]
        validation.check_organization_id(organization_id)
        rows = {row.provider: row for row in await self._store.list_for_organization(organization_id)}
        return [self._listed(spec, rows.get(spec.id)) for spec in providers_in(category)]

    async def get_config(
        self, organization_id: str, provider_id: str, view: ConfigView, caller: Caller
    ) -> EffectiveConfig:
        decrypted = view is ConfigView.DECRYPTED
        try:
            spec = validation.check_target(organization_id, provider_id)
            row = await self._store.get(organization_id, provider_id)
            clear = self._decrypt(spec, row, skip=()) if row else {}
            if decrypted:
                fields = [f.key for f in spec.fields]
                # With INTEGRATIONS_AUDIT_READS=strict this waits until the record is stored (or fails).
                await self._audit.decrypted_read(
                    self._audit.record(caller, RPC_GET, OUTCOME_OK, organization_id, spec.id, fields)
                )
        except ServiceError as error:
            if decrypted:  # every refusal of a decrypted read is on the record, whatever refused it
                broken = error.fields if isinstance(error, CorruptCredential) else ()
                self._audit.refused(caller, RPC_GET, error, organization_id, provider_id, broken)
            raise
        return self._effective(spec, organization_id, row, clear, view)

    async def save(
        self,
        organization_id: str,
        provider_id: str,
        values: Mapping[str, str],
        clear_fields: Sequence[str],
        etag: str,
        caller: Caller,
    ) -> EffectiveConfig:
        touched = set(values) | set(clear_fields)
        try:
            spec = validation.check_target(organization_id, provider_id)
            validation.check_changes(spec, values, clear_fields)
            merged_clear: dict[str, str] = {}

            def merge(current: StoredIntegration | None) -> dict[str, str]:
                _check_etag(current, etag)
                kept_clear = self._decrypt(spec, current, skip=touched) if current else {}
                merged_clear.clear()
                merged_clear.update(kept_clear)
                merged_clear.update(values)
                validation.check_cross_field_rules(spec, merged_clear)
                # Untouched fields keep their stored ciphertext (nothing is re-encrypted needlessly),
                # except legacy plaintext, which a write never carries back in the clear.
                kept = {k: v for k, v in current.config.items() if k not in touched} if current else {}
                to_encrypt = {k: kept_clear[k] for k, v in kept.items() if not is_encrypted(v) and k in kept_clear}
                return kept | {
                    key: self._cipher.encrypt(value, ValueContext(organization_id, spec.id, key))
                    for key, value in (to_encrypt | dict(values)).items()
                }

            fingerprints = {f"fingerprint.{key}": self._cipher.fingerprint(value) for key, value in values.items()}
            cleared = {f"cleared.{key}": "true" for key in clear_fields}
            audit = self._audit.record(
                caller, RPC_SAVE, OUTCOME_OK, organization_id, spec.id, touched, fingerprints | cleared
            )
            row = await self._store.upsert(organization_id, spec.id, merge, audit)
            self._audit.written(audit)
        except ServiceError as error:
            self._audit.refused(caller, RPC_SAVE, error, organization_id, provider_id, touched)
            raise
        return self._effective(spec, organization_id, row, merged_clear, ConfigView.MASKED)

    async def delete(
        self, organization_id: str, provider_id: str, allow_missing: bool, etag: str, caller: Caller
    ) -> None:
        try:
            spec = validation.check_target(organization_id, provider_id)

            def check(current: StoredIntegration) -> None:
                _check_etag(current, etag)

            audit = self._audit.record(caller, RPC_DELETE, OUTCOME_OK, organization_id, spec.id)
            if await self._store.delete(organization_id, spec.id, check, audit):
                self._audit.written(audit)
            elif not allow_missing:
                raise NotFound(
                    f"organization {organization_id!r} has no stored credentials for provider {spec.id!r}",
                    resource_type=validation.INTEGRATION_RESOURCE,
                    resource_name=f"organizations/{organization_id}/integrations/{spec.id}",
                )
        except ServiceError as error:
            self._audit.refused(caller, RPC_DELETE, error, organization_id, provider_id)
            raise

    def _status(self, spec: ProviderSpec, row: StoredIntegration | None) -> ProviderStatus:
        stored_keys = frozenset(k for k, v in row.config.items() if v and spec.field(k)) if row else frozenset()
        return ProviderStatus(spec, configured=bool(stored_keys), ready=is_ready(spec, stored_keys, self._environment))

    def _listed(self, spec: ProviderSpec, row: StoredIntegration | None) -> ProviderStatus:
        """A stored row that reads would refuse is configured (it exists) but never ready."""
        if row is not None and (isinstance(row.config, UnreadableConfig) or self._refused_fields(spec, row)):
            return ProviderStatus(spec, configured=True, ready=False)
        return self._status(spec, row)

    def _refused_fields(self, spec: ProviderSpec, row: StoredIntegration) -> list[str]:
        if not self._legacy.refuses:
            return []
        return [k for k, v in row.config.items() if spec.field(k) and legacy_format(v)]

    def _decrypt(self, spec: ProviderSpec, row: StoredIntegration, skip: Collection[str]) -> dict[str, str]:
        """Clear text of the row's registry fields, except those in `skip`.

        Legacy values (plaintext, enc:v1) are refused like tampered ciphertext when the policy says so,
        so a save that keeps such a field fails too, instead of re-encrypting it as genuine.
        """
        if isinstance(row.config, UnreadableConfig):
            raise CorruptConfig(row.organization_id, row.provider, row.config.reason)
        clear: dict[str, str] = {}
        broken: dict[str, str] = {}
        legacy_read: list[str] = []
        for key, stored in row.config.items():
            if key in skip or spec.field(key) is None:
                continue
            legacy = legacy_format(stored)
            if legacy and self._legacy.refuses:
                self._legacy.count_refused(legacy, row.provider)
                broken[key] = refusal_reason(legacy)
                continue
            try:
                clear[key] = self._cipher.decrypt(stored, ValueContext(row.organization_id, row.provider, key))
            except InvalidCiphertext as error:
                broken[key] = str(error)
                continue
            if legacy:
                legacy_read.append(legacy)
        if broken:
            fields = sorted(broken)
            raise CorruptCredential(row.organization_id, row.provider, fields, reason=broken[fields[0]])
        for legacy in legacy_read:
            self._legacy.count_read(legacy, row.provider)
        return clear

    def _effective(
        self,
        spec: ProviderSpec,
        organization_id: str,
        row: StoredIntegration | None,
        clear: Mapping[str, str],
        view: ConfigView,
    ) -> EffectiveConfig:
        return EffectiveConfig(
            organization_id=organization_id,
            provider=spec.id,
            values=resolve_values(spec, clear, self._environment, view),
            etag=etag_of(row) if row else "",
            update_time=row.updated_at if row else None,
        )


def _check_etag(current: StoredIntegration | None, etag: str) -> None:
    if not etag:
        return
    if current is None:
        raise Conflict("the etag is stale: the stored credentials were deleted since it was read")
    if etag_of(current) != etag:
        raise Conflict("the etag is stale: the stored credentials changed since it was read; read them again")
