"""A cancelled store call (a client deadline, a disconnect) commits its change whole or not at all,
and leaves the store working.

The benchmark found it on the embedded store: with 64 saves in flight cut off
by the client, the SQLite write connection was sometimes left inside a
transaction, and from then on every save and every audit flush failed with
INTERNAL ("cannot start a transaction within a transaction") until a restart.

Over a real socket: rounds of 64 saves with deadlines of 5-50 ms (and calls
cancelled by the client), then a normal save must succeed and a refusal must
reach the audit trail. At the store: upserts, deletes, rewraps and audit
appends cancelled at arbitrary points; afterwards every change is either
entirely there (row and its audit record) or entirely absent.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import grpc
import pytest

from integrations.v1 import integrations_pb2 as pb
from integrations_service.errors import Unavailable
from integrations_service.store import IntegrationStore
from integrations_service.store.base import AuditRecord, StoredIntegration
from integrations_service.store.sqlite import SqliteStore
from tests.harness import Running, new_org, values_of

ROUNDS = 5
IN_FLIGHT = 64
SK_AFTER = "sk_test_51HxCancelAfter000000001"


def save_request(org: str, value: str) -> pb.SaveIntegrationRequest:
    return pb.SaveIntegrationRequest(organization_id=org, provider="stripe", values={"secretKey": value})


async def cut_off_saves(svc: Running, orgs: list[str], round_number: int) -> list[grpc.StatusCode]:
    """64 saves at once: most with a 5-50 ms deadline, every eighth cancelled by the client instead."""
    calls = []
    for i in range(IN_FLIGHT):
        request = save_request(orgs[i % len(orgs)], f"sk_test_51HxCancel{round_number:02d}{i:012d}")
        timeout = None if i % 8 == 7 else 0.005 + (i % 10) * 0.005
        calls.append(svc.stub.SaveIntegration(request, timeout=timeout if timeout is not None else 30))
    for i, call in enumerate(calls):
        if i % 8 == 7:
            asyncio.get_running_loop().call_later(0.001 * (i % 16), call.cancel)
    codes: list[grpc.StatusCode] = []
    for call in calls:
        try:
            await call
            codes.append(grpc.StatusCode.OK)
        except asyncio.CancelledError:
            codes.append(grpc.StatusCode.CANCELLED)
        except grpc.aio.AioRpcError as error:
            codes.append(error.code())
    return codes


async def test_saves_cut_off_by_the_client_leave_the_store_writable_and_the_audit_flush_working(
    svc: Running,
) -> None:
    orgs = [new_org() for _ in range(4)]
    seen: set[grpc.StatusCode] = set()
    for round_number in range(ROUNDS):
        seen.update(await cut_off_saves(svc, orgs, round_number))
        # No cut-off call may be answered with an error of the service's own.
        assert seen <= {
            grpc.StatusCode.OK,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.CANCELLED,
        }, f"round {round_number}: {sorted(code.name for code in seen)}"
        await asyncio.sleep(0.1)  # the server finishes the handlers of the cut-off calls

    for org in orgs:
        await svc.stub.SaveIntegration(save_request(org, SK_AFTER), timeout=30)
        read = await svc.stub.GetProviderConfig(
            pb.GetProviderConfigRequest(organization_id=org, provider="stripe", view=pb.CONFIG_VIEW_DECRYPTED),
            timeout=30,
        )
        assert values_of(read.config)["secretKey"][0] == SK_AFTER

    # A refusal is buffered, and the periodic flush writes it.
    refused = svc.stub.SaveIntegration(save_request(orgs[0], "pk_test_not_a_secret_key"), timeout=30)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await refused
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    await svc.service.audit.flush()
    assert svc.service.audit.buffered == 0
    events = await svc.stub.ListAuditEvents(pb.ListAuditEventsRequest(organization_id=orgs[0], page_size=500))
    outcomes = [(event.action, event.outcome) for event in events.events]
    assert ("SaveIntegration", "InvalidArgument") in outcomes
    assert ("SaveIntegration", "OK") in outcomes


# --- at the store ----------------------------------------------------------------------------------

PROVIDER = "stripe"


def record(rpc: str, organization_id: str, request_id: str) -> AuditRecord:
    return AuditRecord(
        time=datetime.now(UTC),
        caller="test",
        action=rpc,
        outcome="OK",
        organization_id=organization_id,
        provider=PROVIDER,
        request_id=request_id,
    )


def add_field(name: str) -> Callable[[StoredIntegration | None], dict[str, str]]:
    def mutate(current: StoredIntegration | None) -> dict[str, str]:
        return {**(dict(current.config) if current is not None else {}), name: "enc:v2:default:x"}

    return mutate


def mark(row: StoredIntegration) -> dict[str, str]:
    return {key: value + "!" for key, value in row.config.items()}


def never_refuse(current: StoredIntegration) -> None:
    del current


async def interrupted(call: Awaitable[object], how: int, rng: random.Random) -> bool:
    """Run a store call and cut it off: after a few event-loop turns, or by a tiny timeout. True if it was."""
    task = asyncio.ensure_future(call)
    if how % 32 == 0:
        # Some calls are given all the time they need, so every round also has calls that run to their end,
        # however slowly a loaded machine runs the others.
        asyncio.get_running_loop().call_later(30, task.cancel)
    elif how % 2:
        for _ in range(rng.randrange(200)):
            await asyncio.sleep(0)
        task.cancel()
    else:
        asyncio.get_running_loop().call_later(rng.uniform(0, 0.15), task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        if not task.cancelled():
            raise  # this test itself was cancelled
        return True
    except Unavailable:
        return False  # ran out of its budget behind the others: ended by the store, not cut off
    return False


async def busy_loop_during(calls: Awaitable[object]) -> None:
    """Other work keeps the event loop busy, as a loaded server's does, while the calls run and are cut off."""
    done = asyncio.Event()

    async def work() -> None:
        while not done.is_set():
            sum(range(500))
            await asyncio.sleep(0)

    workers = [asyncio.ensure_future(work()) for _ in range(8)]
    try:
        await calls
    finally:
        done.set()
        await asyncio.gather(*workers)


