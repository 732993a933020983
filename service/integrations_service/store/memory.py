"""The in-memory store: the repository contract without I/O, for fast domain tests.

It keeps its rows in a `MemoryDatabase`, which several `MemoryStore`s may
share, as replicas share one PostgreSQL database. Every operation runs
without awaiting between its read and its write, so on one event loop each
is atomic: the same serialization the other stores get from row locks and
transactions. A callback that raises leaves everything as it was. It is
proven by the same contract suite as the SQLite and PostgreSQL stores, and
is never used to serve.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from integrations_service import errors
from integrations_service.store import rowmap
from integrations_service.store.base import (
    AuditEntry,
    AuditRecord,
    IntegrationStore,
    KeyRecord,
    Mutation,
    Precondition,
    Rewrite,
    StoredIntegration,
    UnreadableConfig,
)
from integrations_service.store.changes import ChangeEvent, ChangeFeed, ChangeHub, ConfigChanged

CLOSED_MESSAGE = "the credential store (in memory) is closed"
STORE_REJECTED_MESSAGE = "the credential store (in memory) refused an audit record it cannot encode"


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class MemoryDatabase:
    """What a database holds: rows by (organization, provider), the key ledger, the audit trail."""

    clock: Callable[[], datetime] = _utcnow
    rows: dict[tuple[str, str], StoredIntegration] = field(default_factory=dict)
    keys: dict[str, KeyRecord] = field(default_factory=dict)
    audit: list[AuditEntry] = field(default_factory=list)
    _audit_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    # The change feeds of the open stores on this database, as PostgreSQL notifies every listener.
    feeds: set[ChangeHub] = field(default_factory=set)

    def publish(self, event: ChangeEvent) -> None:
        for feed in tuple(self.feeds):
            feed.publish(event)

    def append_audit(self, records: Sequence[AuditRecord]) -> None:
        # Stored as the other stores store it: in UTC, a naive time taken to be UTC already.
        self.audit.extend(
            AuditEntry(next(self._audit_ids), replace(_copy_record(record), time=_utc(record.time)))
            for record in records
        )


class MemoryStore(IntegrationStore):
    def __init__(self, database: MemoryDatabase | None = None) -> None:
        self._db = database if database is not None else MemoryDatabase()
        self._closed = False
        self._changes = ChangeHub(connected=True)
        self._db.feeds.add(self._changes)

    @property
    def database(self) -> MemoryDatabase:
        return self._db

    async def get(self, organization_id: str, provider: str) -> StoredIntegration | None:
        self._check_open()
        row = self._db.rows.get((organization_id, provider))
        return _copy(row) if row is not None else None

    async def list_for_organization(self, organization_id: str) -> list[StoredIntegration]:
        self._check_open()
        rows = [row for (org, _), row in self._db.rows.items() if org == organization_id]
        return [_copy(row) for row in sorted(rows, key=lambda row: row.provider)]

    async def upsert(
        self, organization_id: str, provider: str, mutate: Mutation, audit: AuditRecord | None = None
    ) -> StoredIntegration:
        self._check_open()
        key = (organization_id, provider)
        current = self._db.rows.get(key)
        config = dict(mutate(_copy(current) if current is not None else None))  # raising changes nothing
        now = self._db.clock()
        if current is None:
            row = StoredIntegration(uuid.uuid4().hex, organization_id, provider, config, 1, now, now)
        else:
            # updated_at grows with every write even if the clock stalls or steps back, as in the other stores.
            updated = max(now, current.updated_at + timedelta(microseconds=1))
            row = replace(current, config=config, version=current.version + 1, updated_at=updated)
        self._db.rows[key] = row
        if audit is not None:
            self._db.append_audit([audit])
        self._db.publish(ConfigChanged.saved(row))
        return _copy(row)

    async def delete(
        self, organization_id: str, provider: str, check: Precondition, audit: AuditRecord | None = None
    ) -> bool:
        self._check_open()
        key = (organization_id, provider)
        current = self._db.rows.get(key)
        if current is None:
            return False
        check(_copy(current))  # raising keeps the row
        del self._db.rows[key]
        if audit is not None:
            self._db.append_audit([audit])
        self._db.publish(ConfigChanged.deleted(current, self._db.clock()))
        return True

    async def scan(self, after_id: str, limit: int) -> list[StoredIntegration]:
        self._check_open()
        if limit < 1:
            return []
        # Code point order of str is UTF-8 byte order: the order of the other stores.
        rows = sorted((row for row in self._db.rows.values() if row.id > after_id), key=lambda row: row.id)
        return [_copy(row) for row in rows[:limit]]

    async def rewrap(self, ids: Sequence[str], rewrite: Rewrite, audit: AuditRecord | None = None) -> int:
        self._check_open()
        wanted = set(ids)
        rows = sorted((row for row in self._db.rows.values() if row.id in wanted), key=lambda row: row.id)
        # Every rewrite runs before anything is stored, so one that raises changes nothing.
        changes = [(row, config) for row in rows if (config := rewrite(_copy(row))) is not None]
        for row, config in changes:
            self._db.rows[(row.organization_id, row.provider)] = replace(row, config=dict(config))
            self._db.publish(ConfigChanged.rewrapped(row))
        if audit is not None:
            self._db.append_audit([audit])
        return len(changes)

    async def list_keys(self) -> list[KeyRecord]:
        self._check_open()
        return [self._db.keys[key_id] for key_id in sorted(self._db.keys)]

    async def register_keys(self, check_values: Mapping[str, str]) -> list[KeyRecord]:
        self._check_open()
        for key_id in sorted(check_values):
            self._db.keys.setdefault(key_id, KeyRecord(key_id, check_values[key_id], 0, retired=False))
        return await self.list_keys()

    async def add_encryptions(self, counts: Mapping[str, int]) -> None:
        self._check_open()
        for key_id, count in rowmap.encryption_counts(counts):
            if (record := self._db.keys.get(key_id)) is not None:
                self._db.keys[key_id] = replace(record, encryptions=record.encryptions + count)

    async def retire_key(self, key_id: str) -> None:
        self._check_open()
        if (record := self._db.keys.get(key_id)) is not None:
            self._db.keys[key_id] = replace(record, retired=True)

    async def append_audit(self, records: Sequence[AuditRecord]) -> None:
        if not records:
            return
        self._check_open()
        if not all(map(_storable, records)):
            # As the other stores refuse a record they cannot encode (a lone surrogate): the whole batch.
            raise errors.StoreRejected(STORE_REJECTED_MESSAGE)
        self._db.append_audit(records)

    async def list_audit(self, organization_id: str, before_id: int, limit: int) -> list[AuditEntry]:
        self._check_open()
        if limit < 1:
            return []
        newest_first = (
            entry
            for entry in reversed(self._db.audit)
            if (before_id <= 0 or entry.id < before_id)
            and (not organization_id or entry.record.organization_id == organization_id)
        )
        return [AuditEntry(entry.id, _copy_record(entry.record)) for entry in itertools.islice(newest_first, limit)]

    def changes(self) -> ChangeFeed:
        return self._changes

    async def close(self) -> None:
        self._closed = True
        self._db.feeds.discard(self._changes)
        self._changes.close()

    def _check_open(self) -> None:
        # Like a closed pool: every later call fails as the database being unreachable would.
        if self._closed:
            raise errors.Unavailable(CLOSED_MESSAGE)


def _storable(record: AuditRecord) -> bool:
    texts = (
        record.caller,
        record.action,
        record.outcome,
        record.organization_id,
        record.provider,
        record.request_id,
        *record.fields,
        *record.details.keys(),
        *record.details.values(),
    )
    try:
        for text in texts:
            text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _utc(moment: datetime) -> datetime:
    return (moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)).astimezone(UTC)


def _copy(row: StoredIntegration) -> StoredIntegration:
    """Callers get their own mapping: nothing they do to it reaches the stored row (an unreadable one stays so)."""
    if isinstance(row.config, UnreadableConfig):
        return row
    return replace(row, config=dict(row.config))


def _copy_record(record: AuditRecord) -> AuditRecord:
    return replace(record, fields=tuple(record.fields), details=dict(record.details))
