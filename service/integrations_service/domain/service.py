"""The credential service's use cases, independent of gRPC.

Sits above the sealing layer (`integrations_service.sealing`), which turns
clear values into the `StoredValue`s the store holds and back, so the store
(and its database) only ever hold ciphertext. Every change, every decrypted
read and every refusal of either leaves an audit record.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from integrations_service.domain import validation
from integrations_service.domain.audit import OUTCOME_OK, AuditTrail, Caller
from integrations_service.domain.registry import Category, ProviderSpec, providers_in
from integrations_service.domain.resolution import ConfigView, EffectiveConfig, is_ready, resolve_values
from integrations_service.errors import Conflict, CorruptCredential, NotFound, ServiceError
from integrations_service.sealing import Sealer, Target
from integrations_service.store import IntegrationStore, StoredIntegration, StoredValue
from integrations_service.store.changes import ChangeKind, ConfigChanged

RPC_GET = "GetProviderConfig"
RPC_SAVE = "SaveIntegration"
RPC_DELETE = "DeleteIntegration"


@dataclass(frozen=True)
class ReadRequest:
    """GetProviderConfig: one organization's effective config for one provider."""

    organization_id: str
    provider: str
    view: ConfigView = ConfigView.MASKED


@dataclass(frozen=True)
class SaveRequest:
    """SaveIntegration: set `values`, remove `clear_fields`, keep the rest; `etag` ("" for none) guards the write."""

    organization_id: str
    provider: str
    values: Mapping[str, str] = field(default_factory=dict)
    clear_fields: tuple[str, ...] = ()
    etag: str = ""

    @property
    def touched(self) -> frozenset[str]:
        return frozenset(self.values) | frozenset(self.clear_fields)


@dataclass(frozen=True)
class DeleteRequest:
    """DeleteIntegration: `allow_missing` makes a missing row a success; `etag` ("" for none) guards it."""

    organization_id: str
    provider: str
    allow_missing: bool = False
    etag: str = ""


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


# Every read of a row asks for its etag; a few thousand rows' worth are kept (etags are no secret).
@functools.lru_cache(maxsize=4096)
def _etag(row_id: str, version: int) -> str:
    return hashlib.blake2b(f"{row_id}:{version}".encode(), digest_size=9).hexdigest()