async def request_ids(store: IntegrationStore, organization_id: str) -> list[str]:
    entries = await store.list_audit(organization_id, 0, 10_000)
    return [entry.record.request_id for entry in entries]


async def left_behind_on_postgres(url: str) -> tuple[int, int]:
    """Sessions of this database idle inside a transaction, and advisory locks held in it."""
    conn = await asyncpg.connect(url)
    try:
        in_transaction = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()"
        )
        advisory = await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
    finally:
        await conn.close()
    return int(in_transaction), int(advisory)


async def test_store_calls_cancelled_at_any_point_commit_whole_or_not_at_all(
    store: IntegrationStore, contract_location: tuple[str, str]
) -> None:
    rng = random.Random(20261201)  # the cut-off points; seeded so a failure can be replayed
    upserted, deleted, rewrapped, appended = (new_org() for _ in range(4))
    await store.upsert(rewrapped, PROVIDER, add_field("secretKey"))
    rewrap_ids = [(await store.get(rewrapped, PROVIDER)).id]  # type: ignore[union-attr]

    cut_off = made = 0
    for round_number in range(ROUNDS):
        await store.upsert(deleted, PROVIDER, add_field("secretKey"))
        calls: list[Awaitable[bool]] = []
        for i in range(32):
            rid = f"{round_number}-{i}"
            calls.append(
                interrupted(
                    store.upsert(upserted, PROVIDER, add_field(f"f{rid}"), record("SaveIntegration", upserted, rid)),
                    i,
                    rng,
                )
            )
            calls.append(
                interrupted(
                    store.delete(deleted, PROVIDER, never_refuse, record("DeleteIntegration", deleted, rid)), i, rng
                )
            )
            calls.append(interrupted(store.rewrap(rewrap_ids, mark, record("RotateKeys", rewrapped, rid)), i, rng))
            batch = [record("GetProviderConfig", appended, rid) for _ in range(3)]
            calls.append(interrupted(store.append_audit(batch), i, rng))
        rng.shuffle(calls)
        outcomes = asyncio.gather(*calls)
        await busy_loop_during(outcomes)
        cut_off += sum(outcomes.result())
        made += len(calls)

        row = await store.get(upserted, PROVIDER)
        saved = await request_ids(store, upserted)
        assert (row.version if row else 0) == len(saved), "a save and its audit record parted"
        assert set(row.config if row else ()) == {f"f{rid}" for rid in saved}
        deletes = [rid for rid in await request_ids(store, deleted) if rid.startswith(f"{round_number}-")]
        assert len(deletes) <= 1
        assert (await store.get(deleted, PROVIDER) is None) == (len(deletes) == 1)
        rewraps = len(await request_ids(store, rewrapped))
        marked = await store.get(rewrapped, PROVIDER)
        assert marked is not None
        assert marked.config["secretKey"] == "enc:v2:default:x" + "!" * rewraps
        counts: dict[str, int] = {}
        for rid in await request_ids(store, appended):
            counts[rid] = counts.get(rid, 0) + 1
        assert set(counts.values()) <= {3}, "an audit batch was written in part"
        if contract_location[0] == "postgres":
            # Pooled connections go back outside any transaction, holding no row lock. A connection the
            # store dropped ends on the server a moment later: allow it a little time.
            left = await left_behind_on_postgres(contract_location[1])
            for _ in range(20):
                if left == (0, 0):
                    break
                await asyncio.sleep(0.1)
                left = await left_behind_on_postgres(contract_location[1])
            assert left == (0, 0), "(sessions idle in a transaction, advisory locks held)"

    assert 0 < cut_off < made, f"{cut_off} of {made} calls cut off: the timings test nothing"

    # Uninterrupted calls of every kind still work.
    after = new_org()
    assert (await store.upsert(after, PROVIDER, add_field("a"), record("SaveIntegration", after, "a"))).version == 1
    assert await store.rewrap(rewrap_ids, mark, record("RotateKeys", rewrapped, "after")) == 1
    await store.append_audit([record("GetProviderConfig", after, "b")])
    assert await store.delete(after, PROVIDER, never_refuse, record("DeleteIntegration", after, "c"))
    assert sorted(await request_ids(store, after)) == ["a", "b", "c"]


