"""Helpers of the domain's fast test seam (the fixtures are in conftest.py): keys, ciphers, stored rows.

The keys are the suite's test keys, which the leak watch searches every log
record for.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime

from integrations_service.crypto import DEFAULT_KEY_ID, EncryptionKey, Keyring, ValueCipher, ValueContext
from integrations_service.domain.audit import Caller
from integrations_service.domain.service import CredentialService
from integrations_service.store import AuditRecord, StoredIntegration
from integrations_service.store.memory import MemoryDatabase
from tests.harness import OTHER_KEY, TEST_KEY

OLD_KEY = EncryptionKey.from_text(TEST_KEY)
NEW_KEY = EncryptionKey.from_text(OTHER_KEY)
# The key rotated to. The old key keeps the id `default`: the dashboard's enc:v1 values are read with it.
NEW_KEY_ID = "k2"
OLD_KEY_ID = DEFAULT_KEY_ID
CALLER = Caller("cli:unit-test@tester", request_id="req-unit-1")
FIXED_TIME = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
# make_service(environment=None, legacy=None): a CredentialService over the test's store, cipher and audit trail.
ServiceFactory = Callable[..., CredentialService]


def cipher_of(*keys: tuple[str, EncryptionKey]) -> ValueCipher:
    """A real cipher over a keyring of these keys, the first one active."""
    return ValueCipher(Keyring(list(keys)))


def old_cipher() -> ValueCipher:
    """The keyring before a rotation: only the old key."""
    return cipher_of((OLD_KEY_ID, OLD_KEY))


def rotated_cipher() -> ValueCipher:
    """The keyring during a rotation: the new key active, the old one still there to read with."""
    return cipher_of((NEW_KEY_ID, NEW_KEY), (OLD_KEY_ID, OLD_KEY))


def put_row(database: MemoryDatabase, organization_id: str, provider: str, config: Mapping[str, str]) -> str:
    """Store a row as a database would hold it (values given as stored); returns its id.

    Ids sort in the order rows are put, so scans meet them in that order.
    """
    row_id = f"row-{len(database.rows):04d}-{organization_id}-{provider}"
    database.rows[(organization_id, provider)] = StoredIntegration(
        row_id, organization_id, provider, dict(config), 1, FIXED_TIME, FIXED_TIME
    )
    return row_id


def sealed(cipher: ValueCipher, organization_id: str, provider: str, values: Mapping[str, str]) -> dict[str, str]:
    """`values` encrypted as the service stores them: enc:v2 under the cipher's active key, bound to their field."""
    return {k: cipher.encrypt(v, ValueContext(organization_id, provider, k)) for k, v in values.items()}


def stored_config(database: MemoryDatabase, organization_id: str, provider: str) -> dict[str, str]:
    return dict(database.rows[(organization_id, provider)].config)


def stored_clear(database: MemoryDatabase, cipher: ValueCipher, organization_id: str, provider: str) -> dict[str, str]:
    """A stored row's values decrypted, each with the context it must be bound to."""
    config = stored_config(database, organization_id, provider)
    return {k: cipher.decrypt(v, ValueContext(organization_id, provider, k)) for k, v in config.items()}


async def listed_status(
    service: CredentialService, organization_id: str, provider: str
) -> tuple[bool | None, bool | None]:
    """(configured, ready) of one provider as ListProviders answers it for the organization."""
    [status] = [s for s in await service.list_providers(organization_id, None) if s.spec.id == provider]
    return status.configured, status.ready


def audit_records(database: MemoryDatabase, action: str | None = None) -> list[AuditRecord]:
    """What the store's audit trail holds, oldest first (optionally of one RPC or action)."""
    return [entry.record for entry in database.audit if action is None or entry.record.action == action]
