"""The audit trail: who did what to which organization's credentials, and how it ended.

Changes (saves, deletes, rotation batches) are recorded by the store in the
same transaction as the change. Everything else (decrypted reads, refusals,
permission denials) goes through a small buffer that a background task
flushes, so the commerce service's hot path never waits on an audit insert;
with `INTEGRATIONS_AUDIT_READS=strict` a decrypted read instead waits until its
record is stored, and fails when it cannot be. Every record is also logged:
on the log line of the RPC that made it (`CallLine`: one line per call), or on
a line of its own outside an RPC. Records never hold a value: where one must
be correlated, its keyed HMAC fingerprint.

Everything a record takes from a request is made storable first (`bounded`),
and a batch the store refuses is split so that one bad record cannot hold up
the others: nothing a caller sends can stop the trail.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import logging
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from integrations_service.domain.periodic import PeriodicFlush
from integrations_service.domain.registry import PROVIDERS
from integrations_service.errors import ServiceError, StoreRejected, Unavailable
from integrations_service.store import AuditEntry, AuditRecord, IntegrationStore
from integrations_service.untrusted import bounded

log = logging.getLogger("integrations.audit")

OUTCOME_OK = "OK"
FLUSH_INTERVAL_SECONDS = 1.0
# Records kept while the store is down; beyond this the oldest are dropped (and counted, and logged).
MAX_BUFFERED = 10_000

# Caps on request-derived text in a record. Every legitimate value fits and is kept unchanged: identifiers
# (organization ids, providers, field keys, request ids) fit the default, a SPIFFE ID is at most 2048 bytes.
_CALLER_LIMIT = 2048
_DETAIL_LIMIT = 1024  # a refusal's reason; fingerprints and counts are far shorter
_MAX_FIELDS = 64  # no provider has nearly as many


class ReadAudit(enum.Enum):
    """When a decrypted read's record is stored (INTEGRATIONS_AUDIT_READS)."""

    # Within about FLUSH_INTERVAL_SECONDS while the store is up; lost if the process dies before that.
    BUFFERED = "buffered"
    # Before the value is returned; the read fails UNAVAILABLE when the record cannot be stored.
    STRICT = "strict"


@dataclass(frozen=True)
class Caller:
    """Who makes a call, as shown everywhere (spiffe:…, dns:…, cn:…, sha256:…, development-plaintext, cli:…@user),
    and the request id."""

    identity: str
    request_id: str = ""


def _utcnow() -> datetime:
    return datetime.now(UTC)


class CallLine:
    """The log line of the RPC being served, which carries the audit record the call made.

    The RPC layer opens one per call (`CallLine.open`) and closes it when it writes the line; a record written
    while it is open goes on it instead of on a line of its own, so a decrypted read or a save logs one line.
    """

    __slots__ = ("closed", "record")

    def __init__(self) -> None:
        self.record: AuditRecord | None = None
        self.closed = False

    @staticmethod
    def open() -> CallLine:
        """A new line for the call running in this task (asyncio gives each RPC's task its own context)."""
        line = CallLine()
        _call_line.set(line)
        return line

    def close(self) -> AuditRecord | None:
        """The record to log on the call's line, if any; a record written from now on gets a line of its own."""
        self.closed = True
        return self.record

    def take(self, audit: AuditRecord) -> bool:
        """Whether `audit` goes on this line: it is open and holds no record yet (a second one logs alone)."""
        if self.closed or self.record is not None:
            return False
        self.record = audit
        return True


_call_line: contextvars.ContextVar[CallLine | None] = contextvars.ContextVar("audit_call_line", default=None)


def _storable_fields(fields: Iterable[str]) -> tuple[str, ...]:
    if isinstance(fields, frozenset) and (known := _CATALOG_FIELDS.get(fields)) is not None:
        return known
    return _bounded_fields(fields)


def _bounded_fields(fields: Iterable[str]) -> tuple[str, ...]:
    keys = sorted({bounded(key) for key in fields})
    if len(keys) > _MAX_FIELDS:
        keys = [*keys[:_MAX_FIELDS], f"…[+{len(keys) - _MAX_FIELDS} fields]"]
    return tuple(keys)


# Every decrypted read records all of its provider's fields: those sets are made storable once.
_CATALOG_FIELDS = {spec.field_keys: _bounded_fields(spec.field_keys) for spec in PROVIDERS}