async def test_a_transaction_left_open_on_the_sqlite_write_connection_is_rolled_back_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Defence in depth: should anything ever leave the connection in a transaction, the next write recovers."""
    store = await SqliteStore.open(tmp_path / "left-open.sqlite3")
    try:
        org = new_org()
        await store._conn.execute("BEGIN")  # stands in for a bug that skipped the ROLLBACK
        await store._conn.execute(  # half of a change, never committed
            "INSERT INTO audit_events (time, caller, rpc, outcome, organization_id, provider, fields, request_id, "
            "details) VALUES ('2026-12-01T00:00:00+00:00', 'test', 'X', 'OK', ?, '', '[]', 'half', '{}')",
            (org,),
        )
        assert (await store.upsert(org, PROVIDER, add_field("a"), record("SaveIntegration", org, "whole"))).version == 1
        assert await request_ids(store, org) == ["whole"]
        assert [r.event for r in caplog.records if hasattr(r, "event")].count("sqlite_transaction_left_open") == 1  # type: ignore[attr-defined]
    finally:
        await store.close()


async def test_a_save_cancelled_while_another_process_holds_the_sqlite_write_lock_ends_within_its_budget(
    tmp_path: Path,
) -> None:
    path = tmp_path / "locked.sqlite3"
    store = await SqliteStore.open(path, timeout=1.0)
    other = sqlite3.connect(path, isolation_level=None)  # as another process sharing the file would
    try:
        org = new_org()
        other.execute("BEGIN IMMEDIATE")
        save = asyncio.ensure_future(store.upsert(org, PROVIDER, add_field("a"), record("SaveIntegration", org, "cut")))
        await asyncio.sleep(0.2)  # waiting in BEGIN IMMEDIATE for the other connection's lock
        started = time.monotonic()
        save.cancel()
        await asyncio.wait([save])
        assert save.cancelled()
        assert time.monotonic() - started < 1.0 + 0.5  # the store's timeout, plus slack for a loaded machine
        other.execute("ROLLBACK")

        saved = await store.upsert(org, PROVIDER, add_field("b"), record("SaveIntegration", org, "whole"))
        assert (saved.version, set(saved.config)) == (1, {"b"})
        assert await request_ids(store, org) == ["whole"]
    finally:
        other.close()
        await store.close()
