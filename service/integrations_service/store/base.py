"""The repository contract that the PostgreSQL and embedded stores implement.

A store keeps one row per (organization, provider): a mapping of field key to
the *stored* (encrypted) value, a version that grows with every write, and
timestamps. Encryption happens above the store, in the sealing layer
(`integrations_service.sealing`), so a store, its logs and its database only
ever see ciphertext. The type says so: a stored value is a `StoredValue`, which
only the sealing layer creates from clear text (and a store's row decoding from
what its database holds), so mypy rejects a clear-text `str` handed to a store.

Writes that depend on the current row (merging fields, etag checks, cross-field
rules) run as a callback on the current row, and what it returns is written only
if the row is still that row: with the row locked, or (PostgreSQL, a row that
exists) by a write that checks the row is unchanged and otherwise runs the
callback again on the row as it found it. Either way concurrent saves to the same
organization and provider serialize and never lose a field. A callback that
raises aborts the write: nothing changes.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, NewType

if TYPE_CHECKING:
    from integrations_service.store.changes import ChangeFeed


# A value as the store holds it: enc:v2 ciphertext, or a legacy value read from the database.
StoredValue = NewType("StoredValue", str)


@dataclass(frozen=True)
class StoredIntegration:
    """One organization's stored credentials for one provider (ciphertext only)."""

    id: str
    organization_id: str
    provider: str
    config: Mapping[str, StoredValue]
    version: int
    created_at: datetime
    updated_at: datetime


class UnreadableConfig(Mapping[str, StoredValue]):
    """Stands in for a stored config that is not a JSON object: it holds no values, and says why.

    The store returns it rather than failing, so one bad row cannot break a
    listing of its organization or a scan of the table; reading the row's
    values is refused (DATA_LOSS) above the store.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __getitem__(self, key: str) -> StoredValue:
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


@dataclass(frozen=True)
class AuditRecord:
    """One audit event. Never holds a credential value: at most keyed HMAC fingerprints."""

    time: datetime
    caller: str
    # What was done: an RPC's name (SaveIntegration) or a command's (RotateKeys); the database column is `rpc`.
    action: str
    outcome: str
    organization_id: str = ""
    provider: str = ""
    fields: tuple[str, ...] = ()
    request_id: str = ""
    # Small, non-secret facts: value fingerprints, rotation batch counts, the reason of a refusal.
    details: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AuditEntry:
    """An audit record as stored, with its position in the trail (grows with every record)."""

    id: int
    record: AuditRecord


@dataclass(frozen=True)
class PoolStats:
    size: int
    idle: int
    max_size: int


@dataclass(frozen=True)
class KeyRecord:
    """What the store knows of one encryption key: never the key, only its check value."""

    key_id: str
    check_value: str
    encryptions: int
    retired: bool


# Given the current row (None when there is none), return the new config to
# store, or raise to abort the write.
Mutation = Callable[[StoredIntegration | None], Mapping[str, StoredValue]]
# Given the current row, raise to refuse the delete.
Precondition = Callable[[StoredIntegration], None]
# Given a row, return its re-encrypted config, or None to leave it as it is.
Rewrite = Callable[[StoredIntegration], Mapping[str, StoredValue] | None]


class IntegrationStore(abc.ABC):
    """Async repository of `StoredIntegration` rows.

    Every method raises `errors.Unavailable` when the backing database cannot be
    reached, and recovers by itself once it can be again.

    Every method answers within the store's timeout (INTEGRATIONS_DB_TIMEOUT), or
    sooner when the RPC's deadline (`deadlines.call_deadline`) is nearer: all of
    its waits together (its turn behind writers of the same row, a connection,
    locks, statements) count against one budget (`store.budget`). A call that
    runs out raises `errors.Unavailable` naming the timeout and changes nothing.
    """

    async def ping(self) -> None:
        """Return when the database answers a query; raise `errors.Unavailable` when it does not (readiness).

        By default, asks for a row that cannot exist; stores with a cheaper check override it.
        """
        await self.get("", "")

    @abc.abstractmethod
    async def get(self, organization_id: str, provider: str) -> StoredIntegration | None:
        """The row of one organization and provider, or None."""

    @abc.abstractmethod
    async def list_for_organization(self, organization_id: str) -> list[StoredIntegration]:
        """Every row of one organization, in one query."""

    @abc.abstractmethod
    async def upsert(
        self, organization_id: str, provider: str, mutate: Mutation, audit: AuditRecord | None = None
    ) -> StoredIntegration:
        """Atomically replace the row's config with `mutate(current)`.

        Inserts the row (version 1) when there is none, else bumps its version
        and update time. What `mutate` returns is written only if no concurrent
        writer of the same organization and provider changed the row since
        `mutate` was given it; `mutate` may run more than once (again on the row
        as another writer left it), so it must not have effects of its own. Its
        exception is final only when raised on the row as stored. `audit`, when
        given, is appended in the same transaction, so it exists exactly when the
        change does.
        """

    @abc.abstractmethod
    async def delete(
        self, organization_id: str, provider: str, check: Precondition, audit: AuditRecord | None = None
    ) -> bool:
        """Delete the row after `check(current)` passes; False when there was none.

        `audit` is appended in the same transaction when a row was deleted.
        """

    # --- rotation -----------------------------------------------------------------------------------

    @abc.abstractmethod
    async def scan(self, after_id: str, limit: int) -> list[StoredIntegration]:
        """Up to `limit` rows with id > `after_id` ("" for the start), in id order."""

    @abc.abstractmethod
    async def rewrap(self, ids: Sequence[str], rewrite: Rewrite, audit: AuditRecord | None = None) -> int:
        """In one transaction, lock the rows with these ids, store `rewrite(row)` where it is not None.

        Returns how many rows changed. Only the ciphertext changes: version,
        etag and update time stay, since the values are the same. Rows deleted
        meanwhile are skipped. `audit` is appended in the same transaction.
        """

    # --- keys ---------------------------------------------------------------------------------------

    @abc.abstractmethod
    async def list_keys(self) -> list[KeyRecord]:
        """Every key record, retired ones too, in key id order; changes nothing."""

    @abc.abstractmethod
    async def register_keys(self, check_values: Mapping[str, str]) -> list[KeyRecord]:
        """Record keys not known yet (with 0 encryptions); return every key record, retired ones too.

        A key id already known keeps its stored check value: the caller compares.
        """

    @abc.abstractmethod
    async def add_encryptions(self, counts: Mapping[str, int]) -> None:
        """Add to the per-key encryption counters (the NIST SP 800-38D nonce budget)."""

    @abc.abstractmethod
    async def retire_key(self, key_id: str) -> None:
        """Mark a key retired: no longer needed to read any row."""

    # --- audit --------------------------------------------------------------------------------------

    @abc.abstractmethod
    async def append_audit(self, records: Sequence[AuditRecord]) -> None:
        """Append records that are not part of a change (reads, refusals, denials)."""

    @abc.abstractmethod
    async def list_audit(self, organization_id: str, before_id: int, limit: int) -> list[AuditEntry]:
        """Newest first: up to `limit` entries with id < `before_id` (0: from the newest),
        only those of `organization_id` unless it is empty."""

    def pool_stats(self) -> PoolStats | None:
        """Connection pool use, for metrics; None for stores without a pool."""
        return None

    def changes(self) -> ChangeFeed | None:
        """The feed of committed row changes (store/changes.py); None for a store that cannot tell."""
        return None

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections. The store is unusable afterwards."""
