"""The audit trail: who did what to which organization's credentials, and how it ended.

Changes (saves, deletes, rotation batches) are recorded by the store in the
same transaction as the change. Everything else (decrypted reads, refusals,
permission denials) goes through a small buffer that a background task
flushes, so the commerce service's hot path never waits on an audit insert.
Every record is also one structured log line. Records never hold a value:
where one must be correlated, its keyed HMAC fingerprint.
"""

from __future__ import annotations

import base64
import logging
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from integrations_service.domain.periodic import PeriodicFlush
from integrations_service.domain.validation import organization_id_problem
from integrations_service.errors import FieldViolation, InvalidArgument, ServiceError, Unavailable
from integrations_service.store import AuditEntry, AuditRecord, IntegrationStore

log = logging.getLogger("integrations.audit")

OUTCOME_OK = "OK"
FLUSH_INTERVAL_SECONDS = 1.0
# Records kept while the store is down; beyond this the oldest are dropped (and counted, and logged).
MAX_BUFFERED = 10_000


@dataclass(frozen=True)
class Caller:
    """Who makes a call: the identity from the TLS certificate (or the CLI), and the request id."""

    identity: str
    request_id: str = ""


def _utcnow() -> datetime:
    return datetime.now(UTC)


class AuditTrail:
    def __init__(self, store: IntegrationStore, clock: Callable[[], datetime] = _utcnow) -> None:
        self._store = store
        self._clock = clock
        self._buffer: deque[AuditRecord] = deque()
        self._periodic = PeriodicFlush(self.flush, FLUSH_INTERVAL_SECONDS, "audit-flush")
        self.dropped = 0

    def record(
        self,
        caller: Caller,
        rpc: str,
        outcome: str,
        organization_id: str = "",
        provider: str = "",
        fields: Iterable[str] = (),
        details: Mapping[str, str] | None = None,
    ) -> AuditRecord:
        """Build a record; nothing is logged until it is `enqueue`d, or `written` by the change's transaction."""
        return AuditRecord(
            time=self._clock(),
            caller=caller.identity,
            rpc=rpc,
            outcome=outcome,
            organization_id=organization_id,
            provider=provider,
            fields=tuple(sorted(fields)),
            request_id=caller.request_id,
            details=dict(details or {}),
        )

    def written(self, audit: AuditRecord) -> None:
        """The store wrote the record with its change: emit its log line, now that it is true."""
        log.info(
            "audit",
            extra={
                "event": "audit",
                "caller": audit.caller,
                "rpc": audit.rpc,
                "outcome": audit.outcome,
                "organization_id": audit.organization_id or None,
                "provider": audit.provider or None,
                "fields": ",".join(audit.fields) or None,
                "request_id": audit.request_id or None,
            },
        )

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def enqueue(self, audit: AuditRecord) -> None:
        """Log the record and buffer it for the next flush (events that are not part of a change)."""
        self.written(audit)
        if len(self._buffer) >= MAX_BUFFERED:
            self._buffer.popleft()
            self.dropped += 1
            log.error("audit buffer full: dropped the oldest record", extra={"event": "audit_dropped"})
        self._buffer.append(audit)

    def refused(
        self,
        caller: Caller,
        rpc: str,
        error: ServiceError,
        organization_id: str = "",
        provider: str = "",
        fields: Iterable[str] = (),
    ) -> None:
        """Record a refused call: the outcome is the error's class, the reason its message (never a value)."""
        details = {"reason": error.message}
        self.enqueue(self.record(caller, rpc, type(error).__name__, organization_id, provider, fields, details))

    async def flush(self) -> None:
        if not self._buffer:
            return
        batch = list(self._buffer)
        try:
            await self._store.append_audit(batch)
        except Unavailable:
            log.warning("audit records wait for the store to come back", extra={"event": "audit_deferred"})
            return
        for _ in batch:
            self._buffer.popleft()

    def start(self) -> None:
        self._periodic.start()

    async def close(self) -> None:
        await self._periodic.close()

    async def page(self, organization_id: str, page_size: int, page_token: str) -> AuditPage:
        return await list_audit(self._store, organization_id, page_size, page_token)



DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
_TOKEN_PREFIX = "before:"  # noqa: S105 (a page token, not a password)
_MAX_ID = 2**63 - 1
# Tokens we give out are under 40 characters; a longer one is refused before it is decoded.
_MAX_TOKEN_LENGTH = 64


@dataclass(frozen=True)
class AuditPage:
    entries: list[AuditEntry]
    next_page_token: str


async def list_audit(store: IntegrationStore, organization_id: str, page_size: int, page_token: str) -> AuditPage:
    """One page of the trail, newest first (AIP-158 paging: a too-large page size is lowered, not refused).

    Paging by id keeps pages stable while new events arrive: they only ever land before page one.
    """
    violations = []
    if organization_id and (problem := organization_id_problem(organization_id)):
        violations.append(FieldViolation("organization_id", problem))
    if page_size < 0:
        violations.append(FieldViolation("page_size", "must not be negative"))
    before_id = _decode_token(page_token)
    if before_id is None:
        violations.append(FieldViolation("page_token", "is not a token this service gave out"))
    if violations:
        raise InvalidArgument(violations)
    assert before_id is not None
    limit = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    # One more than asked tells whether another page exists.
    entries = await store.list_audit(organization_id, before_id, limit + 1)
    more = len(entries) > limit
    entries = entries[:limit]
    next_token = _encode_token(entries[-1].id) if more else ""
    return AuditPage(entries, next_token)


def _encode_token(before_id: int) -> str:
    return base64.urlsafe_b64encode(f"{_TOKEN_PREFIX}{before_id}".encode()).decode().rstrip("=")


def _decode_token(token: str) -> int | None:
    if not token:
        return 0
    if len(token) > _MAX_TOKEN_LENGTH:
        return None
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    number = text.removeprefix(_TOKEN_PREFIX)
    # isascii: str.isdigit also accepts digits int() refuses (e.g. '²').
    # The length check also keeps int() away from numbers of thousands of digits (it refuses > 4300).
    if text == number or not number.isascii() or not number.isdigit() or len(number) > len(str(_MAX_ID)):
        return None
    before_id = int(number)
    # Audit ids are BIGINT (PostgreSQL) / INTEGER (SQLite): a larger one cannot be a token we gave out.
    if not 0 < before_id <= _MAX_ID:
        return None
    return before_id


__all__ = ["OUTCOME_OK", "AuditEntry", "AuditPage", "AuditRecord", "AuditTrail", "Caller", "list_audit"]
