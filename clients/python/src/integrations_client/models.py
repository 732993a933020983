"""Immutable results of the client's calls, converted from the integrations.v1 messages."""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, NoReturn, Self

from google.protobuf.timestamp_pb2 import Timestamp

from integrations.v1 import integrations_pb2 as pb

__all__ = [
    "Category",
    "ChangeKind",
    "ConfigChangeEvent",
    "ConfigValue",
    "Provider",
    "ProviderConfig",
    "ProviderCredentials",
    "ProviderField",
    "ValueSource",
    "WatchEvent",
    "WatchResync",
    "WatchStarted",
]


class ValueSource(enum.Enum):
    """Where an effective value came from."""

    ORGANIZATION = "organization"  # the organization's own stored value
    ENVIRONMENT = "environment"  # the service's environment default
    UNSET = "unset"  # neither has a value
    UNSPECIFIED = "unspecified"  # a source this client version does not know

    def __repr__(self) -> str:
        return f"ValueSource.{self.name}"


class Category(enum.Enum):
    """The group the dashboard shows a provider in."""

    PAYMENTS = "payments"
    NOTIFICATIONS = "notifications"
    ANALYTICS = "analytics"
    UNSPECIFIED = "unspecified"  # a category this client version does not know


_SOURCES: dict[int, ValueSource] = {
    pb.VALUE_SOURCE_ORGANIZATION: ValueSource.ORGANIZATION,
    pb.VALUE_SOURCE_ENVIRONMENT: ValueSource.ENVIRONMENT,
    pb.VALUE_SOURCE_UNSET: ValueSource.UNSET,
}
_CATEGORIES: dict[int, Category] = {
    pb.CATEGORY_PAYMENTS: Category.PAYMENTS,
    pb.CATEGORY_NOTIFICATIONS: Category.NOTIFICATIONS,
    pb.CATEGORY_ANALYTICS: Category.ANALYTICS,
}
_CATEGORY_NUMBERS: dict[Category, pb.Category.ValueType] = {
    Category.PAYMENTS: pb.CATEGORY_PAYMENTS,
    Category.NOTIFICATIONS: pb.CATEGORY_NOTIFICATIONS,
    Category.ANALYTICS: pb.CATEGORY_ANALYTICS,
}


class _HoldsSecrets:
    """Immutable holders of decrypted values: a copy is the object itself, and pickling is refused (it would write
    the values in clear text wherever the bytes go: a cache, a queue, a file)."""

    __slots__ = ()

    def __copy__(self) -> Self:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Self:
        return self

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        _refuse_pickling(type(self).__name__)


class _SecretValues(_HoldsSecrets, Mapping[str, str]):
    """A read-only mapping of clear-text values whose repr names the keys only."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, str]) -> None:
        self._data = dict(data)

    def __getitem__(self, key: str) -> str:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"<secret values: {', '.join(self._data) or 'none'}>"


def _refuse_pickling(name: str) -> NoReturn:
    """Pickling decrypted values would write them in clear text wherever the bytes go (a cache, a queue, a file)."""
    raise TypeError(
        f"{name} holds decrypted secrets and cannot be pickled: keep it in memory and call get_config again "
        "(it is cached), or pass on the one value a task needs"
    )


@dataclass(frozen=True, repr=False)
class ProviderCredentials(_HoldsSecrets):
    """One organization's effective, DECRYPTED configuration of one provider (from `get_config`).

    `creds["secretKey"]` or `creds.values["secretKey"]` is the clear-text value;
    only fields that resolve (from the organization or the environment) are in
    `values`, so an unset field raises KeyError (`creds.get(key)` gives None).
    `creds.source(key)` tells where any field of the provider comes from,
    unset ones included. The repr shows keys and sources, never a value.
    """

    organization_id: str
    provider: str
    values: Mapping[str, str]
    sources: Mapping[str, ValueSource]
    etag: str
    update_time: datetime | None

    def __getitem__(self, key: str) -> str:
        return self.values[key]

    def __contains__(self, key: object) -> bool:
        return key in self.values

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.values.get(key, default)

    def source(self, key: str) -> ValueSource:
        """Where the field's value comes from; KeyError for a key the provider does not have."""
        return self.sources[key]

    def __hash__(self) -> int:
        return hash((self.organization_id, self.provider, self.etag))

    def __repr__(self) -> str:
        sources = ", ".join(f"{key}={source.value}" for key, source in self.sources.items())
        return (
            f"ProviderCredentials(organization_id={self.organization_id!r}, provider={self.provider!r}, "
            f"sources={{{sources}}}, etag={self.etag!r})"
        )

    __str__ = __repr__


@dataclass(frozen=True)
class ConfigValue:
    """One field of a masked configuration: the displayable value, its source, and whether it is secret."""

    # Clear text for non-secret fields; for secrets "••••••••4242"-style (the organization's own) or "••••••••"
    # alone (the environment's, the platform's); "" when unset.
    value: str
    source: ValueSource
    secret: bool


@dataclass(frozen=True)
class ProviderConfig:
    """An organization's effective configuration of one provider, secrets masked (dashboard side)."""

    organization_id: str
    provider: str
    values: Mapping[str, ConfigValue]
    etag: str  # send back with save()/delete() to refuse concurrent changes; "" when nothing is stored
    update_time: datetime | None

    def __hash__(self) -> int:
        return hash((self.organization_id, self.provider, self.etag))


