"""Keeping the keyring honest against the data: the start-up key check and the nonce budget.

At start-up every configured key is registered with its check value (an HMAC
that proves which key it is without revealing it). A configured key whose
check value differs from the stored one, or a key the data still needs that
is not configured, stops the start with a message naming the key ids.

Random 96-bit nonces allow 2**32 encryptions per key (NIST SP 800-38D). The
count of each key's encryptions is kept in the store (flushed every few
seconds and at shutdown), a warning is logged from a quarter of the budget on,
and an encryption that would go past the budget is refused. The store's count
is the sum over every replica and run; each flush reads it back, so a replica
also counts what the others saved. What a replica has not flushed yet is not
seen by the others, and a process killed without its shutdown flush loses at
most one flush interval of counts: the budget can be overrun by that much,
which is negligible next to 2**32 (the bound NIST sets is itself conservative).
"""

from __future__ import annotations

import logging
from collections import Counter

from integrations_service.crypto import NONCE_LIMIT, ValueCipher
from integrations_service.domain.periodic import PeriodicFlush
from integrations_service.errors import ConfigurationError, FailedPrecondition, Unavailable
from integrations_service.store import IntegrationStore, KeyRecord

log = logging.getLogger("integrations.keys")

WARN_AT_ENCRYPTIONS = NONCE_LIMIT // 4
FLUSH_INTERVAL_SECONDS = 10.0


def check_keys(records: list[KeyRecord], cipher: ValueCipher) -> None:
    """Raise ConfigurationError unless the configured keys are those the data was written with."""
    mine = cipher.check_values()
    problems = [
        f"configured key {r.key_id!r} is not the key the stored data was encrypted with (check value differs)"
        for r in records
        if r.key_id in mine and r.check_value != mine[r.key_id]
    ]
    problems += [
        f"configured key {key_id!r} is the key the store knows as {r.key_id!r}: one key under two ids would get "
        "a second nonce budget, and a rotation to it changes nothing; generate a new key (`integrations-service "
        "gen-key`)"
        for key_id, check_value in mine.items()
        for r in records
        if r.key_id != key_id and r.check_value == check_value
    ]
    active = cipher.active_key_id
    if any(r.key_id == active and r.retired for r in records):
        problems.append(
            f"the active key {active!r} is retired: values it encrypts would become unreadable once it is "
            "dropped from the keyring, which a retired key may be; make a new key active instead"
        )
    if missing := sorted(r.key_id for r in records if not r.retired and r.key_id not in mine):
        keys, are, them = ("key", "is", "it") if len(missing) == 1 else ("keys", "are", "them")
        problems.append(
            f"{keys} {', '.join(map(repr, missing))} {are} not configured but not retired either: stored values "
            f"may still need {them} (configure {them}, or rotate and then retire {them})"
        )
    if problems:
        raise ConfigurationError("encryption keys do not match the store:\n  " + "\n  ".join(problems))


class EncryptionCounter:
    """The cipher's monitor (`ValueCipher(keyring, monitor=...)`): encryptions per key not yet saved to the store.

    It also enforces the nonce budget: told (by `KeyUsage`) how many encryptions each key had before the unsaved
    ones, it refuses the one that would exceed `limit`.
    """

    def __init__(self, limit: int = NONCE_LIMIT) -> None:
        self._unsaved: Counter[str] = Counter()
        self._before: dict[str, int] = {}
        self._limit = limit

    def encrypted(self, key_id: str) -> None:
        if self._before.get(key_id, 0) + self._unsaved[key_id] >= self._limit:
            raise FailedPrecondition(
                f"the encryption key {key_id!r} has used its whole random-nonce budget ({self._limit} encryptions, "
                "NIST SP 800-38D): no more values are encrypted under it; make a new key active"
            )
        self._unsaved[key_id] += 1

    def counted_elsewhere(self, totals: dict[str, int]) -> None:
        """Per key, the encryptions not among the unsaved ones: saved in the store, or being saved."""
        self._before = totals

    @property
    def unsaved(self) -> Counter[str]:
        return self._unsaved.copy()

    def take(self) -> Counter[str]:
        """The unsaved counts, now the caller's to save (or to `give_back`)."""
        taken, self._unsaved = self._unsaved, Counter()
        return taken

    def give_back(self, counts: Counter[str]) -> None:
        self._unsaved.update(counts)


