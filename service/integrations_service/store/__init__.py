"""Persistence of encrypted integration rows. The store only ever sees ciphertext."""

from integrations_service.store.base import (
    AuditEntry,
    AuditRecord,
    IntegrationStore,
    KeyRecord,
    Mutation,
    PoolStats,
    Precondition,
    Rewrite,
    StoredIntegration,
    StoredValue,
    UnreadableConfig,
)

__all__ = [
    "AuditEntry",
    "AuditRecord",
    "IntegrationStore",
    "KeyRecord",
    "Mutation",
    "PoolStats",
    "Precondition",
    "Rewrite",
    "StoredIntegration",
    "StoredValue",
    "UnreadableConfig",
]
