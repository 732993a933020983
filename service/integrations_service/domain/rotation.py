"""Online key rotation: re-encrypt every stored value under the active key.

Values that are plaintext, `enc:v1:`, or `enc:v2:` under another key are
decrypted and written as `enc:v2:` under the active key; values already under
it are decrypted too, to check them (a damaged or moved value is reported as
undecryptable, never counted as rotated), and left alone, so a second run
changes nothing and a crashed run simply resumes where it left off. Legacy values (plaintext, `enc:v1:`) are counted,
so the report says when INTEGRATIONS_LEGACY_VALUES can become `refuse`; once it
is `refuse`, rotation leaves them as they are (an attacker's planted plaintext
must not become genuine `enc:v2:`) and reports them as remaining. Rows are processed in batches, each in its own
transaction with the rows locked, so a concurrent SaveIntegration is never
overwritten. Only ciphertext changes: a row's etag stays the same.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from integrations_service.crypto import (
    LEGACY_PLAINTEXT,
    LEGACY_V1,
    InvalidCiphertext,
    ValueContext,
    key_id_of,
    legacy_format,
)
from integrations_service.domain.audit import OUTCOME_OK, AuditTrail, Caller
from integrations_service.errors import FailedPrecondition
from integrations_service.sealing import Sealer
from integrations_service.store import IntegrationStore, StoredIntegration, StoredValue, UnreadableConfig

log = logging.getLogger("integrations.rotation")

ROTATE_ACTION = "RotateKeys"
RETIRE_ACTION = "RetireKey"
PLAINTEXT = "plaintext"
# Row ids a refused retirement names; the rest are counted.
_MAX_SHOWN_ROWS = 10


@dataclass
class RotationReport:
    rows_scanned: int = 0
    rows_rewrapped: int = 0
    values_rewrapped: int = 0
    batches: int = 0
    # Values rewrapped, by the key id they were under ("plaintext" for none).
    from_keys: Counter[str] = field(default_factory=Counter)
    # (row id, field) of values that could not be decrypted and were left as they are.
    undecryptable: list[tuple[str, str]] = field(default_factory=list)
    # Legacy values found (plaintext, v1), and how many of them are still legacy after this run.
    legacy_found: Counter[str] = field(default_factory=lambda: Counter({LEGACY_PLAINTEXT: 0, LEGACY_V1: 0}))
    legacy_remaining: int = 0
    # Ids of rows whose stored config is not a JSON object: nothing in them can be rewrapped.
    unreadable_rows: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not (self.undecryptable or self.legacy_remaining or self.unreadable_rows)


@dataclass
class _RowOutcome:
    rewrapped: Counter[str] = field(default_factory=Counter)
    failed: list[str] = field(default_factory=list)
    legacy_found: Counter[str] = field(default_factory=Counter)
    legacy_remaining: int = 0


class Rotator:
    def __init__(
        self,
        store: IntegrationStore,
        sealer: Sealer,
        audit: AuditTrail,
        caller: Caller,
        batch_size: int = 100,
        progress: Callable[[RotationReport], None] = lambda report: None,
        rewrap_legacy: bool = True,
    ) -> None:
        if batch_size < 1:
            # A scan of 0 rows finds none: the rotation would report itself complete, retirement find no use.
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self._store = store
        self._sealer = sealer
        self._audit = audit
        self._caller = caller
        self._batch_size = batch_size
        self._progress = progress
        self._rewrap_legacy = rewrap_legacy

    async def rotate(self) -> RotationReport:
        report = RotationReport()
        after = ""
        while batch := await self._store.scan(after, self._batch_size):
            after = batch[-1].id
            report.rows_scanned += len(batch)
            report.unreadable_rows.extend(row.id for row in batch if isinstance(row.config, UnreadableConfig))
            first = len(report.undecryptable)
            stale = [row.id for row in batch if not all(map(self._sealer.is_current, row.config.values()))]
            # Rows already under the active key are checked here; a stale row's values, by `_rewrap_batch`.
            rewrapped = set(stale)
            for row in batch:
                if row.id not in rewrapped:
                    report.undecryptable.extend((row.id, name) for name in self._unopened(row))
            if stale:
                await self._rewrap_batch(stale, report)
            order = {row.id: i for i, row in enumerate(batch)}
            report.undecryptable[first:] = sorted(report.undecryptable[first:], key=lambda failed: order[failed[0]])
            self._progress(report)
        return report

    async def retire(self, key_id: str) -> int:
        """Mark a key retired once no stored value needs it; returns the rows scanned."""
        if key_id == self._sealer.active_key_id:
            raise FailedPrecondition(f"key {key_id!r} is the active key: make another key active first")
        known = {record.key_id for record in await self._store.list_keys()}
        if key_id not in known:
            raise FailedPrecondition(
                f"no key {key_id!r} is registered in the store (known: {', '.join(map(repr, sorted(known)))})"
            )
        in_use, rows, after = 0, 0, ""
        unreadable: list[str] = []
        while batch := await self._store.scan(after, self._batch_size):
            after = batch[-1].id
            rows += len(batch)
            in_use += sum(_key_of(v) == key_id for row in batch for v in row.config.values())
            unreadable.extend(row.id for row in batch if isinstance(row.config, UnreadableConfig))
        if in_use:
            raise FailedPrecondition(
                f"key {key_id!r} still encrypts {in_use} stored values: run `integrations-service rotate` first"
            )
        if unreadable:
            # Their values cannot be seen, so may be under this key; a repair needs the key to get them back.
            shown = ", ".join(map(repr, unreadable[:_MAX_SHOWN_ROWS]))
            more = f" and {len(unreadable) - _MAX_SHOWN_ROWS} more" if len(unreadable) > _MAX_SHOWN_ROWS else ""
            raise FailedPrecondition(
                f"{len(unreadable)} stored rows have a config that is not a JSON object (ids {shown}{more}), "
                f"so whether they need key {key_id!r} cannot be told: repair or delete them first"
            )
        await self._store.retire_key(key_id)
        self._audit.enqueue(self._audit.record(self._caller, RETIRE_ACTION, OUTCOME_OK, details={"key_id": key_id}))
        await self._audit.flush()
        return rows

    def _unopened(self, row: StoredIntegration) -> list[str]:
        """The fields of a row under the active key whose values do not decrypt, bound to the row: damaged, moved."""
        return [
            name
            for name, stored in row.config.items()
            if not self._sealer.opens(stored, ValueContext(row.organization_id, row.provider, name))
        ]

    async def _rewrap_batch(self, ids: list[str], report: RotationReport) -> None:
        # Per row id, so that a row rewritten again (a store retry) is counted once.
        outcomes: dict[str, _RowOutcome] = {}

        def rewrite(row: StoredIntegration) -> Mapping[str, StoredValue] | None:
            new, outcome = dict(row.config), _RowOutcome()
            for name, stored in row.config.items():
                context = ValueContext(row.organization_id, row.provider, name)
                if self._sealer.is_current(stored):
                    if not self._sealer.opens(stored, context):
                        outcome.failed.append(name)  # under the active key, but damaged or moved: reported
                    continue
                legacy = legacy_format(stored)
                if legacy:
                    outcome.legacy_found[legacy] += 1
                    if not self._rewrap_legacy:
                        outcome.legacy_remaining += 1
                        continue
                try:
                    new[name] = self._sealer.reseal(stored, context)
                except InvalidCiphertext:
                    outcome.failed.append(name)  # left as it is, and reported
                    outcome.legacy_remaining += bool(legacy)
                    continue
                outcome.rewrapped[_key_of(stored)] += 1
            if outcome.rewrapped and not all(map(_is_text, new.values())):
                # A value kept as it is cannot be written back (SQLite refuses a lone surrogate): the whole
                # row stays as it is, so the rest of its batch can still be written.
                outcome.rewrapped.clear()
            outcomes[row.id] = outcome
            return new if outcome.rewrapped else None

        details = {"rows": str(len(ids)), "active_key_id": self._sealer.active_key_id}
        audit = self._audit.record(self._caller, ROTATE_ACTION, OUTCOME_OK, details=details)
        report.rows_rewrapped += await self._store.rewrap(ids, rewrite, audit)
        self._audit.written(audit)
        report.batches += 1
        for row_id, outcome in outcomes.items():
            report.values_rewrapped += sum(outcome.rewrapped.values())
            report.from_keys.update(outcome.rewrapped)
            report.undecryptable.extend((row_id, name) for name in outcome.failed)
            report.legacy_found.update(outcome.legacy_found)
            report.legacy_remaining += outcome.legacy_remaining


def _is_text(value: str) -> bool:
    """Encodable as UTF-8: not holding a lone surrogate."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _key_of(stored: str) -> str:
    try:
        return key_id_of(stored) or PLAINTEXT
    except InvalidCiphertext:
        return "unknown-format"
