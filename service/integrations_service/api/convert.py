"""Translation between protobuf messages and domain values, both ways."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

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
    message = pb.Provider()
    provider_into(message, status)
    return message


def provider_into(message: pb.Provider, status: ProviderStatus) -> None:
    """Fill `message` (e.g. `response.providers.add()`): a copy of the spec's message, made once, and its status."""
    message.CopyFrom(_spec_message(status.spec))
    message.configured = bool(status.configured)
    message.ready = bool(status.ready)


# The catalogue is fixed: each provider's message (everything but its status) is built once, kept with the spec
# it was built from (a different spec object with the same id, as tests make, gets its own).
_SPEC_MESSAGES: dict[str, tuple[ProviderSpec, pb.Provider]] = {}


def _spec_message(spec: ProviderSpec) -> pb.Provider:
    cached = _SPEC_MESSAGES.get(spec.id)
    if cached is not None and cached[0] is spec:
        return cached[1]
    message = pb.Provider(
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
    )
    _SPEC_MESSAGES[spec.id] = (spec, message)
    return message


def config_to_pb(config: EffectiveConfig) -> pb.ProviderConfig:
    message = pb.ProviderConfig()
    config_into(message, config)
    return message


def config_into(message: pb.ProviderConfig, config: EffectiveConfig) -> None:
    """Fill `message` in place (e.g. `response.config`): no intermediate messages to copy."""
    message.organization_id = config.organization_id
    message.provider = config.provider
    message.etag = config.etag
    values = message.values
    for key, effective in config.values.items():
        value = values[key]
        value.value = effective.value
        value.source = _SOURCE_TO_PB[effective.source]
        value.secret = effective.secret
    if config.update_time is not None:
        _set_time(message.update_time, config.update_time)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _set_time(timestamp: Timestamp, when: datetime) -> None:
    """What `Timestamp.FromDatetime` sets (a naive datetime is UTC), in integer arithmetic."""
    since = (when if when.tzinfo is not None else when.replace(tzinfo=UTC)) - _EPOCH
    timestamp.seconds = since.days * 86_400 + since.seconds
    timestamp.nanos = since.microseconds * 1000


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


class WatchMessages:
    """`watch_event_to_pb`, each change built once for every stream of the process.

    The change feed hands the same event object to every subscription, so the streams a change
    fans out to share one message (never mutated once built; gRPC serializes it per stream).
    """

    def __init__(self) -> None:
        self._last: tuple[ConfigChanged, pb.WatchConfigChangesResponse] | None = None

    def of(self, event: WatchEvent) -> pb.WatchConfigChangesResponse:
        last = self._last
        if last is not None and last[0] is event:
            return last[1]
        message = watch_event_to_pb(event)
        if isinstance(event, ConfigChanged):
            self._last = (event, message)
        return message


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
