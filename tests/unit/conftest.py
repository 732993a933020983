"""The domain's fast test seam: real ciphers and keyrings, the in-memory store, a service factory.

Nothing here opens a socket or a database: the domain runs against
`MemoryStore` (proven by the store contract suite), with the real cipher and
the real audit trail, so a unit test checks what an RPC would do, in
milliseconds. Helpers (keys, stored rows) are in tests/unit/seam.py.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from integrations_service.crypto import ValueCipher
from integrations_service.domain.audit import AuditTrail
from integrations_service.domain.service import CredentialService
from integrations_service.sealing import LegacyPolicy, Sealer
from integrations_service.store.memory import MemoryDatabase, MemoryStore
from tests.unit.seam import FIXED_TIME, ServiceFactory, rotated_cipher


@pytest.fixture
def cipher() -> ValueCipher:
    return rotated_cipher()


@pytest.fixture
def database() -> MemoryDatabase:
    return MemoryDatabase(clock=lambda: FIXED_TIME)


@pytest.fixture
def store(database: MemoryDatabase) -> MemoryStore:
    return MemoryStore(database)


@pytest.fixture
def audit(store: MemoryStore) -> AuditTrail:
    return AuditTrail(store, clock=lambda: FIXED_TIME)


@pytest.fixture
def make_service(store: MemoryStore, cipher: ValueCipher, audit: AuditTrail) -> ServiceFactory:
    """A CredentialService over the test's store, cipher and audit trail; environment and legacy policy vary."""

    def make(environment: Mapping[str, str] | None = None, legacy: LegacyPolicy | None = None) -> CredentialService:
        return CredentialService(store, Sealer(cipher, legacy or LegacyPolicy()), environment or {}, audit)

    return make
