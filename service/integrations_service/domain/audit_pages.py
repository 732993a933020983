"""Paging through the audit trail: pages newest first, and the opaque page tokens that continue them.

Apart from the trail itself (domain/audit.py), which only writes: reading it
back is a query on the store with its own validation and token format.
"""

from __future__ import annotations

import base64
import hashlib
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
# A token names the listing it continues (AIP-158): `before:<id>:<scope>`, the scope a hash of the
# organization_id it was given out for ("" for every organization's). Not a secret nor a signature: the
# caller may read every organization's trail anyway; it stops a token from silently continuing another
# listing (that organization's newer events skipped). A token without a scope (given out before scopes,
# e.g. by a replica of the previous version during a rolling update) still continues any listing.
_SCOPE_LENGTH = 16
# Tokens we give out are at most 58 characters; a longer one is refused before it is decoded.
_MAX_TOKEN_LENGTH = 64
_WRONG_SCOPE = "was given out for another organization_id: continue a listing with the organization_id it started with"


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
    decoded = _decode_token(page_token)
    if decoded is None:
        violations.append(FieldViolation("page_token", "is not a token this service gave out"))
    elif decoded[1] is not None and decoded[1] != _scope(organization_id):
        violations.append(FieldViolation("page_token", _WRONG_SCOPE))
    if violations:
        raise InvalidArgument(violations)
    assert decoded is not None
    before_id = decoded[0]
    limit = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    # One more than asked tells whether another page exists.
    entries = await store.list_audit(organization_id, before_id, limit + 1)
    more = len(entries) > limit
    entries = entries[:limit]
    next_token = _encode_token(entries[-1].id, organization_id) if more else ""
    return AuditPage(entries, next_token)


def _scope(organization_id: str) -> str:
    return hashlib.sha256(f"audit-page-scope:{organization_id}".encode()).hexdigest()[:_SCOPE_LENGTH]


def _encode_token(before_id: int, organization_id: str) -> str:
    text = f"{_TOKEN_PREFIX}{before_id}:{_scope(organization_id)}"
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _decode_token(token: str) -> tuple[int, str | None] | None:
    """(before id, scope or None for a token without one); None for a token this service never gave out."""
    if not token:
        return 0, None
    if len(token) > _MAX_TOKEN_LENGTH:
        return None
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    body = text.removeprefix(_TOKEN_PREFIX)
    number, colon, scope = body.partition(":")
    if colon and not (len(scope) == _SCOPE_LENGTH and all(c in "0123456789abcdef" for c in scope)):
        return None
    # isascii: str.isdigit also accepts digits int() refuses (e.g. '²').
    # The length check also keeps int() away from numbers of thousands of digits (it refuses > 4300).
    if text == body or not number.isascii() or not number.isdigit() or len(number) > len(str(_MAX_ID)):
        return None
    before_id = int(number)
    # Audit ids are BIGINT (PostgreSQL) / INTEGER (SQLite): a larger one cannot be a token we gave out.
    if not 0 < before_id <= _MAX_ID:
        return None
    return before_id, scope if colon else None


__all__ = ["DEFAULT_PAGE_SIZE", "MAX_PAGE_SIZE", "AuditPage", "AuditPages", "list_audit"]
