"""Translation between protobuf messages and domain values, both ways."""

from __future__ import annotations

from integrations.v1 import integrations_pb2 as pb
from integrations_service.domain.audit import AuditEntry
from integrations_service.domain.registry import Category, ProviderSpec
from integrations_service.domain.resolution import ConfigView, EffectiveConfig, ValueSource
from integrations_service.domain.service import ProviderStatus, etag_of_change
from integrations_service.domain.watch import ChangeKind, ConfigChanged, WatchEvent, WatchResync
from integrations_service.errors import FieldViolation, InvalidArgument

_CATEGORY_TO_PB = {
    Category.PAYMENTS: pb.CATEGORY_PAYMENTS,
    Category.NOTIFICATIONS: pb.CATEGORY_NOTIFICATIONS,
    Category.ANALYTICS: pb.CATEGORY_ANALYTICS,
}
_CATEGORY_FROM_PB = {v: k for k, v in _CATEGORY_TO_PB.items()}
_SOURCE_TO_PB = {
    ValueSource.ORGANIZATION: pb.VALUE_SOURCE_ORGANIZATION,
    ValueSource.ENVIRONMENT: pb.VALUE_SOURCE_ENVIRONMENT,
    ValueSource.UNSET: pb.VALUE_SOURCE_UNSET,
}
_CHANGE_TYPE_TO_PB = {ChangeKind.SAVED: pb.CHANGE_TYPE_SAVED, ChangeKind.DELETED: pb.CHANGE_TYPE_DELETED}
_VIEW_FROM_PB = {
    pb.CONFIG_VIEW_UNSPECIFIED: ConfigView.MASKED,
    pb.CONFIG_VIEW_MASKED: ConfigView.MASKED,
    pb.CONFIG_VIEW_DECRYPTED: ConfigView.DECRYPTED,
}


def category_from_pb(value: pb.Category.ValueType) -> Category | None:
    """None (every category) for CATEGORY_UNSPECIFIED."""
    if value == pb.CATEGORY_UNSPECIFIED:
        return None
    if value not in _CATEGORY_FROM_PB:
        raise InvalidArgument([FieldViolation("category", f"unknown category number {value}")])
    return _CATEGORY_FROM_PB[value]


def view_from_pb(value: pb.ConfigView.ValueType) -> ConfigView:
    if value not in _VIEW_FROM_PB:
        raise InvalidArgument([FieldViolation("view", f"unknown view number {value}")])
    return _VIEW_FROM_PB[value]


def provider_to_pb(status: ProviderStatus) -> pb.Provider:
    spec: ProviderSpec = status.spec
    return pb.Provider(
        id=spec.id,
        display_name=spec.display_name,
        category=_CATEGORY_TO_PB[spec.category],
        runtime_supported=spec.runtime_supported,
        fields=[
            pb.ProviderField(
                key=f.key,
                env_var=f.env_var,
                description=f.description,
                secret=f.secret,
                required=f.required,
                binds_secrets=f.binds_secrets,
            )
            for f in spec.fields
        ],
        configured=bool(status.configured),
        ready=bool(status.ready),
    )


def config_to_pb(config: EffectiveConfig) -> pb.ProviderConfig:
    message = pb.ProviderConfig(
        organization_id=config.organization_id,
        provider=config.provider,
        etag=config.etag,
        values={
            key: pb.ConfigValue(value=v.value, source=_SOURCE_TO_PB[v.source], secret=v.secret)
            for key, v in config.values.items()
        },
    )
    if config.update_time is not None:
        message.update_time.FromDatetime(config.update_time)
    return message


def audit_to_pb(entry: AuditEntry) -> pb.AuditEvent:
    record = entry.record
    event = pb.AuditEvent(
        id=entry.id,
        caller=record.caller,
        action=record.action,
        outcome=record.outcome,
        organization_id=record.organization_id,
        provider=record.provider,
        fields=list(record.fields),
        request_id=record.request_id,
        details=dict(record.details),
    )
    event.time.FromDatetime(record.time)
    return event


def watch_event_to_pb(event: WatchEvent) -> pb.WatchConfigChangesResponse:
    """One message of a WatchConfigChanges stream: identifiers, an etag and a time, never a value."""
    if isinstance(event, ConfigChanged):
        change = pb.ConfigChange(
            organization_id=event.organization_id,
            provider=event.provider,
            etag=etag_of_change(event),
            type=_CHANGE_TYPE_TO_PB[event.kind],
        )
        change.change_time.FromDatetime(event.time)
        return pb.WatchConfigChangesResponse(change=change)
    if isinstance(event, WatchResync):
        return pb.WatchConfigChangesResponse(resync=pb.WatchResync(reason=event.reason.value))
    started = pb.WatchStarted()
    started.start_time.FromDatetime(event.time)
    return pb.WatchConfigChangesResponse(started=started)
