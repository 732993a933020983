"""The repository contract that the PostgreSQL and embedded stores implement.

A store keeps one row per (organization, provider): a mapping of field key to
the *stored* (encrypted) value, a version that grows with every write, and
timestamps. Encryption happens above the store (the domain layer), so a store,
its logs and its database only ever see ciphertext.

Writes that depend on the current row (merging fields, etag checks, cross-field
rules) run as a callback *inside* the store's transaction, with the row locked,
so concurrent saves to the same organization and provider serialize and never
lose a field. A callback that raises aborts the transaction: nothing changes.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class StoredIntegration:
    """One organization's stored credentials for one provider (ciphertext only)."""

    id: str
    organization_id: str
    provider: str
    config: Mapping[str, str]
    version: int
    created_at: datetime
    updated_at: datetime


# Given the current row (None when there is none), return the new config to
# store, or raise to abort the write.
Mutation = Callable[[StoredIntegration | None], Mapping[str, str]]
# Given the current row, raise to refuse the delete.
Precondition = Callable[[StoredIntegration], None]


class IntegrationStore(abc.ABC):
    """Async repository of `StoredIntegration` rows.

    Every method raises `errors.Unavailable` when the backing database cannot be
    reached, and recovers by itself once it can be again.
    """

    @abc.abstractmethod
    async def get(self, organization_id: str, provider: str) -> StoredIntegration | None:
        """The row of one organization and provider, or None."""

    @abc.abstractmethod
    async def list_for_organization(self, organization_id: str) -> list[StoredIntegration]:
        """Every row of one organization, in one query."""

    @abc.abstractmethod
    async def upsert(self, organization_id: str, provider: str, mutate: Mutation) -> StoredIntegration:
        """Atomically replace the row's config with `mutate(current)`.

        Inserts the row (version 1) when there is none, else bumps its version
        and update time. `mutate` runs with the row locked against concurrent
        writers of the same organization and provider.
        """

    @abc.abstractmethod
    async def delete(self, organization_id: str, provider: str, check: Precondition) -> bool:
        """Delete the row after `check(current)` passes; False when there was none."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections. The store is unusable afterwards."""
