"""Paging through the audit trail: pages newest first, and the opaque page tokens that continue them.

Apart from the trail itself (domain/audit.py), which only writes: reading it
back is a query on the store with its own validation and token format.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from integrations_service.domain.validation import organization_id_problem
from integrations_service.errors import FieldViolation, InvalidArgument
from integrations_service.store import AuditEntry, IntegrationStore


class AuditPages:
    """ListAuditEvents' domain side: one page of a store's trail at a time."""

    def __init__(self, store: IntegrationStore) -> None:
        self._store = store

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


__all__ = ["DEFAULT_PAGE_SIZE", "MAX_PAGE_SIZE", "AuditPage", "AuditPages", "list_audit"]
