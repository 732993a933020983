"""ListAuditEvents' paging (domain/audit_pages.py) on the in-memory store: what a page token may continue."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest

from integrations_service.domain.audit_pages import list_audit
from integrations_service.errors import InvalidArgument
from integrations_service.store import AuditRecord
from integrations_service.store.memory import MemoryStore

TIME = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


async def fill(store: MemoryStore) -> None:
    await store.append_audit(
        [AuditRecord(TIME, "caller", "SaveIntegration", "OK", organization_id=org) for org in ["org-a", "org-b"] * 3]
    )


async def test_pages_of_one_organization_continue_with_their_token(store: MemoryStore) -> None:
    await fill(store)
    first = await list_audit(store, "org-a", 2, "")
    second = await list_audit(store, "org-a", 2, first.next_page_token)

    assert [e.record.organization_id for e in first.entries + second.entries] == ["org-a"] * 3
    assert second.next_page_token == ""


@pytest.mark.parametrize(
    ("issued_for", "used_for"),
    [("org-a", "org-b"), ("org-a", ""), ("", "org-a")],
    ids=["other-organization", "issued-for-one-used-for-all", "issued-for-all-used-for-one"],
)
async def test_a_token_is_refused_for_another_listing_than_the_one_it_continues(
    store: MemoryStore, issued_for: str, used_for: str
) -> None:
    # AIP-158: a token continues the listing it came from. Taken to another organization it would silently
    # start that organization's trail part-way (its newer events skipped), and look like a complete answer.
    await fill(store)
    token = (await list_audit(store, issued_for, 1, "")).next_page_token
    assert token

    with pytest.raises(InvalidArgument) as refused:
        await list_audit(store, used_for, 1, token)

    assert [v.field for v in refused.value.violations] == ["page_token"]
    assert "organization_id" in refused.value.violations[0].description


def _token(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


async def test_a_token_without_a_scope_from_a_previous_version_still_continues_any_listing(
    store: MemoryStore,
) -> None:
    await fill(store)
    newest = (await list_audit(store, "", 1, "")).entries[0].id

    page = await list_audit(store, "org-a", 10, _token(f"before:{newest}"))

    assert [e.record.organization_id for e in page.entries] == ["org-a"] * 3


@pytest.mark.parametrize(
    "scope", ["", "0123456789abcde", "0123456789abcdef0", "0123456789ABCDEF", "0123456789abcdeg"], ids=repr
)
async def test_a_malformed_scope_is_a_token_never_given_out(store: MemoryStore, scope: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        await list_audit(store, "org-a", 1, _token(f"before:5:{scope}"))

    assert [(v.field, v.description) for v in refused.value.violations] == [
        ("page_token", "is not a token this service gave out")
    ]


async def test_the_longest_token_given_out_fits_the_length_limit(store: MemoryStore) -> None:
    await store.append_audit([AuditRecord(TIME, "caller", "SaveIntegration", "OK")] * 2)
    token = (await list_audit(store, "", 1, "")).next_page_token
    _, scope = base64.urlsafe_b64decode(token + "==").decode().rsplit(":", 1)
    longest = _token(f"before:{2**63 - 1}:{scope}")  # the largest id

    assert len(longest) <= 64
    assert len((await list_audit(store, "", 5, longest)).entries) == 2
