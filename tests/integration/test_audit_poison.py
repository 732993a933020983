"""Nothing a caller sends can stop the audit trail, and `INTEGRATIONS_AUDIT_READS=strict` holds reads to it.

Hostile identifiers (an `organization_id` of 12,000 characters, a NUL in `provider`), from a plaintext caller
and from a caller with no role over mutual TLS, are recorded bounded; later decrypted reads are still stored
within the documented bound (the tests poll, they never call `flush` themselves). A record a store still
refuses is given up and counted in `integrations_audit_records_failed_total`, never retried forever.
"""

# Fixtures imported from sibling test modules are then named as test parameters:
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import grpc
import pytest

from integrations.v1 import integrations_pb2 as pb
from integrations.v1 import integrations_pb2_grpc as pb_grpc
from integrations_service.domain.audit import AuditTrail, Caller
from integrations_service.store import AuditRecord, IntegrationStore
from tests.harness import Running, new_org, start_service
from tests.integration.raw_rows import service_url
from tests.integration.test_metrics import scrape
from tests.integration.test_mtls import StartMtls, start_mtls  # noqa: F401 (fixture)
from tests.integration.test_store_outage import TcpProxy, _with_address, database_url, proxy  # noqa: F401 (fixtures)
from tests.processes import clean_env, run_cli

SK = "sk_test_51PoisonedAuditSecret000001"
DECRYPTED = pb.CONFIG_VIEW_DECRYPTED
# Decrypted reads are stored within the flush interval (1 s) while the store is up; the rest is slack.
AUDIT_BOUND = 3.0
HUGE_ORGANIZATION_ID = secrets.token_urlsafe(9000)  # 12,000 characters that do not compress
NUL_PROVIDER = "stri\x00pe"
FAILED = "integrations_audit_records_failed_total"


def failed_count(metrics_text: str) -> float:
    (line,) = [line for line in metrics_text.splitlines() if line.startswith(f"{FAILED} ")]
    return float(line.split()[1])


def rid(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:12]}"


def with_rid(request_id: str) -> tuple[tuple[str, str], ...]:
    return (("x-request-id", request_id),)


def hostile_calls(stub: pb_grpc.IntegrationServiceStub, org: str) -> dict[str, object]:
    """request id -> a refused call carrying a hostile identifier (started when awaited)."""
    calls: dict[str, object] = {}
    for label, organization_id, provider in (
        ("huge-org", HUGE_ORGANIZATION_ID, "stripe"),
        ("nul-provider", org, NUL_PROVIDER),
    ):
        get, save = rid(f"get-{label}"), rid(f"save-{label}")
        calls[get] = stub.GetProviderConfig(
            pb.GetProviderConfigRequest(organization_id=organization_id, provider=provider, view=DECRYPTED),
            metadata=with_rid(get),
            timeout=10,
        )
        calls[save] = stub.SaveIntegration(
            pb.SaveIntegrationRequest(organization_id=organization_id, provider=provider, values={"secretKey": SK}),
            metadata=with_rid(save),
            timeout=10,
        )
    return calls


async def refuse_all(calls: dict[str, object]) -> set[grpc.StatusCode]:
    codes = set()
    for call in calls.values():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call  # type: ignore[misc]
        codes.add(caught.value.code())
    return codes


async def audited_within_bound(
    stub: pb_grpc.IntegrationServiceStub, request_ids: set[str], organization_id: str = ""
) -> dict[str, pb.AuditEvent]:
    """The events of `request_ids`, once all are listed; fails after AUDIT_BOUND seconds."""
    deadline = time.monotonic() + AUDIT_BOUND
    while True:
        reply = await stub.ListAuditEvents(
            pb.ListAuditEventsRequest(organization_id=organization_id, page_size=500), timeout=10
        )
        found = {e.request_id: e for e in reply.events if e.request_id in request_ids}
        if set(found) == request_ids:
            return found
        if time.monotonic() > deadline:
            missing = sorted(request_ids - set(found))
            raise AssertionError(f"not in ListAuditEvents {AUDIT_BOUND} s later: {missing}")
        await asyncio.sleep(0.1)


async def save_then_read(stub: pb_grpc.IntegrationServiceStub, org: str) -> tuple[str, str]:
    save, read = rid("save"), rid("read")
    await stub.SaveIntegration(
        pb.SaveIntegrationRequest(organization_id=org, provider="stripe", values={"secretKey": SK}),
        metadata=with_rid(save),
        timeout=10,
    )
    reply = await stub.GetProviderConfig(
        pb.GetProviderConfigRequest(organization_id=org, provider="stripe", view=DECRYPTED),
        metadata=with_rid(read),
        timeout=10,
    )
    assert reply.config.values["secretKey"].value == SK
    return save, read