class CredentialService:
    def __init__(
        self,
        store: IntegrationStore,
        sealer: Sealer,
        environment: Mapping[str, str],
        audit: AuditTrail,
    ) -> None:
        self._store = store
        self._sealer = sealer
        self._environment = dict(environment)
        self._audit = audit
        # How a provider the organization stored nothing for lists: the environment alone decides, and it is
        # fixed, as the catalog is. Most of a listing's providers are such, so each is worked out once.
        self._nothing_stored = {spec.id: self._status(spec, None) for spec in providers_in(None)}

    async def list_providers(self, organization_id: str, category: Category | None) -> list[ProviderStatus]:
        if not organization_id:
            return [ProviderStatus(spec) for spec in providers_in(category)]
        validation.check_organization_id(organization_id)
        rows = {row.provider: row for row in await self._store.list_for_organization(organization_id)}
        return [self._listed(spec, rows.get(spec.id)) for spec in providers_in(category)]

    async def get_config(self, request: ReadRequest, caller: Caller) -> EffectiveConfig:
        decrypted = request.view is ConfigView.DECRYPTED
        try:
            spec = validation.check_target(request.organization_id, request.provider)
            row = await self._store.get(request.organization_id, spec.id)
            clear = self._sealer.unseal(row, spec.field_keys) if row else {}
            if decrypted:
                # With INTEGRATIONS_AUDIT_READS=strict this waits until the record is stored (or fails).
                await self._audit.decrypted_read(
                    self._audit.record(caller, RPC_GET, OUTCOME_OK, request.organization_id, spec.id, spec.field_keys)
                )
        except ServiceError as error:
            if decrypted:  # every refusal of a decrypted read is on the record, whatever refused it
                broken = error.fields if isinstance(error, CorruptCredential) else ()
                self._audit.refused(caller, RPC_GET, error, request.organization_id, request.provider, broken)
            raise
        return self._effective(spec, request.organization_id, row, clear, request.view)

    async def save(self, request: SaveRequest, caller: Caller) -> EffectiveConfig:
        touched = request.touched
        try:
            spec = validation.check_target(request.organization_id, request.provider)
            validation.check_changes(spec, request.values, request.clear_fields)
            merge = _SaveMerge(self._sealer, spec, request)
            fingerprints = {f"fingerprint.{k}": v for k, v in self._sealer.fingerprints(request.values).items()}
            cleared = {f"cleared.{key}": "true" for key in request.clear_fields}
            audit = self._audit.record(
                caller, RPC_SAVE, OUTCOME_OK, request.organization_id, spec.id, touched, fingerprints | cleared
            )
            row = await self._store.upsert(request.organization_id, spec.id, merge, audit)
            self._audit.written(audit)
        except ServiceError as error:
            self._audit.refused(caller, RPC_SAVE, error, request.organization_id, request.provider, touched)
            raise
        return self._effective(spec, request.organization_id, row, merge.clear_of(row), ConfigView.MASKED)

    async def delete(self, request: DeleteRequest, caller: Caller) -> None:
        organization_id = request.organization_id
        try:
            spec = validation.check_target(organization_id, request.provider)

            def check(current: StoredIntegration) -> None:
                _check_etag(current, request.etag)

            audit = self._audit.record(caller, RPC_DELETE, OUTCOME_OK, organization_id, spec.id)
            if await self._store.delete(organization_id, spec.id, check, audit):
                self._audit.written(audit)
            elif not request.allow_missing:
                raise NotFound(
                    f"organization {organization_id!r} has no stored credentials for provider {spec.id!r}",
                    resource_type=validation.INTEGRATION_RESOURCE,
                    resource_name=f"organizations/{organization_id}/integrations/{spec.id}",
                )
        except ServiceError as error:
            self._audit.refused(caller, RPC_DELETE, error, organization_id, request.provider)
            raise

    def _status(self, spec: ProviderSpec, row: StoredIntegration | None) -> ProviderStatus:
        stored_keys = frozenset(k for k, v in row.config.items() if v and k in spec.field_keys) if row else frozenset()
        return ProviderStatus(spec, configured=bool(stored_keys), ready=is_ready(spec, stored_keys, self._environment))

    def _listed(self, spec: ProviderSpec, row: StoredIntegration | None) -> ProviderStatus:
        """A stored row that reads would refuse is configured (it exists) but never ready."""
        if row is None:
            return self._nothing_stored[spec.id]
        if not self._sealer.readable(row, spec.field_keys):
            return ProviderStatus(spec, configured=True, ready=False)
        return self._status(spec, row)

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


class _SaveMerge:
    """A save's merge, run by the store on the current row (again on a newer row, if the store retries the write).

    Returns the config to store; `clear_of` then gives the clear config of the
    row it wrote, from the values it unsealed and sealed, so that a save
    decrypts each kept field once and never decrypts what it just encrypted.
    """

    def __init__(self, sealer: Sealer, spec: ProviderSpec, request: SaveRequest) -> None:
        self._sealer = sealer
        self._spec = spec
        self._request = request
        self._written: tuple[Mapping[str, StoredValue], dict[str, str]] | None = None

    def __call__(self, current: StoredIntegration | None) -> Mapping[str, StoredValue]:
        request = self._request
        _check_etag(current, request.etag)
        touched = request.touched
        kept_clear = self._sealer.unseal(current, self._spec.field_keys - touched) if current else {}
        merged_clear = kept_clear | dict(request.values)
        validation.check_cross_field_rules(self._spec, merged_clear)
        target = Target(request.organization_id, self._spec.id)
        stored = self._sealer.merge(current, kept_clear, request.values, touched, target)
        self._written = (stored, merged_clear)
        return stored

    def clear_of(self, row: StoredIntegration) -> dict[str, str]:
        if self._written is None or self._written[0] != row.config:
            raise RuntimeError("the store returned a config this save did not write")
        return self._written[1]


def _check_etag(current: StoredIntegration | None, etag: str) -> None:
    if not etag:
        return
    if current is None:
        raise Conflict("the etag is stale: the stored credentials were deleted since it was read")
    if etag_of(current) != etag:
        raise Conflict("the etag is stale: the stored credentials changed since it was read; read them again")
