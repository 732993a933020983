"""The clients' watch (WatchConfigChanges) against the real service, and against the scripted fake server.

The cached client keeps one watch stream and evicts what changed: a value
saved, cleared or deleted through another client is served right after its
event, with a TTL (300 s) far too long to explain it. The watch falls back to
the TTL while the stream is down and invalidates everything when it
resubscribes (a real server process stopped and started on the same port,
changed meanwhile through a second process sharing its database). The fake
server scripts what the real one cannot be made to do on demand: a read in
flight when its key changes, a replica answering an older version, a resync,
a refusal (UNIMPLEMENTED, PERMISSION_DENIED). Tests wait for the cache's
counters, never for a fixed time.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from integrations.v1 import integrations_pb2 as pb
from integrations_client import (
    ChangeKind,
    ConfigChangeEvent,
    IntegrationsClient,
    IntegrationsClientSync,
    InvalidArgument,
    Unavailable,
    ValueSource,
    WatchStarted,
)
from integrations_service.store.postgres_listener import APPLICATION_NAME
from tests.client_fixtures import PK, SK, SK_2, FakeServer, until
from tests.harness import Running, new_org
from tests.integration.client_service import (  # noqa: F401 (fixtures)
    client_fake,
    client_processes,
    client_service_env,
    client_svc,
    serve_env,
)
from tests.integration.test_row_cache import StartReplica, sql, start_replica  # noqa: F401 (fixture)
from tests.processes import Processes, free_port

STRIPE = {"secretKey": SK}
LONG_TTL = 300.0  # a changed value served within a test can only come from the watch


def watching(client: IntegrationsClient | IntegrationsClientSync) -> bool:
    return client.cache_stats.watching


async def next_event(stream: AsyncIterator[object]) -> object:
    return await asyncio.wait_for(anext(stream), 10)


# --- the cache, against the real service -------------------------------------------------------------------


async def test_a_save_through_another_client_is_served_right_after_its_event(svc: Running) -> None:
    org = new_org()
    async with (
        IntegrationsClient(svc.target, cache_ttl=LONG_TTL) as reader,
        IntegrationsClient(svc.target, cache_ttl=0) as writer,
    ):
        await writer.save(org, "stripe", values=STRIPE)
        assert (await reader.get_config(org, "stripe"))["secretKey"] == SK
        assert reader.cache_stats.watching  # the first read waited for the stream to be live
        assert (await reader.get_config(org, "stripe"))["secretKey"] == SK
        assert (reader.cache_stats.rpc_count, reader.cache_stats.hits) == (1, 1)

        saved = await writer.save(org, "stripe", values={"secretKey": SK_2})
        await until(lambda: reader.cache_stats.watch_evictions == 1, "the change event")
        creds = await reader.get_config(org, "stripe")
        assert creds["secretKey"] == SK_2
        assert creds.etag == saved.etag
        stats = reader.cache_stats
        assert (stats.rpc_count, stats.watch_events, stats.watch_subscriptions) == (2, 1, 1)
        watcher = reader._watch_task
    assert watcher is not None
    assert watcher.done()  # close() ended the watch task: nothing left pending on the loop
    assert not reader.cache_stats.watching


async def test_clear_fields_and_delete_are_served_right_after_their_events(svc: Running) -> None:
    org = new_org()
    async with (
        IntegrationsClient(svc.target, cache_ttl=LONG_TTL) as reader,
        IntegrationsClient(svc.target, cache_ttl=0) as writer,
    ):
        own_key = "pk_test_51WatchOwnPublishable01"
        await writer.save(org, "stripe", values={**STRIPE, "publishableKey": own_key})
        assert (await reader.get_config(org, "stripe"))["publishableKey"] == own_key

        await writer.save(org, "stripe", clear_fields=["publishableKey"])
        await until(lambda: reader.cache_stats.watch_evictions == 1, "the clear_fields event")
        cleared = await reader.get_config(org, "stripe")
        assert cleared["publishableKey"] == PK
        assert cleared.source("publishableKey") is ValueSource.ENVIRONMENT

        await writer.delete(org, "stripe")
        await until(lambda: reader.cache_stats.watch_evictions == 2, "the delete event")
        deleted = await reader.get_config(org, "stripe")
        assert deleted.source("secretKey") is ValueSource.UNSET
        assert deleted.etag == ""
        assert reader.cache_stats.rpc_count == 3


async def test_with_the_watch_off_the_ttl_alone_decides(svc: Running) -> None:
    org = new_org()
    async with (
        IntegrationsClient(svc.target, cache_ttl=LONG_TTL, watch=False) as unwatched,
        IntegrationsClient(svc.target, cache_ttl=LONG_TTL) as probe,
        IntegrationsClient(svc.target, cache_ttl=0) as writer,
    ):
        await writer.save(org, "stripe", values=STRIPE)
        await unwatched.get_config(org, "stripe")
        await probe.get_config(org, "stripe")
        await writer.save(org, "stripe", values={"secretKey": SK_2})
        await until(lambda: probe.cache_stats.watch_evictions == 1, "the probe's change event")
        # The event was sent; the client without a watch still serves its cached value, for up to its TTL.
        assert (await unwatched.get_config(org, "stripe"))["secretKey"] == SK
        stats = unwatched.cache_stats
        assert (stats.watching, stats.watch_subscriptions, stats.rpc_count, stats.hits) == (False, 0, 1, 1)
        assert (await probe.get_config(org, "stripe"))["secretKey"] == SK_2


async def test_the_sync_client_is_served_right_after_the_event_too(svc: Running) -> None:
    org = new_org()
    reader = IntegrationsClientSync(svc.target, cache_ttl=LONG_TTL)
    try:
        async with IntegrationsClient(svc.target, cache_ttl=0) as writer:
            await writer.save(org, "stripe", values=STRIPE)
            assert (await asyncio.to_thread(reader.get_config, org, "stripe"))["secretKey"] == SK
            assert reader.cache_stats.watching
            await writer.save(org, "stripe", values={"secretKey": SK_2})
            await until(lambda: reader.cache_stats.watch_evictions == 1, "the change event")
            assert (await asyncio.to_thread(reader.get_config, org, "stripe"))["secretKey"] == SK_2
            await writer.delete(org, "stripe")
            await until(lambda: reader.cache_stats.watch_evictions == 2, "the delete event")
            creds = await asyncio.to_thread(reader.get_config, org, "stripe")
            assert creds.source("secretKey") is ValueSource.UNSET
            assert reader.cache_stats.rpc_count == 3
    finally:
        await asyncio.to_thread(reader.close)
    assert reader._watch_thread is not None
    assert not reader._watch_thread.is_alive()  # close() stopped the watch thread


# --- restarts: back to the TTL while down, everything invalidated on resubscribe ------------------------------


@pytest.mark.parametrize("kind", ["aio", "sync"])
async def test_the_cache_resubscribes_after_a_server_restart(kind: str, tmp_path: Path, processes: Processes) -> None:
    target, other = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    process = await asyncio.to_thread(processes.serve, tmp_path, serve_env(tmp_path, target), target=target)
    # A second replica on the same database, up while the first one restarts.
    await asyncio.to_thread(processes.serve, tmp_path, serve_env(tmp_path, other), target=other)
    org = new_org()
    aio = IntegrationsClient(target, cache_ttl=LONG_TTL, timeout=5) if kind == "aio" else None
    sync = IntegrationsClientSync(target, cache_ttl=LONG_TTL, timeout=5) if kind == "sync" else None

    async def get_config() -> str:
        creds = await aio.get_config(org, "stripe") if aio else await asyncio.to_thread(sync.get_config, org, "stripe")  # type: ignore[union-attr]
        return creds["secretKey"]

    client = aio or sync
    assert client is not None
    try:
        async with IntegrationsClient(other, cache_ttl=0) as writer:
            await writer.save(org, "stripe", values=STRIPE)
            assert await get_config() == SK
            assert client.cache_stats.watching

            await asyncio.to_thread(process.terminate)  # SIGTERM: the server ends its streams, UNAVAILABLE
            await until(lambda: not watching(client), "the watch to notice the stop")
            await writer.save(org, "stripe", values={"secretKey": SK_2})  # through the other replica, unseen
            assert await get_config() == SK  # the cached value, within its TTL: the fallback
            assert client.cache_stats.hits == 1

            await asyncio.to_thread(processes.serve, tmp_path, serve_env(tmp_path, target), target=target)
            await until(lambda: client.cache_stats.watch_subscriptions == 2, "the resubscription", within=30)
            assert client.cache_stats.size == 0  # changes during the gap are unknown: everything forgotten
            assert await get_config() == SK_2
            assert client.cache_stats.rpc_count == 2
    finally:
        if aio:
            await aio.close()
        if sync:
            await asyncio.to_thread(sync.close)


@pytest.mark.postgres
async def test_a_cached_client_on_one_replica_follows_saves_through_another_and_a_lost_listener(
    start_replica: StartReplica,  # noqa: F811
    postgres_database_url: str,
) -> None:
    a = await start_replica("a", postgres_database_url)
    b = await start_replica("b", postgres_database_url)
    org = new_org()
    async with (
        IntegrationsClient(b.process.target, cache_ttl=LONG_TTL) as reader,
        IntegrationsClient(a.process.target, cache_ttl=0) as writer,
    ):
        await writer.save(org, "stripe", values=STRIPE)
        assert (await reader.get_config(org, "stripe"))["secretKey"] == SK
        saved = await writer.save(org, "stripe", values={"secretKey": SK_2})  # A's commit, B's notification
        await until(lambda: reader.cache_stats.watch_evictions == 1, "the change through PostgreSQL")
        creds = await reader.get_config(org, "stripe")
        assert (creds["secretKey"], creds.etag) == (SK_2, saved.etag)

        # B loses its LISTEN connection (what a database failover does to it): B ends the stream, refuses new
        # ones until it has reconnected; the client resubscribes by itself and forgets what it cached.
        await sql(
            postgres_database_url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1 AND datname = $2",
            APPLICATION_NAME,
            postgres_database_url.rsplit("/", 1)[1],
        )
        await until(lambda: reader.cache_stats.watch_subscriptions == 2, "the resubscription", within=30)
        assert reader.cache_stats.size == 0
        await writer.delete(org, "stripe")
        await until(lambda: reader.cache_stats.watch_events == 2, "the delete on the new stream")
        assert (await reader.get_config(org, "stripe")).source("secretKey") is ValueSource.UNSET


# --- the public stream ---------------------------------------------------------------------------------------


async def test_watch_changes_yields_started_then_the_changes_in_its_scope(svc: Running) -> None:
    org, elsewhere = new_org(), new_org()
    async with IntegrationsClient(svc.target) as client:
        async with client.watch_changes(org, ["stripe"]) as changes:
            assert isinstance(await next_event(changes), WatchStarted)
            await client.save(elsewhere, "stripe", values=STRIPE)  # another organization: out of scope
            await client.save(org, "resend", values={"apiKey": "re_watch_scope_0001"})  # another provider
            saved = await client.save(org, "stripe", values=STRIPE)
            await client.delete(org, "stripe")
            change = await next_event(changes)
            assert change == ConfigChangeEvent(
                organization_id=org, provider="stripe", etag=saved.etag, kind=ChangeKind.SAVED, time=saved.update_time
            )
            deleted = await next_event(changes)
            assert isinstance(deleted, ConfigChangeEvent)
            assert (deleted.organization_id, deleted.kind, deleted.etag) == (org, ChangeKind.DELETED, "")
            assert deleted.time is not None
            assert SK not in repr(change)
        with pytest.raises(StopAsyncIteration):  # closed: the iteration ends
            await anext(changes)

        with pytest.raises(InvalidArgument) as caught:
            async for _ in client.watch_changes(org, ["paypal"]):
                pass
        assert caught.value.fields == ["providers[0]"]


async def test_closing_the_client_ends_its_streams(svc: Running) -> None:
    client = IntegrationsClient(svc.target)
    changes = client.watch_changes()
    assert isinstance(await next_event(changes), WatchStarted)
    pending = asyncio.ensure_future(anext(changes))
    await asyncio.sleep(0)
    await client.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(pending, 10)
    with pytest.raises(RuntimeError, match="closed"):
        client.watch_changes()


async def test_the_sync_watch_changes_is_a_blocking_iterator_closed_from_another_thread(svc: Running) -> None:
    org = new_org()
    client = IntegrationsClientSync(svc.target)
    events: list[object] = []
    first = threading.Event()

    def consume() -> None:
        with client.watch_changes(org) as changes:
            for event in changes:
                events.append(event)
                first.set()

    try:
        consumer = asyncio.ensure_future(asyncio.to_thread(consume))
        assert await asyncio.to_thread(first.wait, 10)
        saved = await asyncio.to_thread(client.save, org, "stripe", values=STRIPE)
        await until(lambda: len(events) == 2, "the change")
        stream = client.watch_changes(org)
        assert isinstance(await asyncio.to_thread(next, stream), WatchStarted)
        stream.close()  # what another thread would do to stop a consumer
        assert await asyncio.to_thread(lambda: next(stream, "ended")) == "ended"
    finally:
        await asyncio.to_thread(client.close)  # ends the consumer's stream too
    await asyncio.wait_for(consumer, 10)
    assert isinstance(events[0], WatchStarted)
    assert events[1] == ConfigChangeEvent(org, "stripe", saved.etag, ChangeKind.SAVED, saved.update_time)


# --- the fake server: races, resyncs, refusals -----------------------------------------------------------------


def started() -> pb.WatchConfigChangesResponse:
    return pb.WatchConfigChangesResponse(started=pb.WatchStarted())


def change(etag: str, org: str = "org_1") -> pb.WatchConfigChangesResponse:
    return pb.WatchConfigChangesResponse(
        change=pb.ConfigChange(organization_id=org, provider="stripe", etag=etag, type=pb.CHANGE_TYPE_SAVED)
    )


@pytest.fixture
def stream(fake: FakeServer) -> asyncio.Queue[pb.WatchConfigChangesResponse | grpc.StatusCode | None]:
    queue: asyncio.Queue[pb.WatchConfigChangesResponse | grpc.StatusCode | None] = asyncio.Queue()
    fake.script.watch = queue
    queue.put_nowait(started())
    return queue


async def test_a_read_racing_a_change_does_not_store_the_old_value(
    fake: FakeServer, stream: asyncio.Queue[pb.WatchConfigChangesResponse | grpc.StatusCode | None]
) -> None:
    async with IntegrationsClient(fake.target, cache_ttl=LONG_TTL) as client:
        await client.get_config("org_1", "stripe")  # the fake answers etag "fake-etag"
        assert (client.cache_stats.watching, client.cache_stats.size) == (True, 1)

        # A change to a version the fake does not serve: its answers are an older version (a replica whose feed
        # lags), served but never stored.
        stream.put_nowait(change("fake-etag-2"))
        await until(lambda: client.cache_stats.watch_evictions == 1, "the first change")
        for expected_rpcs in (2, 3):
            await client.get_config("org_1", "stripe")
            assert (client.cache_stats.rpc_count, client.cache_stats.size) == (expected_rpcs, 0)

        # The version the fake serves is announced while a read is on its way: that read may predate the
        # change, so it is not stored either; the next one is.
        fake.script.delays["GetProviderConfig"] = 0.5
        in_flight = asyncio.ensure_future(client.get_config("org_1", "stripe"))
        await until(lambda: fake.script.calls["GetProviderConfig"] == 4, "the read to reach the server")
        stream.put_nowait(change("fake-etag"))
        await until(lambda: client.cache_stats.watch_events == 2, "the second change")
        assert (await in_flight).etag == "fake-etag"
        assert client.cache_stats.size == 0
        fake.script.delays.clear()
        await client.get_config("org_1", "stripe")
        await client.get_config("org_1", "stripe")
        assert (client.cache_stats.rpc_count, client.cache_stats.size, client.cache_stats.hits) == (5, 1, 1)


async def test_one_watch_stream_per_client_whatever_its_channels(
    fake: FakeServer, stream: asyncio.Queue[pb.WatchConfigChangesResponse | grpc.StatusCode | None]
) -> None:
    async with IntegrationsClient(fake.target, cache_ttl=LONG_TTL, channels=3) as client:
        for org in ("org_1", "org_2", "org_3", "org_4"):
            await client.get_config(org, "stripe")
        stream.put_nowait(change("fake-etag-2", org="org_3"))
        await until(lambda: client.cache_stats.watch_evictions == 1, "the change")
        assert client.cache_stats.size == 3
        assert fake.script.calls["WatchConfigChanges"] == 1


async def test_resync_and_a_lost_stream_invalidate_everything(
    fake: FakeServer, stream: asyncio.Queue[pb.WatchConfigChangesResponse | grpc.StatusCode | None]
) -> None:
    async with IntegrationsClient(fake.target, cache_ttl=LONG_TTL) as client:
        await client.get_config("org_1", "stripe")
        await client.get_config("org_2", "stripe")
        stream.put_nowait(pb.WatchConfigChangesResponse(resync=pb.WatchResync(reason="fell_behind")))
        await until(lambda: client.cache_stats.watch_resyncs == 1, "the resync")
        assert client.cache_stats.size == 0
        assert client.cache_stats.watching  # the stream stays live

        await client.get_config("org_1", "stripe")
        stream.put_nowait(grpc.StatusCode.UNAVAILABLE)  # the server lost its feed
        await until(lambda: fake.script.calls["WatchConfigChanges"] == 2, "the resubscription")
        assert not client.cache_stats.watching
        await client.get_config("org_1", "stripe")  # meanwhile: the TTL
        assert (client.cache_stats.hits, client.cache_stats.size) == (1, 1)
        stream.put_nowait(started())
        await until(lambda: client.cache_stats.watch_subscriptions == 2, "the second subscription")
        assert client.cache_stats.size == 0


@pytest.mark.parametrize("code", [grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.PERMISSION_DENIED])
@pytest.mark.parametrize("kind", ["aio", "sync"])
async def test_a_refused_watch_falls_back_to_the_ttl_and_is_logged_once(
    kind: str, code: grpc.StatusCode, fake: FakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    if code is grpc.StatusCode.PERMISSION_DENIED:
        fake.script.watch = asyncio.Queue()
        fake.script.fail("WatchConfigChanges", code)
    caplog.set_level(logging.INFO, logger="integrations_client")
    if kind == "aio":
        async with IntegrationsClient(fake.target, cache_ttl=LONG_TTL) as aio:
            first = await aio.get_config("org_1", "stripe")
            assert await aio.get_config("org_1", "stripe") is first
            stats = aio.cache_stats
    else:
        sync = IntegrationsClientSync(fake.target, cache_ttl=LONG_TTL)
        try:
            first = await asyncio.to_thread(sync.get_config, "org_1", "stripe")
            assert await asyncio.to_thread(sync.get_config, "org_1", "stripe") is first
            stats = sync.cache_stats
        finally:
            await asyncio.to_thread(sync.close)  # promptly, though the thread waits minutes for its next try
        assert sync._watch_thread is not None
        assert not sync._watch_thread.is_alive()
    assert (stats.watching, stats.rpc_count, stats.hits) == (False, 1, 1)
    assert fake.script.calls["WatchConfigChanges"] == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert code.name in warnings[0]
    assert "TTL" in warnings[0]


async def test_the_public_stream_raises_the_end_of_the_stream_as_the_clients_error(
    fake: FakeServer, stream: asyncio.Queue[pb.WatchConfigChangesResponse | grpc.StatusCode | None]
) -> None:
    async with IntegrationsClient(fake.target, cache_ttl=0) as client:
        changes = client.watch_changes()
        assert isinstance(await next_event(changes), WatchStarted)
        stream.put_nowait(grpc.StatusCode.UNAVAILABLE)
        with pytest.raises(Unavailable):
            await next_event(changes)
        stream.put_nowait(started())
        stream.put_nowait(None)  # ends cleanly: still an end the consumer must handle, raised the same way
        changes = client.watch_changes()
        assert isinstance(await next_event(changes), WatchStarted)
        with pytest.raises(Unavailable, match="ended"):
            await next_event(changes)
