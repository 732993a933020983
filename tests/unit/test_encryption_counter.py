"""The nonce budget: the cipher tells its EncryptionCounter of each encryption; KeyUsage saves the counts."""

from __future__ import annotations

from collections.abc import Mapping

from integrations_service.crypto import EncryptionKey, Keyring, ValueCipher, ValueContext
from integrations_service.domain.key_ledger import EncryptionCounter, KeyUsage
from integrations_service.errors import Unavailable
from integrations_service.store.memory import MemoryStore

CONTEXT = ValueContext("org_1", "stripe", "secretKey")


class FlakyStore(MemoryStore):
    """The embedded memory store, down for `add_encryptions` while `down` is set."""

    down = False

    async def add_encryptions(self, counts: Mapping[str, int]) -> None:
        if self.down:
            raise Unavailable("the store is down")
        await super().add_encryptions(counts)


async def key_usage(store: MemoryStore) -> tuple[ValueCipher, KeyUsage]:
    counter = EncryptionCounter()
    cipher = ValueCipher(Keyring([("new", EncryptionKey.generate()), ("old", EncryptionKey.generate())]), counter)
    usage = KeyUsage(store, cipher, counter)
    await usage.verify()
    return cipher, usage


async def stored_counts(store: MemoryStore) -> dict[str, int]:
    return {record.key_id: record.encryptions for record in await store.list_keys()}


async def test_encryptions_are_counted_before_and_after_they_are_saved() -> None:
    store = MemoryStore()
    cipher, usage = await key_usage(store)
    for _ in range(3):
        cipher.encrypt("sk_test_1", CONTEXT)
    assert usage.totals() == {"new": 3, "old": 0}
    assert await stored_counts(store) == {"new": 0, "old": 0}
    await usage.flush()
    assert await stored_counts(store) == {"new": 3, "old": 0}
    cipher.encrypt("sk_test_1", CONTEXT)
    assert usage.totals() == {"new": 4, "old": 0}
    await usage.flush()
    await usage.flush()  # nothing new: nothing added twice
    assert await stored_counts(store) == {"new": 4, "old": 0}


async def test_counts_the_store_did_not_take_are_saved_by_the_next_flush() -> None:
    store = FlakyStore()
    cipher, usage = await key_usage(store)
    cipher.encrypt("sk_test_1", CONTEXT)
    store.down = True
    await usage.flush()
    cipher.encrypt("sk_test_1", CONTEXT)
    assert usage.totals() == {"new": 2, "old": 0}
    store.down = False
    await usage.flush()
    assert await stored_counts(store) == {"new": 2, "old": 0}
    assert usage.totals() == {"new": 2, "old": 0}
