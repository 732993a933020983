"""Persistence of encrypted integration rows. The store only ever sees ciphertext."""

from integrations_service.store.base import IntegrationStore, Mutation, Precondition, StoredIntegration

__all__ = ["IntegrationStore", "Mutation", "Precondition", "StoredIntegration"]