@dataclass(frozen=True)
class ProviderField:
    """One configurable field of a provider.

    `binds_secrets`: the field decides where the provider's credentials are sent or which account they
    belong to (endpoint, host, port, account id, user name, sender address), or is a secret that
    authenticates what the provider sends about one account (Stripe's `webhookSecret`, Ifthenpay's
    keys). Once an organization stores one, none of the provider's secret fields comes from the
    environment for it: each is the organization's own, or unset. Once it stores the endpoint itself
    (Easypay `baseUrl`, SMTP `host`), no field at all does (`docs/api.md`, Environment fallback).
    """

    key: str
    env_var: str
    description: str
    secret: bool
    required: bool
    binds_secrets: bool = False  # defaulted, so code that builds a ProviderField without it keeps working


@dataclass(frozen=True)
class Provider:
    """A catalog entry; `configured` and `ready` only mean something when listed for an organization."""

    id: str
    display_name: str
    category: Category
    runtime_supported: bool
    fields: tuple[ProviderField, ...] = field(default=())
    configured: bool = False
    ready: bool = False


class ChangeKind(enum.Enum):
    """What a committed change did to an organization's stored credentials for a provider."""

    SAVED = "saved"  # created or updated (a save, a key rotation, any other writer)
    DELETED = "deleted"  # removed: every field falls back to the environment default
    UNSPECIFIED = "unspecified"  # a kind this client version does not know

    def __repr__(self) -> str:
        return f"ChangeKind.{self.name}"


@dataclass(frozen=True)
class WatchStarted:
    """The first event of every watch stream: from now on no committed change in its scope is missed."""

    time: datetime | None  # when the subscription became live (the service's clock)


@dataclass(frozen=True)
class ConfigChangeEvent:
    """One committed change of one organization's stored credentials for one provider. Never holds a value.

    `etag` is the etag `get_config` (`ProviderCredentials.etag`) returns after
    the change, "" after a delete; `time` is when the change was committed.
    """

    organization_id: str
    provider: str
    etag: str
    kind: ChangeKind
    time: datetime | None


@dataclass(frozen=True)
class WatchResync:
    """Changes may have been missed (the consumer fell behind, or an undescribed change): rebuild everything.

    The stream stays live; `reason` is for logs (fell_behind, truncated, undescribed).
    """

    reason: str


WatchEvent = WatchStarted | ConfigChangeEvent | WatchResync


# --- conversion from the wire messages -----------------------------------------------------------------


def _time(config: pb.ProviderConfig) -> datetime | None:
    if not config.HasField("update_time"):
        return None
    return config.update_time.ToDatetime(tzinfo=UTC)


def _source(number: int) -> ValueSource:
    return _SOURCES.get(number, ValueSource.UNSPECIFIED)


def credentials_from_pb(config: pb.ProviderConfig) -> ProviderCredentials:
    resolved = {key: value.value for key, value in config.values.items() if _source(value.source) in _RESOLVED}
    return ProviderCredentials(
        organization_id=config.organization_id,
        provider=config.provider,
        values=_SecretValues(resolved),
        sources=MappingProxyType({key: _source(value.source) for key, value in config.values.items()}),
        etag=config.etag,
        update_time=_time(config),
    )


_RESOLVED = frozenset({ValueSource.ORGANIZATION, ValueSource.ENVIRONMENT})


def config_from_pb(config: pb.ProviderConfig) -> ProviderConfig:
    values = {
        key: ConfigValue(value=value.value, source=_source(value.source), secret=value.secret)
        for key, value in config.values.items()
    }
    return ProviderConfig(
        organization_id=config.organization_id,
        provider=config.provider,
        values=MappingProxyType(values),
        etag=config.etag,
        update_time=_time(config),
    )


def provider_from_pb(provider: pb.Provider) -> Provider:
    return Provider(
        id=provider.id,
        display_name=provider.display_name,
        category=_CATEGORIES.get(provider.category, Category.UNSPECIFIED),
        runtime_supported=provider.runtime_supported,
        fields=tuple(
            ProviderField(
                key=f.key,
                env_var=f.env_var,
                description=f.description,
                secret=f.secret,
                required=f.required,
                binds_secrets=f.binds_secrets,
            )
            for f in provider.fields
        ),
        configured=provider.configured,
        ready=provider.ready,
    )


_CHANGE_KINDS: dict[int, ChangeKind] = {
    pb.CHANGE_TYPE_SAVED: ChangeKind.SAVED,
    pb.CHANGE_TYPE_DELETED: ChangeKind.DELETED,
}


def _timestamp(message: pb.WatchStarted | pb.ConfigChange, name: str) -> datetime | None:
    if not message.HasField(name):  # type: ignore[arg-type]
        return None
    stamp: Timestamp = getattr(message, name)
    return stamp.ToDatetime(tzinfo=UTC)


def watch_event_from_pb(reply: pb.WatchConfigChangesResponse) -> WatchEvent | None:
    """The event a WatchConfigChanges message carries; None for a kind of message this client does not know."""
    which = reply.WhichOneof("event")
    if which == "started":
        return WatchStarted(time=_timestamp(reply.started, "start_time"))
    if which == "change":
        change = reply.change
        return ConfigChangeEvent(
            organization_id=change.organization_id,
            provider=change.provider,
            etag=change.etag,
            kind=_CHANGE_KINDS.get(change.type, ChangeKind.UNSPECIFIED),
            time=_timestamp(change, "change_time"),
        )
    if which == "resync":
        return WatchResync(reason=reply.resync.reason)
    return None


def category_to_pb(category: Category | str | None) -> pb.Category.ValueType:
    if category is None:
        return pb.CATEGORY_UNSPECIFIED
    resolved = Category(category)  # ValueError for an unknown name
    if resolved is Category.UNSPECIFIED:
        return pb.CATEGORY_UNSPECIFIED
    return _CATEGORY_NUMBERS[resolved]
