"""The key ledger against the keyring (start-up check) and the nonce budget, on the in-memory store."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import pytest

from integrations_service.crypto import NONCE_LIMIT, EncryptionKey, Keyring, ValueCipher, ValueContext
from integrations_service.domain.key_ledger import WARN_AT_ENCRYPTIONS, EncryptionCounter, KeyUsage, check_keys
from integrations_service.errors import ConfigurationError, FailedPrecondition, Unavailable
from integrations_service.store import KeyRecord
from integrations_service.store.memory import MemoryDatabase, MemoryStore
from tests.unit.seam import NEW_KEY, NEW_KEY_ID, OLD_KEY, OLD_KEY_ID, cipher_of, old_cipher, rotated_cipher

CONTEXT = ValueContext("org-a", "resend", "apiKey")
OLD_CHECK = old_cipher().check_values()[OLD_KEY_ID]
NEW_CHECK = rotated_cipher().check_values()[NEW_KEY_ID]
# The check value the old key's id would have if another key had been registered under it.
WRONG_CHECK = cipher_of((OLD_KEY_ID, EncryptionKey.generate())).check_values()[OLD_KEY_ID]


@pytest.fixture
def counter() -> EncryptionCounter:
    return EncryptionCounter()


@pytest.fixture
def cipher(counter: EncryptionCounter) -> ValueCipher:
    """The rotated keyring (conftest's cipher), telling `counter` of each encryption, as the wiring does."""
    return ValueCipher(Keyring([(NEW_KEY_ID, NEW_KEY), (OLD_KEY_ID, OLD_KEY)]), monitor=counter)


def record(key_id: str, check_value: str, retired: bool = False, encryptions: int = 0) -> KeyRecord:
    return KeyRecord(key_id, check_value, encryptions, retired)


@pytest.mark.parametrize(
    ("records", "problems"),
    [
        pytest.param([], [], id="first start"),
        pytest.param([record(OLD_KEY_ID, OLD_CHECK)], [], id="the old key, still configured"),
        pytest.param([record(OLD_KEY_ID, OLD_CHECK), record(NEW_KEY_ID, NEW_CHECK)], [], id="both keys"),
        pytest.param([record("dropped", "x" * 64, retired=True)], [], id="a retired key may be dropped"),
        pytest.param(
            [record(OLD_KEY_ID, WRONG_CHECK)],
            [f"configured key {OLD_KEY_ID!r} is not the key the stored data was encrypted with"],
            id="another key under a known id",
        ),
        pytest.param(
            [record(NEW_KEY_ID, NEW_CHECK, retired=True)],
            [f"the active key {NEW_KEY_ID!r} is retired"],
            id="the active key retired",
        ),
        pytest.param(
            [record("lost-1", "x" * 64), record("lost-2", "y" * 64)],
            ["keys 'lost-1', 'lost-2' are not configured but not retired either"],
            id="keys the data may need, not configured",
        ),
        pytest.param(
            [record("k2025", NEW_CHECK, retired=True)],
            [f"configured key {NEW_KEY_ID!r} is the key the store knows as 'k2025'"],
            id="a known key under a new id: a rotation that changes nothing, and a fresh nonce budget",
        ),
        pytest.param(
            [record(OLD_KEY_ID, WRONG_CHECK), record(NEW_KEY_ID, NEW_CHECK, retired=True), record("lost", "z" * 64)],
            ["is not the key the stored data", f"the active key {NEW_KEY_ID!r} is retired", "key 'lost' is not"],
            id="every problem at once",
        ),
    ],
)
def test_the_start_up_key_check(records: list[KeyRecord], problems: list[str]) -> None:
    if not problems:
        check_keys(records, rotated_cipher())
        return
    with pytest.raises(ConfigurationError) as refused:
        check_keys(records, rotated_cipher())
    lines = str(refused.value).splitlines()[1:]
    assert len(lines) == len(problems), lines
    for line, problem in zip(lines, problems, strict=True):
        assert problem in line


def test_the_key_check_never_shows_key_material() -> None:
    with pytest.raises(ConfigurationError) as refused:
        check_keys([record(OLD_KEY_ID, WRONG_CHECK)], rotated_cipher())
    text = str(refused.value)
    for material in (OLD_KEY.material, NEW_KEY.material):
        assert material.hex() not in text


async def test_verify_registers_every_configured_key_with_its_check_value(
    database: MemoryDatabase, store: MemoryStore, cipher: ValueCipher, counter: EncryptionCounter
) -> None:
    await KeyUsage(store, cipher, counter).verify()

    assert database.keys == {
        NEW_KEY_ID: record(NEW_KEY_ID, NEW_CHECK),
        OLD_KEY_ID: record(OLD_KEY_ID, OLD_CHECK),
    }


async def test_a_refused_start_registers_nothing(database: MemoryDatabase, store: MemoryStore) -> None:
    """A new key configured next to a mistyped old one is not recorded: the operator fixes the keyring first."""
    # The store now knows the wrong key as default.
    await KeyUsage(store, cipher_of((OLD_KEY_ID, NEW_KEY)), EncryptionCounter()).verify()

    with pytest.raises(ConfigurationError, match="check value differs"):
        await KeyUsage(store, rotated_cipher(), EncryptionCounter()).verify()

    assert set(database.keys) == {OLD_KEY_ID}
    assert database.keys[OLD_KEY_ID].check_value == NEW_CHECK  # a check value does not depend on the id


def encrypt(cipher: ValueCipher, times: int) -> None:
    for n in range(times):
        cipher.encrypt(f"value {n}", CONTEXT)


async def test_totals_are_the_stored_count_plus_this_process_unflushed_encryptions(
    database: MemoryDatabase, store: MemoryStore, cipher: ValueCipher, counter: EncryptionCounter
) -> None:
    await store.register_keys(cipher.check_values())
    await store.add_encryptions({NEW_KEY_ID: 40, OLD_KEY_ID: 7})  # other replicas, earlier runs
    usage = KeyUsage(store, cipher, counter)
    await usage.verify()

    encrypt(cipher, 3)
    assert usage.totals() == {NEW_KEY_ID: 43, OLD_KEY_ID: 7}
    assert database.keys[NEW_KEY_ID].encryptions == 40

    await usage.flush()
    assert database.keys[NEW_KEY_ID].encryptions == 43
    assert usage.totals() == {NEW_KEY_ID: 43, OLD_KEY_ID: 7}

    await usage.flush()  # nothing new: nothing added twice
    encrypt(cipher, 2)
    await usage.flush()
    assert (database.keys[NEW_KEY_ID].encryptions, database.keys[OLD_KEY_ID].encryptions) == (45, 7)


class OutageStore(MemoryStore):
    """The in-memory store with the nonce ledger unreachable while `down` is set."""

    down = False

    async def add_encryptions(self, counts: Mapping[str, int]) -> None:
        if self.down:
            raise Unavailable("the credential store (in memory) is down")
        await super().add_encryptions(counts)


async def test_encryptions_a_failed_flush_could_not_store_are_stored_by_the_next(
    database: MemoryDatabase, cipher: ValueCipher, counter: EncryptionCounter
) -> None:
    store = OutageStore(database)
    usage = KeyUsage(store, cipher, counter)
    await usage.verify()
    encrypt(cipher, 4)

    store.down = True
    await usage.flush()  # no error: the count waits
    assert database.keys[NEW_KEY_ID].encryptions == 0
    assert usage.totals()[NEW_KEY_ID] == 4

    store.down = False
    encrypt(cipher, 1)
    await usage.flush()
    assert database.keys[NEW_KEY_ID].encryptions == 5


def wear_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == "key_wear"]


