"""Rows to records and back, as both SQL stores do it: the mapping lives here once (the row map).

What stays in each store is its dialect: the parameter style, how JSON travels
(text in SQLite, a JSONB codec on the asyncpg connection) and how a time is
read (ISO text, or a timestamptz). The stores hand this module decoded values.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime

from integrations_service.store.base import (
    AuditEntry,
    AuditRecord,
    KeyRecord,
    StoredIntegration,
    StoredValue,
    UnreadableConfig,
)

# The columns an audit insert writes, in the one order of its statement and of its parameters.
AUDIT_COLUMNS = ("time", "caller", "rpc", "outcome", "organization_id", "provider", "fields", "request_id", "details")
# The audit columns that hold JSON: `fields` a list, `details` an object.
AUDIT_JSON_COLUMNS = frozenset({"fields", "details"})


def json_text(value: object) -> str:
    """Compact JSON, non-ASCII kept: what the stores write, and how they show a non-string value they read."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def aware(value: datetime) -> datetime:
    """A naive time is taken to be UTC already (a timestamp column without a zone, or such ISO text)."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def utc(value: datetime) -> datetime:
    """Aware UTC; a naive time is taken to be UTC already."""
    return aware(value).astimezone(UTC)


def integration(
    *,
    id_: object,
    organization_id: object,
    provider: object,
    config: object,
    version: int,
    created_at: datetime,
    updated_at: datetime,
) -> StoredIntegration:
    """An integration row; `config` is its column decoded from JSON (or already an UnreadableConfig)."""
    return StoredIntegration(
        id=str(id_),
        organization_id=str(organization_id),
        provider=str(provider),
        config=config_of(config),
        version=int(version),
        created_at=aware(created_at),
        updated_at=aware(updated_at),
    )


def config_of(value: object) -> Mapping[str, StoredValue]:
    """A decoded config column; one that is not a JSON object is kept as unreadable, and named by the service.

    What the database holds is a stored value by definition: this and the sealing layer are the only
    places that make `StoredValue`s.
    """
    if isinstance(value, UnreadableConfig):
        return value
    if not isinstance(value, Mapping):
        return UnreadableConfig("is not a JSON object")
    # The store writes only strings (the dashboard too); anything else is kept as its JSON text.
    return {key: StoredValue(item) for key, item in _string_values(value).items()}


def key_record(*, key_id: object, check_value: object, encryptions: int, retired: object) -> KeyRecord:
    return KeyRecord(
        key_id=str(key_id), check_value=str(check_value), encryptions=int(encryptions), retired=bool(retired)
    )


def encryption_counts(counts: Mapping[str, int]) -> list[tuple[str, int]]:
    """(key id, count) to add, sorted so concurrent writers lock keys in the same order; zeros dropped."""
    for key_id, count in counts.items():
        if count < 0:
            raise ValueError(f"the encryption count of key {key_id!r} cannot go down (got {count})")
    return [(key_id, counts[key_id]) for key_id in sorted(counts) if counts[key_id]]


def _audit_columns(record: AuditRecord) -> dict[str, object]:
    """The record's column values by column, in AUDIT_COLUMNS order."""
    return {
        "time": utc(record.time),
        "caller": record.caller,
        "rpc": record.action,  # the column keeps its first name
        "outcome": record.outcome,
        "organization_id": record.organization_id,
        "provider": record.provider,
        "fields": list(record.fields),
        "request_id": record.request_id,
        "details": dict(record.details),
    }


def audit_values(record: AuditRecord) -> tuple[object, ...]:
    """The record's column values in AUDIT_COLUMNS order: time aware UTC, fields a list, details a dict."""
    values = _audit_columns(record)
    return tuple(values[column] for column in AUDIT_COLUMNS)


def audit_json(record: AuditRecord) -> dict[str, object]:
    """The record as a JSON object of its columns (`audit_values`' values, the time as ISO 8601 UTC)."""
    values = _audit_columns(record)
    values["time"] = utc(record.time).isoformat()
    return values


def audit_entry(
    *,
    id_: int,
    time: datetime,
    caller: object,
    rpc: object,
    outcome: object,
    organization_id: object,
    provider: object,
    fields: Iterable[object] | None,
    request_id: object,
    details: Mapping[object, object] | None,
) -> AuditEntry:
    """An audit row; `fields` and `details` are their columns decoded from JSON (None when empty)."""
    field_list = fields or ()
    detail_map = details or {}
    return AuditEntry(
        id=int(id_),
        record=AuditRecord(
            time=utc(time),
            caller=str(caller),
            action=str(rpc),
            outcome=str(outcome),
            organization_id=str(organization_id),
            provider=str(provider),
            fields=tuple(item if isinstance(item, str) else json_text(item) for item in field_list),
            request_id=str(request_id),
            details=_string_values(detail_map),
        ),
    )


def _string_values(value: Mapping[object, object]) -> dict[str, str]:
    return {str(key): item if isinstance(item, str) else json_text(item) for key, item in value.items()}
