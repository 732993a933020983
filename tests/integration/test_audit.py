"""The audit trail over a real socket, against both stores: what is recorded, what never is, and paging.

In plaintext development mode every caller is trusted with the identity
"development-plaintext", so ListAuditEvents answers the harness's stub.
Decrypted reads and refusals are buffered and written by a background flush
(about every second); the tests await `audit.flush()` instead of sleeping.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
import uuid
from contextlib import closing

import asyncpg  # type: ignore[import-untyped]
import grpc
import pytest

from integrations.v1 import integrations_pb2 as pb
from tests import harness
from tests.harness import Running, new_org, refused, rich_error
from tests.integration.raw_rows import overwrite_config, stored_config, tampered

CALLER = "development-plaintext"
SK = "sk_test_51AuditSecretValue00000001"
SK_OTHER = "sk_test_51AuditSecretValue00000002"
PK = "pk_test_51AuditPublishable0000001"
WEBHOOK = "whsec_audit_webhook_secret_000001"
DECRYPTED = pb.CONFIG_VIEW_DECRYPTED


def request_id(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:12]}"


def metadata(rid: str) -> tuple[tuple[str, str], ...]:
    return (("x-request-id", rid),)


async def save(svc: Running, org: str, rid: str, etag: str = "", **values: str) -> pb.ProviderConfig:
    return await harness.save(svc, org, etag=etag, metadata=metadata(rid), **values)


async def read(svc: Running, org: str, rid: str, view: int) -> pb.ProviderConfig:
    return await harness.get(svc, org, view=view, metadata=metadata(rid))


async def events_of(svc: Running, org: str) -> list[pb.AuditEvent]:
    """Every event of one organization, newest first, after the buffered ones are written."""
    await svc.service.audit.flush()
    reply = await svc.stub.ListAuditEvents(pb.ListAuditEventsRequest(organization_id=org, page_size=500))
    assert reply.next_page_token == ""
    return list(reply.events)


async def raw_audit_text(kind: str, where: str) -> str:
    """The whole audit table as a database dump would show it."""
    sql = "SELECT * FROM audit_events"
    if kind == "postgres":
        conn = await asyncpg.connect(where)
        try:
            rows = [dict(r.items()) for r in await conn.fetch(sql)]
        finally:
            await conn.close()
    else:

        def dump() -> list[dict[str, object]]:
            with closing(sqlite3.connect(where)) as conn:
                conn.row_factory = sqlite3.Row
                return [dict(r) for r in conn.execute(sql).fetchall()]

        rows = await asyncio.to_thread(dump)
    assert rows
    return "\n".join(" | ".join(str(v) for v in row.values()) for row in rows)


# --- what each call leaves ----------------------------------------------------------------------------


async def test_each_audited_call_leaves_one_event_naming_who_what_where(svc: Running) -> None:
    org = new_org()
    rids = {label: request_id(label) for label in ("save", "bad-save", "masked", "decrypted", "delete")}

    await save(svc, org, rids["save"], secretKey=SK, publishableKey=PK)
    await svc.service.audit.flush()
    error = await refused(save(svc, org, rids["bad-save"], secretKey="pk_test_not_a_secret_key"))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    await svc.service.audit.flush()
    await read(svc, org, rids["masked"], pb.CONFIG_VIEW_MASKED)
    await read(svc, org, rids["masked"], pb.CONFIG_VIEW_UNSPECIFIED)
    await svc.service.audit.flush()
    await read(svc, org, rids["decrypted"], DECRYPTED)
    await svc.service.audit.flush()
    await svc.stub.DeleteIntegration(
        pb.DeleteIntegrationRequest(organization_id=org, provider="stripe"), metadata=metadata(rids["delete"])
    )

    events = await events_of(svc, org)
    summary = [(e.action, e.outcome, e.organization_id, e.provider, list(e.fields), e.request_id) for e in events]
    assert summary == [
        ("DeleteIntegration", "OK", org, "stripe", [], rids["delete"]),
        ("GetProviderConfig", "OK", org, "stripe", ["publishableKey", "secretKey", "webhookSecret"], rids["decrypted"]),
        ("SaveIntegration", "InvalidArgument", org, "stripe", ["secretKey"], rids["bad-save"]),
        ("SaveIntegration", "OK", org, "stripe", ["publishableKey", "secretKey"], rids["save"]),
    ]
    # Masked reads leave nothing.
    assert rids["masked"] not in {e.request_id for e in events}
    assert all(e.caller == CALLER for e in events)
    assert [e.id for e in events] == sorted((e.id for e in events), reverse=True)
    assert all(e.time.seconds > 0 for e in events)
    times = [e.time.ToDatetime() for e in events]
    assert times == sorted(times, reverse=True)
    # A refusal says why, by field.
    assert "values.secretKey" in events[2].details["reason"]
    # The request id is the caller's own, as it came back to the caller.
    assert rich_error(error).request_id == rids["bad-save"]


async def test_no_value_is_ever_recorded_but_fingerprints_correlate_them(
    svc: Running, store_location: tuple[str, str]
) -> None:
    org = new_org()
    first = request_id("first")
    same = request_id("same")
    changed = request_id("changed")
    await save(svc, org, first, secretKey=SK, webhookSecret=WEBHOOK)
    await save(svc, org, same, secretKey=SK)
    await save(svc, org, changed, secretKey=SK_OTHER)
    await refused(save(svc, org, request_id("refused"), secretKey=SK, publishableKey="pk_live_51AuditLiveMixedMode"))
    await read(svc, org, request_id("read"), DECRYPTED)

    events = await events_of(svc, org)
    by_rid = {e.request_id: e for e in events}
    fingerprint = {rid: by_rid[rid].details["fingerprint.secretKey"] for rid in (first, same, changed)}
    assert fingerprint[first] == fingerprint[same]
    assert fingerprint[first] != fingerprint[changed]
    assert by_rid[first].details["fingerprint.webhookSecret"] not in fingerprint.values()
    assert set(by_rid[same].details) == {"fingerprint.secretKey"}

    values = (SK, SK_OTHER, WEBHOOK, "pk_live_51AuditLiveMixedMode")
    for event in events:
        text = str(event)
        assert not any(value in text for value in values), event
    dump = await raw_audit_text(*store_location)
    assert org in dump  # the dump does hold this test's events
    assert not any(value in dump for value in values)
    # Nor a recognisable part of one (the unique tails of the secrets).
    assert not any(value[-12:] in dump for value in values)


# --- atomicity: a change and its record --------------------------------------------------------------


async def test_a_change_has_exactly_one_ok_record_and_a_refusal_only_a_refused_one(svc: Running) -> None:
    org = new_org()
    ok = request_id("ok")
    stale = request_id("stale")
    stale_delete = request_id("stale-delete")
    missing_delete = request_id("missing-delete")
    first = await save(svc, org, ok, secretKey=SK)
    await save(svc, org, request_id("second"), publishableKey=PK)
    assert (await refused(save(svc, org, stale, etag=first.etag, secretKey=SK_OTHER))).code() is grpc.StatusCode.ABORTED
    error = await refused(
        svc.stub.DeleteIntegration(
            pb.DeleteIntegrationRequest(organization_id=org, provider="stripe", etag=first.etag),
            metadata=metadata(stale_delete),
        )
    )
    assert error.code() is grpc.StatusCode.ABORTED
    error = await refused(
        svc.stub.DeleteIntegration(
            pb.DeleteIntegrationRequest(organization_id=new_org(), provider="stripe"), metadata=metadata(missing_delete)
        )
    )
    assert error.code() is grpc.StatusCode.NOT_FOUND

    events = await events_of(svc, org)
    outcomes = [(e.request_id, e.action, e.outcome) for e in events]
    assert outcomes.count((ok, "SaveIntegration", "OK")) == 1
    assert [o for o in outcomes if o[0] == stale] == [(stale, "SaveIntegration", "Conflict")]
    assert [o for o in outcomes if o[0] == stale_delete] == [(stale_delete, "DeleteIntegration", "Conflict")]
    assert len(events) == 4  # two saves, two refusals
    # The refused changes changed nothing.
    current = await read(svc, org, request_id("check"), DECRYPTED)
    assert current.values["secretKey"].value == SK

    reply = await svc.stub.ListAuditEvents(pb.ListAuditEventsRequest(page_size=500))
    not_found = [e for e in reply.events if e.request_id == missing_delete]
    assert [(e.action, e.outcome) for e in not_found] == [("DeleteIntegration", "NotFound")]


# --- paging ------------------------------------------------------------------------------------------------


async def test_pages_are_newest_first_without_duplicates_and_filtered_by_organization(svc: Running) -> None:
    org, other = new_org(), new_org()
    rids = [request_id(f"page{i}") for i in range(5)]
    for i, rid in enumerate(rids):
        await save(svc, org, rid, secretKey=f"{SK}{i}")
    await save(svc, other, request_id("other"), secretKey=SK)

    pages: list[list[pb.AuditEvent]] = []
    token = ""
    while True:
        reply = await svc.stub.ListAuditEvents(
            pb.ListAuditEventsRequest(organization_id=org, page_size=2, page_token=token)
        )
        pages.append(list(reply.events))
        if len(pages) == 1:
            # An event arriving while paging lands before page one, never on a later page.
            await save(svc, org, request_id("late"), secretKey=SK)
        token = reply.next_page_token
        if not token:
            break
        assert len(pages) < 10, "paging does not end"
    assert [len(page) for page in pages] == [2, 2, 1]
    listed = [e.request_id for page in pages for e in page]
    assert listed == list(reversed(rids))
    ids = [e.id for page in pages for e in page]
    assert ids == sorted(set(ids), reverse=True)
    assert {e.organization_id for page in pages for e in page} == {org}

    # Without the filter, both organizations' events are there.
    everything = await svc.stub.ListAuditEvents(pb.ListAuditEventsRequest(page_size=500))
    assert {org, other} <= {e.organization_id for e in everything.events}
    # A page size above the maximum is lowered, not refused.
    assert (
        len((await svc.stub.ListAuditEvents(pb.ListAuditEventsRequest(organization_id=org, page_size=100_000))).events)
        == 6
    )


def _token(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("not-a-token!", id="garbage"),
        pytest.param(_token("before:0"), id="zero"),
        pytest.param(_token("before:-3"), id="negative"),
        pytest.param(_token("after:5"), id="other-prefix"),
        pytest.param(_token("before:12abc"), id="not-a-number"),
        pytest.param(_token("before:²"), id="unicode-digit"),
        pytest.param(_token(f"before:{2**70}"), id="beyond-int64"),
    ],
)
async def test_a_page_token_the_service_never_gave_out_is_invalid_argument(svc: Running, token: str) -> None:
    error = rich_error(await refused(svc.stub.ListAuditEvents(pb.ListAuditEventsRequest(page_token=token))))
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert list(error.violations) == ["page_token"]


async def test_a_page_token_continues_only_the_organization_it_was_given_out_for(svc: Running) -> None:
    org, other = new_org(), new_org()
    for i in range(2):
        await save(svc, org, request_id(f"scope{i}"), secretKey=f"{SK}{i}")
    await save(svc, other, request_id("scope-other"), secretKey=SK)
    token = (
        await svc.stub.ListAuditEvents(pb.ListAuditEventsRequest(organization_id=org, page_size=1))
    ).next_page_token
    assert token

    for used_for in (other, ""):
        request = pb.ListAuditEventsRequest(organization_id=used_for, page_size=1, page_token=token)
        error = rich_error(await refused(svc.stub.ListAuditEvents(request)))
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert list(error.violations) == ["page_token"]
        assert "another organization_id" in error.violations["page_token"]
    # With its own organization it goes on.
    request = pb.ListAuditEventsRequest(organization_id=org, page_size=1, page_token=token)
    assert [e.organization_id for e in (await svc.stub.ListAuditEvents(request)).events] == [org]


async def test_negative_page_size_and_bad_organization_are_invalid_argument(svc: Running) -> None:
    error = rich_error(await refused(svc.stub.ListAuditEvents(pb.ListAuditEventsRequest(page_size=-1))))
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert list(error.violations) == ["page_size"]
    error = rich_error(
        await refused(svc.stub.ListAuditEvents(pb.ListAuditEventsRequest(organization_id="has space", page_size=-1)))
    )
    assert set(error.violations) == {"organization_id", "page_size"}


async def test_a_decrypted_read_of_a_corrupt_value_is_recorded_as_refused(
    svc: Running, store_location: tuple[str, str]
) -> None:
    kind, where = store_location
    org = new_org()
    await save(svc, org, request_id("save"), secretKey=SK)
    stored = await stored_config(kind, where, org, "stripe")
    await overwrite_config(kind, where, org, "stripe", {"secretKey": tampered(stored["secretKey"])})
    rid = request_id("corrupt")
    assert (await refused(read(svc, org, rid, DECRYPTED))).code() is grpc.StatusCode.DATA_LOSS
    events = await events_of(svc, org)
    (event,) = [e for e in events if e.request_id == rid]
    assert (event.action, event.outcome) == ("GetProviderConfig", "CorruptCredential")
    assert list(event.fields) == ["secretKey"]
    assert "secretKey" in event.details["reason"]
    assert json.dumps(dict(event.details)).find(stored["secretKey"][8:40]) == -1


async def test_the_audit_log_line_says_ok_only_for_changes_that_happened(
    svc: Running, caplog: pytest.LogCaptureFixture
) -> None:
    org = new_org()
    first = await save(svc, org, request_id("first"), secretKey="sk_test_audit_log_0001")
    await save(svc, org, request_id("second"), publishableKey="pk_test_audit_log")
    stale = request_id("stale")
    caplog.set_level("INFO", logger="integrations")
    await refused(save(svc, org, stale, etag=first.etag, publishableKey="pk_test_lost"))
    missing = request_id("missing")
    await refused(
        svc.stub.DeleteIntegration(
            pb.DeleteIntegrationRequest(organization_id=new_org(), provider="stripe"), metadata=metadata(missing)
        )
    )

    def outcomes(rid: str) -> list[str]:
        # A call's audit record is logged on its "rpc finished" line.
        audit_lines = (r for r in caplog.records if getattr(r, "event", None) == "audit")
        return [str(r.outcome) for r in audit_lines if getattr(r, "request_id", None) == rid]  # type: ignore[attr-defined]

    assert outcomes(stale) == ["Conflict"]
    assert outcomes(missing) == ["NotFound"]