class AuditTrail:
    def __init__(
        self,
        store: IntegrationStore,
        clock: Callable[[], datetime] = _utcnow,
        *,
        reads: ReadAudit = ReadAudit.BUFFERED,
        max_buffered: int = MAX_BUFFERED,
    ) -> None:
        self._store = store
        self._clock = clock
        self._reads = reads
        self._max_buffered = max_buffered
        self._buffer: deque[AuditRecord] = deque()
        # Taken out of the buffer by the flush under way: not dropped when the buffer fills meanwhile.
        self._in_flight = 0
        self._flushing = asyncio.Lock()
        self._periodic = PeriodicFlush(self.flush, FLUSH_INTERVAL_SECONDS, "audit-flush")
        self.dropped = 0
        # Records given up: refused by the store even on their own, or still unstored at shutdown.
        self.failed = 0

    def record(
        self,
        caller: Caller,
        action: str,
        outcome: str,
        organization_id: str = "",
        provider: str = "",
        fields: Iterable[str] = (),
        details: Mapping[str, str] | None = None,
    ) -> AuditRecord:
        """Build a record; nothing is logged until it is `enqueue`d, or `written` by the change's transaction.

        Refused and denied requests are recorded too, so every text from the request is bounded here.
        """
        return AuditRecord(
            time=self._clock(),
            caller=bounded(caller.identity, _CALLER_LIMIT),
            action=action,
            outcome=outcome,
            organization_id=bounded(organization_id),
            provider=bounded(provider),
            fields=_storable_fields(fields),
            request_id=bounded(caller.request_id),
            details={bounded(key): bounded(value, _DETAIL_LIMIT) for key, value in details.items()} if details else {},
        )

    def written(self, audit: AuditRecord) -> None:
        """The store wrote the record with its change (or took it for the next flush): log it, now that it is
        true, on the log line of the RPC that made it, or on a line of its own outside one."""
        line = _call_line.get()
        if line is not None and line.take(audit):
            return
        log.info(
            "audit",
            extra={
                "event": "audit",
                "caller": audit.caller,
                "rpc": audit.action,
                "outcome": audit.outcome,
                "organization_id": audit.organization_id or None,
                "provider": audit.provider or None,
                "fields": ",".join(audit.fields) or None,
                "request_id": audit.request_id or None,
            },
        )

    @property
    def buffered(self) -> int:
        """Records waiting to be stored: in the buffer, or in the flush under way."""
        return len(self._buffer) + self._in_flight

    def enqueue(self, audit: AuditRecord) -> None:
        """Log the record and buffer it for the next flush (events that are not part of a change)."""
        self.written(audit)
        self._buffer.append(audit)
        self._drop_oldest_beyond_cap()

    async def decrypted_read(self, audit: AuditRecord) -> None:
        """A decrypted read that succeeded: buffered, or (strict) stored before the caller gets the values."""
        if self._reads is ReadAudit.BUFFERED:
            self.enqueue(audit)
            return
        try:
            await self._store.append_audit([audit])
        except Exception as error:
            if not isinstance(error, Unavailable):
                self._give_up(audit, error)
            raise Unavailable(
                "the audit trail cannot store the record of this decrypted read, so its values are not returned "
                "(INTEGRATIONS_AUDIT_READS=strict); retry later"
            ) from None
        self.written(audit)

    def refused(
        self,
        caller: Caller,
        action: str,
        error: ServiceError,
        organization_id: str = "",
        provider: str = "",
        fields: Iterable[str] = (),
    ) -> None:
        """Record a refused call: the outcome is the error's class, the reason its message (never a value)."""
        details = {"reason": error.message}
        self.enqueue(self.record(caller, action, type(error).__name__, organization_id, provider, fields, details))

    async def flush(self) -> None:
        """Store what is buffered. The store being down keeps the records for the next flush; records it
        refuses are split out and given up (logged and counted), so they never hold up the others."""
        async with self._flushing:
            if not self._buffer:
                return
            batch = list(self._buffer)
            self._buffer.clear()
            self._in_flight = len(batch)
            try:
                await self._write(batch)
            finally:
                self._in_flight = 0

    async def _write(self, batch: list[AuditRecord]) -> None:
        # Chunks still to store, in order. A refused chunk is replaced by its two halves.
        pending: deque[list[AuditRecord]] = deque([batch])
        try:
            while pending:
                chunk = pending[0]
                try:
                    await self._store.append_audit(chunk)
                except Unavailable:
                    raise
                except Exception as error:
                    pending.popleft()
                    if len(chunk) == 1:
                        self._give_up(chunk[0], error)
                    else:
                        middle = len(chunk) // 2
                        pending.extendleft((chunk[middle:], chunk[:middle]))
                else:
                    pending.popleft()
                self._in_flight = sum(map(len, pending))
        except Unavailable:
            self._put_back([record for chunk in pending for record in chunk])
            log.warning("audit records wait for the store to come back", extra={"event": "audit_deferred"})
        except BaseException:
            # Cancelled (shutdown) or a bug: what was not stored yet stays for the next flush.
            self._put_back([record for chunk in pending for record in chunk])
            raise

    def _give_up(self, audit: AuditRecord, error: Exception) -> None:
        self.failed += 1
        reason = error.message if isinstance(error, StoreRejected) else type(error).__name__
        # Identifiers only, bounded again in case the record was not built by `record`.
        log.error(
            "an audit record could not be stored and was given up: %s",
            reason,
            exc_info=not isinstance(error, StoreRejected),
            extra={
                "event": "audit_failed",
                "rpc": bounded(audit.action),
                "outcome": bounded(audit.outcome),
                "organization_id": bounded(audit.organization_id) or None,
                "provider": bounded(audit.provider) or None,
                "request_id": bounded(audit.request_id) or None,
            },
        )

    def _put_back(self, records: Sequence[AuditRecord]) -> None:
        """In front of what arrived meanwhile: the order stays that of the calls."""
        self._buffer.extendleft(reversed(records))
        self._drop_oldest_beyond_cap()

    def _drop_oldest_beyond_cap(self) -> None:
        excess = len(self._buffer) - self._max_buffered
        if excess <= 0:
            return
        for _ in range(excess):
            self._buffer.popleft()
        self.dropped += excess
        log.error(
            "audit buffer full: dropped the %d oldest records",
            excess,
            extra={"event": "audit_dropped", "count": excess},
        )

    def start(self) -> None:
        self._periodic.start()

    async def close(self) -> None:
        """Stop the flush task and flush once more; what still cannot be stored is logged and counted as failed."""
        await self._periodic.close()
        lost = self.buffered
        if lost:
            self._buffer.clear()
            self.failed += lost
            log.error(
                "the store did not take the last %d audit records before shutdown; they are lost",
                lost,
                extra={"event": "audit_lost", "count": lost},
            )


__all__ = ["OUTCOME_OK", "AuditEntry", "AuditRecord", "AuditTrail", "CallLine", "Caller"]