async def test_the_wear_warning_starts_at_a_quarter_of_the_nonce_budget(
    database: MemoryDatabase,
    store: MemoryStore,
    cipher: ValueCipher,
    counter: EncryptionCounter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert WARN_AT_ENCRYPTIONS == NONCE_LIMIT // 4 == 2**30
    await store.register_keys(cipher.check_values())
    await store.add_encryptions({NEW_KEY_ID: WARN_AT_ENCRYPTIONS - 2})
    caplog.set_level(logging.WARNING, logger="integrations.keys")
    usage = KeyUsage(store, cipher, counter)

    await usage.verify()
    encrypt(cipher, 1)
    await usage.flush()
    assert wear_warnings(caplog) == []  # one short of a quarter

    encrypt(cipher, 1)
    await usage.flush()
    [warning] = wear_warnings(caplog)
    assert (warning.key_id, warning.count) == (NEW_KEY_ID, WARN_AT_ENCRYPTIONS)  # type: ignore[attr-defined]
    assert "25.0%" in warning.getMessage()


async def test_a_worn_active_key_is_reported_at_start_and_a_worn_old_key_is_not(
    store: MemoryStore, caplog: pytest.LogCaptureFixture
) -> None:
    await store.register_keys(old_cipher().check_values())
    await store.add_encryptions({OLD_KEY_ID: NONCE_LIMIT // 2})
    caplog.set_level(logging.WARNING, logger="integrations.keys")

    await KeyUsage(store, old_cipher(), EncryptionCounter()).verify()
    [warning] = wear_warnings(caplog)
    assert warning.key_id == OLD_KEY_ID  # type: ignore[attr-defined]
    assert "50.0%" in warning.getMessage()

    caplog.clear()
    await KeyUsage(store, rotated_cipher(), EncryptionCounter()).verify()
    assert wear_warnings(caplog) == []  # the worn key no longer encrypts: the rotation answered the warning


async def test_no_encryption_under_a_key_whose_nonce_budget_is_spent(
    store: MemoryStore, cipher: ValueCipher, counter: EncryptionCounter
) -> None:
    """2**32 random nonces per key is NIST's cap: past it the service refuses to encrypt, not just warns."""
    await store.register_keys(cipher.check_values())
    await store.add_encryptions({NEW_KEY_ID: NONCE_LIMIT - 2})
    usage = KeyUsage(store, cipher, counter)
    await usage.verify()

    encrypt(cipher, 2)  # the last two of the budget
    with pytest.raises(FailedPrecondition, match="nonce budget"):
        cipher.encrypt("one too many", CONTEXT)
    await usage.flush()
    assert {r.key_id: r.encryptions for r in await store.list_keys()}[
        NEW_KEY_ID
    ] == NONCE_LIMIT  # the refused one was not counted as used
    with pytest.raises(FailedPrecondition):
        cipher.encrypt("still too many", CONTEXT)


async def test_the_budget_counts_what_other_replicas_saved_since_the_start(
    database: MemoryDatabase, store: MemoryStore, cipher: ValueCipher, counter: EncryptionCounter
) -> None:
    """Each replica counts its own encryptions; the store holds the sum, which every flush reads back."""
    usage = KeyUsage(store, cipher, counter)
    await usage.verify()
    await store.add_encryptions({NEW_KEY_ID: NONCE_LIMIT - 1})  # another replica's, after this one started
    await usage.flush()  # nothing of its own to save: it still learns the store's count
    assert usage.totals()[NEW_KEY_ID] == NONCE_LIMIT - 1
    encrypt(cipher, 1)
    with pytest.raises(FailedPrecondition):
        cipher.encrypt("one too many", CONTEXT)