class KeyUsage:
    """Registers keys at start-up, then keeps the per-key encryption counts in the store."""

    def __init__(self, store: IntegrationStore, cipher: ValueCipher, counter: EncryptionCounter) -> None:
        self._store = store
        self._cipher = cipher
        self._counter = counter
        # Taken from the counter and being saved: still counted by `totals` until the store has them.
        self._saving: Counter[str] = Counter()
        self._stored_totals: dict[str, int] = {}
        self._periodic = PeriodicFlush(self.flush, FLUSH_INTERVAL_SECONDS, "key-usage-flush")

    async def verify(self) -> None:
        # Check against what is stored before recording anything: a start refused for another reason must not
        # leave a new key's (possibly mistyped) check value behind. Then check again, in case another replica
        # registered the same new key id at the same time.
        check_keys(await self._store.list_keys(), self._cipher)
        records = await self._store.register_keys(self._cipher.check_values())
        check_keys(records, self._cipher)
        self._stored_totals = {r.key_id: r.encryptions for r in records}
        self._publish()
        self._warn_if_worn()

    def totals(self) -> dict[str, int]:
        """Encryptions per key over its whole life: stored count plus this process's unflushed ones."""
        unflushed = self._counter.unsaved + self._saving
        return {
            key_id: self._stored_totals.get(key_id, 0) + unflushed.get(key_id, 0) for key_id in self._cipher.key_ids
        }

    async def flush(self) -> None:
        """Save this process's new counts, then read back the store's, which hold the other replicas' too."""
        before = self._stored_totals.get(self._cipher.active_key_id, 0)
        if delta := self._counter.take():
            self._saving.update(delta)
            self._publish()
            try:
                await self._store.add_encryptions(dict(delta))
            except BaseException as error:
                self._counter.give_back(delta)  # counted again at the next flush
                if isinstance(error, Unavailable):
                    return
                raise
            finally:
                self._saving.subtract(delta)
                self._publish()
            for key_id, count in delta.items():
                self._stored_totals[key_id] = self._stored_totals.get(key_id, 0) + count
            self._publish()
        try:
            records = await self._store.list_keys()
        except Unavailable:
            records = []
        for r in records:
            # Never below what this process knows it saved: a count only grows.
            self._stored_totals[r.key_id] = max(r.encryptions, self._stored_totals.get(r.key_id, 0))
        self._publish()
        if self._stored_totals.get(self._cipher.active_key_id, 0) != before:
            self._warn_if_worn()

    def _publish(self) -> None:
        """Tell the counter what is counted outside it, so it refuses the encryption past the nonce budget."""
        self._counter.counted_elsewhere(
            {key_id: self._stored_totals.get(key_id, 0) + self._saving[key_id] for key_id in self._cipher.key_ids}
        )

    def start(self) -> None:
        self._periodic.start()

    async def close(self) -> None:
        """Stop the flush task and save the counts once more; say so when the store did not take them."""
        await self._periodic.close()
        if unsaved := sum(self._counter.unsaved.values()):
            log.error(
                "the store did not take the last encryption counts before shutdown: %d encryptions are not "
                "counted against their keys' nonce budget",
                unsaved,
                extra={"event": "key_usage_unsaved", "count": unsaved},
            )

    def _warn_if_worn(self) -> None:
        active = self._cipher.active_key_id
        used = self._stored_totals.get(active, 0)
        if used >= WARN_AT_ENCRYPTIONS:
            log.warning(
                "the active encryption key has used %.1f%% of its random-nonce budget (2**32, NIST SP 800-38D): "
                "rotate to a new key",
                100 * used / NONCE_LIMIT,
                extra={"event": "key_wear", "key_id": active, "count": used},
            )