def assert_bounded(events: dict[str, pb.AuditEvent]) -> None:
    for request_id, event in events.items():
        assert len(event.organization_id) < 200, request_id
        assert "\x00" not in event.provider + event.organization_id, request_id
        if "huge-org" in request_id:
            assert event.organization_id.startswith(HUGE_ORGANIZATION_ID[:100])
            assert event.organization_id.endswith("chars]")
        else:
            assert event.provider == "stri\\x00pe"
        assert len(event.details.get("reason", "")) < 1100


async def test_hostile_identifiers_are_recorded_bounded_and_later_reads_are_still_audited(svc: Running) -> None:
    org = new_org()
    calls = hostile_calls(svc.stub, org)
    assert await refuse_all(calls) <= {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
    save, read = await save_then_read(svc.stub, org)

    assert set(await audited_within_bound(svc.stub, {save, read}, org)) == {save, read}
    hostile = await audited_within_bound(svc.stub, set(calls))
    assert_bounded(hostile)
    assert {e.outcome for e in hostile.values()} <= {"InvalidArgument", "NotFound"}
    assert failed_count(await scrape(svc)) == 0


async def test_a_caller_with_no_role_cannot_poison_the_trail_over_mutual_tls(
    start_mtls: StartMtls, store_location: tuple[str, str]
) -> None:
    mtls = await start_mtls(service_url(*store_location))
    stranger = mtls.stub(mtls.ca.issue("stranger", uris=("spiffe://integrations.local/stranger",)))
    org = new_org()
    calls = hostile_calls(stranger, org)
    assert await refuse_all(calls) == {grpc.StatusCode.PERMISSION_DENIED}
    save, read = await save_then_read(mtls.stub("admin"), org)

    admin = mtls.stub("admin")
    assert set(await audited_within_bound(admin, {save, read}, org)) == {save, read}
    hostile = await audited_within_bound(admin, set(calls))
    assert_bounded(hostile)
    assert {e.outcome for e in hostile.values()} == {"PermissionDenied"}
    assert all("stranger" in e.caller for e in hostile.values())


def unstorable(request_id: str, kind: str) -> AuditRecord:
    """A record no store can take (built around `AuditTrail.record`, which would have made it storable)."""
    # PostgreSQL refuses NUL in text; neither store can encode a lone surrogate.
    provider = "stri\x00pe" if kind == "postgres" else "\ud800"
    return AuditRecord(
        time=datetime.now(UTC),
        caller="tester",
        action="GetProviderConfig",
        outcome="OK",
        organization_id="org_unstorable",
        provider=provider,
        request_id=request_id,
    )


async def test_a_record_the_store_refuses_is_given_up_and_counted_and_blocks_nothing(
    svc: Running, store_location: tuple[str, str]
) -> None:
    org = new_org()
    bad = rid("unstorable")
    before = await save_then_read(svc.stub, org)
    svc.service.audit.enqueue(unstorable(bad, store_location[0]))
    after = await save_then_read(svc.stub, org)

    events = await audited_within_bound(svc.stub, {*before, *after}, org)
    assert len(events) == 4
    deadline = time.monotonic() + AUDIT_BOUND
    while failed_count(await scrape(svc)) != 1:
        assert time.monotonic() < deadline, "the refused record was not counted"
        await asyncio.sleep(0.1)
    assert svc.service.audit.buffered == 0
    reply = await svc.stub.ListAuditEvents(pb.ListAuditEventsRequest(page_size=500))
    assert bad not in {e.request_id for e in reply.events}


async def test_the_trail_splits_a_batch_around_records_the_store_refuses(
    store: IntegrationStore, contract_location: tuple[str, str]
) -> None:
    audit = AuditTrail(store)
    good: list[str] = []
    for i in range(5):
        for _ in range(6):
            request_id = rid(f"good{i}")
            audit.enqueue(
                AuditRecord(
                    time=datetime.now(UTC),
                    caller="tester",
                    action="GetProviderConfig",
                    outcome="OK",
                    organization_id="org_split",
                    provider="stripe",
                    request_id=request_id,
                )
            )
            good.append(request_id)
        audit.enqueue(unstorable(rid(f"bad{i}"), contract_location[0]))
    await audit.flush()
    stored = [e.record.request_id for e in reversed(await store.list_audit("org_split", 0, 100))]
    assert stored == good
    assert (audit.failed, audit.buffered, audit.dropped) == (5, 0, 0)


# --- strict: a decrypted value only once its record is stored ---------------------------------------------


STRICT_DB_TIMEOUT = 2.0


@pytest.fixture
async def strict(proxy: TcpProxy, database_url: str, tmp_path: Path) -> AsyncIterator[Running]:
    url = _with_address(database_url, "127.0.0.1", proxy.port)
    running = await start_service(
        url, tmp_path, {"INTEGRATIONS_AUDIT_READS": "strict", "INTEGRATIONS_DB_TIMEOUT": str(STRICT_DB_TIMEOUT)}
    )
    yield running
    await running.close()


async def audit_rows(database_url: str, request_id: str) -> list[str]:
    conn = await asyncpg.connect(database_url)
    try:
        return [
            r["outcome"] for r in await conn.fetch("SELECT outcome FROM audit_events WHERE request_id = $1", request_id)
        ]
    finally:
        await conn.close()


def strict_read(svc: Running, org: str, request_id: str) -> object:
    return svc.stub.GetProviderConfig(
        pb.GetProviderConfigRequest(organization_id=org, provider="stripe", view=DECRYPTED),
        metadata=with_rid(request_id),
        timeout=15,
    )


@pytest.mark.postgres
async def test_strict_reads_answer_only_once_their_record_is_stored(strict: Running, database_url: str) -> None:
    org = new_org()
    await save_then_read(strict.stub, org)
    admin = await asyncpg.connect(database_url)
    try:
        # Inserts into the trail wait behind this lock; reads of the credentials do not.
        lock = admin.transaction()
        await lock.start()
        await admin.execute("LOCK TABLE audit_events IN EXCLUSIVE MODE")
        first = rid("strict-held")
        held = asyncio.ensure_future(strict_read(strict, org, first))  # type: ignore[arg-type]
        await asyncio.sleep(0.5)
        assert not held.done(), "a strict read answered before its audit record was stored"
        await lock.commit()
        reply = await held
        assert reply.config.values["secretKey"].value == SK
        assert await audit_rows(database_url, first) == ["OK"]  # there already: no flush happened

        lock = admin.transaction()
        await lock.start()
        await admin.execute("LOCK TABLE audit_events IN EXCLUSIVE MODE")
        second = rid("strict-refused")
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await strict_read(strict, org, second)  # type: ignore[misc]
        elapsed = time.monotonic() - started
        await lock.commit()
    finally:
        await admin.close()
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "audit" in (caught.value.details() or "")
    assert SK not in str(caught.value)
    assert elapsed < 3 * STRICT_DB_TIMEOUT + 1
    # The attempt itself is not lost: it is recorded as refused once the trail takes records again.
    await strict.service.audit.flush()
    assert await audit_rows(database_url, second) == ["Unavailable"]


@pytest.mark.postgres
async def test_strict_reads_are_unavailable_while_postgres_is_cut_and_audited_again_after(
    strict: Running, proxy: TcpProxy, database_url: str
) -> None:
    org = new_org()
    await save_then_read(strict.stub, org)
    await proxy.stop()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await strict_read(strict, org, rid("strict-cut"))  # type: ignore[misc]
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    await proxy.start()
    after = rid("strict-after")
    reply = await strict_read(strict, org, after)  # type: ignore[misc]
    assert reply.config.values["secretKey"].value == SK  # type: ignore[attr-defined]
    assert await audit_rows(database_url, after) == ["OK"]


async def test_strict_reads_are_stored_before_they_answer_on_sqlite_too(tmp_path: Path) -> None:
    where = tmp_path / "strict.sqlite3"
    running = await start_service(f"sqlite:///{where}", tmp_path, {"INTEGRATIONS_AUDIT_READS": "strict"})
    try:
        org = new_org()
        _, read = await save_then_read(running.stub, org)
        stored = await running.service.store.list_audit(org, 0, 10)
        assert read in {e.record.request_id for e in stored}
    finally:
        await running.close()


# --- shutdown: nothing lost uncounted, exit 0 ------------------------------------------------------------


@pytest.mark.postgres
async def test_a_final_flush_that_fails_is_logged_and_counted_and_stop_finishes(
    proxy: TcpProxy, database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = _with_address(database_url, "127.0.0.1", proxy.port)
    running = await start_service(url, tmp_path, {"INTEGRATIONS_DB_TIMEOUT": "1"})
    org = new_org()
    await save_then_read(running.stub, org)
    await running.service.audit.flush()
    await proxy.stop()
    audit = running.service.audit
    audit.enqueue(audit.record(Caller("tester", rid("lost")), "GetProviderConfig", "OK", org, "stripe"))
    await running.close()  # must not raise
    lost = [r for r in caplog.records if getattr(r, "event", None) == "audit_lost"]
    assert [getattr(r, "count", None) for r in lost] == [1]
    assert running.service.audit.failed == 1
    assert any(getattr(r, "event", None) == "stopped" for r in caplog.records)


def test_an_unknown_audit_reads_value_stops_the_start_naming_the_variable(tmp_path: Path) -> None:
    result = run_cli(["serve"], tmp_path, clean_env({"INTEGRATIONS_AUDIT_READS": "sometimes"}), timeout=15)
    assert result.returncode == 2
    assert "INTEGRATIONS_AUDIT_READS must be one of buffered, strict, got 'sometimes'" in result.stderr
    assert list(tmp_path.iterdir()) == []  # refused before touching anything
    checked = run_cli(["serve", "--check", "--audit-reads", "strict"], tmp_path, clean_env(), timeout=15)
    assert checked.returncode == 0, checked.stderr
