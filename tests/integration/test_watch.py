"""WatchConfigChanges against real servers: what a consumer of the stream sees.

On PostgreSQL two `integrations-service serve` processes, "A" and "B", share a
database as two replicas: writes go through A (or behind both, in SQL), the
streams are opened on B, so every change shown crossed the database's
notifications. The embedded SQLite store and mutual TLS run in process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import grpc
import pytest

from integrations.v1 import integrations_pb2 as pb
from integrations.v1 import integrations_pb2_grpc as pb_grpc
from integrations_service.api import convert
from integrations_service.store.postgres import ROW_LOCK_NAMESPACE
from integrations_service.store.postgres_listener import APPLICATION_NAME
from tests.conftest import CreateDatabase
from tests.harness import TEST_KEY, Running, new_org, rich_error, start_service
from tests.integration.test_metrics import sample
from tests.integration.test_mtls import MtlsService, StartMtls, start_mtls  # noqa: F401 (fixture)
from tests.integration.test_rotation import K2_KEY, cli
from tests.integration.test_row_cache import Replica, StartReplica, start_replica  # noqa: F401 (fixture)
from tests.integration.test_shutdown import wait_until_blocked
from tests.integration.test_store_outage import TcpProxy
from tests.integration.test_workers import channels, workers_env
from tests.processes import Processes, ServeProcess, scrape

WAIT = 10.0
SK = "sk_test_51HxWatchSecret00000000042"
WEBHOOK = "whsec_watch_secret_0000000001"
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
Message = pb.WatchConfigChangesResponse


class Watch:
    """One WatchConfigChanges stream, read message by message."""

    def __init__(self, stub: pb_grpc.IntegrationServiceStub, organization_id: str = "", *providers: str) -> None:
        request = pb.WatchConfigChangesRequest(organization_id=organization_id, providers=list(providers))
        self.call = stub.WatchConfigChanges(request)

    async def next(self) -> Message:
        message = await asyncio.wait_for(self.call.read(), WAIT)
        assert message is not grpc.aio.EOF, "the stream ended with OK: it never should"
        return message  # type: ignore[no-any-return]

    async def started(self) -> Watch:
        first = await self.next()
        assert first.WhichOneof("event") == "started", first
        assert first.started.HasField("start_time")
        return self

    async def change(self) -> pb.ConfigChange:
        message = await self.next()
        assert message.WhichOneof("event") == "change", message
        return message.change

    async def ended(self) -> grpc.aio.AioRpcError:
        """The status the stream ends with (after any messages still queued, which are dropped)."""
        for _ in range(10_000):
            try:
                await self.next()
            except grpc.aio.AioRpcError as error:
                return error
        raise AssertionError("the stream did not end")

    async def opened(self) -> grpc.aio.AioRpcError | None:
        """None once `started` arrived, else the status the stream was refused with."""
        try:
            await self.started()
        except grpc.aio.AioRpcError as error:
            return error
        return None


async def watch(stub: pb_grpc.IntegrationServiceStub, organization_id: str = "", *providers: str) -> Watch:
    return await Watch(stub, organization_id, *providers).started()


async def sql(url: str, statement: str, *args: object) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(statement, *args)
    finally:
        await conn.close()


async def insert(url: str, row_id: str, org: str, provider: str) -> None:
    """A row written behind the service (the dashboard, a manual fix): the trigger notifies it all the same."""
    await sql(
        url,
        "INSERT INTO integration_config (id, organization_id, provider, config) VALUES ($1, $2, $3, '{}')",
        row_id,
        org,
        provider,
    )


@pytest.fixture
async def database(postgres_database_factory: CreateDatabase) -> str:
    return await postgres_database_factory()


@pytest.fixture
async def replicas(start_replica: StartReplica, database: str) -> tuple[Replica, Replica]:  # noqa: F811
    return await start_replica("a", database), await start_replica("b", database)


@pytest.mark.postgres
async def test_saves_cleared_fields_and_deletes_through_one_replica_reach_a_stream_on_another(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    org = new_org()
    stream = await watch(b.stub, org)

    saved = await a.save(org, secretKey=SK, webhookSecret=WEBHOOK)
    change = await stream.change()
    assert (change.organization_id, change.provider, change.type) == (org, "stripe", pb.CHANGE_TYPE_SAVED)
    assert change.etag == saved.etag
    assert change.change_time == saved.update_time

    cleared = await a.stub.SaveIntegration(
        pb.SaveIntegrationRequest(organization_id=org, provider="stripe", clear_fields=["webhookSecret"]), timeout=10
    )
    change = await stream.change()
    assert (change.type, change.etag) == (pb.CHANGE_TYPE_SAVED, cleared.config.etag)
    assert change.etag != saved.etag

    await a.stub.DeleteIntegration(pb.DeleteIntegrationRequest(organization_id=org, provider="stripe"), timeout=10)
    change = await stream.change()
    assert (change.organization_id, change.provider, change.type, change.etag) == (
        org,
        "stripe",
        pb.CHANGE_TYPE_DELETED,
        "",
    )
    assert change.HasField("change_time")
    # B's answer agrees with what the stream said: the row is gone.
    assert (await b.get(org)).etag == ""
    assert await b.sample("integrations_watch_changes_sent_total") == 3
    assert await b.sample("integrations_watch_streams") == 1
    stream.call.cancel()


@pytest.mark.postgres
async def test_a_rolled_back_write_sends_nothing(replicas: tuple[Replica, Replica], database: str) -> None:
    a, b = replicas
    org = new_org()
    stream = await watch(b.stub, org)
    conn = await asyncpg.connect(database)
    try:
        transaction = conn.transaction()
        await transaction.start()
        await conn.execute(
            "INSERT INTO integration_config (id, organization_id, provider, config) VALUES ('rolled-back', $1, "
            "'stripe', '{}')",
            org,
        )
        await transaction.rollback()
    finally:
        await conn.close()
    marker = await a.save(org, secretKey=SK)
    # Changes arrive in commit order: the first one is the save, so the rolled-back insert sent nothing.
    assert (await stream.change()).etag == marker.etag
    stream.call.cancel()


@pytest.mark.postgres
async def test_the_scope_narrows_to_an_organization_and_providers(
    replicas: tuple[Replica, Replica], database: str
) -> None:
    _, b = replicas
    org, other = new_org(), new_org()
    of_org = await watch(b.stub, org, "stripe", "resend", "stripe")  # a duplicate is harmless
    resend_anywhere = await watch(b.stub, "", "resend")
    everything = await watch(b.stub)

    await insert(database, "r1", other, "stripe")
    await insert(database, "r2", org, "easypay")
    await insert(database, "r3", org, "stripe")
    await insert(database, "r4", other, "resend")
    await insert(database, "r5", org, "resend")

    def seen(change: pb.ConfigChange) -> tuple[str, str]:
        return (change.organization_id, change.provider)

    assert [seen(await of_org.change()) for _ in range(2)] == [(org, "stripe"), (org, "resend")]
    assert [seen(await resend_anywhere.change()) for _ in range(2)] == [(other, "resend"), (org, "resend")]
    assert [seen(await everything.change()) for _ in range(5)] == [
        (other, "stripe"),
        (org, "easypay"),
        (org, "stripe"),
        (other, "resend"),
        (org, "resend"),
    ]
    # Nothing else was queued for the narrow streams: the next change of theirs is the next one in scope.
    await sql(database, "DELETE FROM integration_config WHERE id = 'r3'")
    assert seen(await of_org.change()) == (org, "stripe")
    for stream in (of_org, resend_anywhere, everything):
        stream.call.cancel()


@pytest.mark.postgres
async def test_a_slow_consumer_is_told_to_resync_while_a_fast_one_keeps_every_event(
    start_replica: StartReplica,  # noqa: F811 (the imported fixture)
    database: str,
) -> None:
    queue_size = 50
    b = await start_replica("b", database, INTEGRATIONS_WATCH_QUEUE_SIZE=str(queue_size))
    # The slow consumer reads its first message, then nothing until the end. Its connection keeps the HTTP/2
    # window small (no BDP probing grows it): the server's writes to it stall after a few dozen messages.
    slow_channel = grpc.aio.insecure_channel(
        b.process.target,
        options=[
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", 8192),
        ],
    )
    slow = await watch(pb_grpc.IntegrationServiceStub(slow_channel))
    fast = await watch(b.stub)
    # Long organization ids make big messages: the slow consumer's HTTP/2 window fills sooner.
    org = "o" * 120
    batches, per_batch = 15, 40
    conn = await asyncpg.connect(database)
    try:
        for batch in range(batches):
            await conn.execute(
                "INSERT INTO integration_config (id, organization_id, provider, config) "
                "SELECT $1 || n, $2 || n, 'stripe', '{}' FROM generate_series(1, $3::int) AS n",
                f"slow-{batch}-",
                f"{org}{batch}-",
                per_batch,
            )
            # In step with the fast consumer: it never has more than one batch waiting.
            for n in range(1, per_batch + 1):
                assert (await fast.change()).organization_id == f"{org}{batch}-{n}"
    finally:
        await conn.close()

    # The stream stays live after a resync: a change made now reaches both consumers.
    await insert(database, "after", "org_after", "stripe")
    assert (await fast.change()).organization_id == "org_after"
    kinds: list[str] = []
    while not kinds or kinds[-1] != "org_after":
        message = await slow.next()
        kind = str(message.WhichOneof("event"))
        kinds.append("resync" if kind == "resync" else message.change.organization_id)
        if kind == "resync":
            assert message.resync.reason == "fell_behind"
    # What the transport had buffered before the stream's queue filled, then a resync instead of the rest (more
    # than one if the queue filled again before the consumer read), then what came later.
    resyncs = kinds.count("resync")
    assert resyncs >= 1
    assert kinds.index("resync") > 0
    assert len(kinds) - resyncs < batches * per_batch
    # The fast consumer had none: every resync counted went to the slow one.
    assert await b.sample("integrations_watch_resyncs_total", reason="fell_behind") == resyncs
    slow.call.cancel()
    fast.call.cancel()
    await slow_channel.close()


@pytest.mark.postgres
async def test_a_rewrap_by_rotate_sends_nothing(
    replicas: tuple[Replica, Replica], database: str, tmp_path: Path
) -> None:
    a, b = replicas
    org = new_org()
    await a.save(org, secretKey=SK)
    stream = await watch(b.stub, org)
    rotated = await cli(["rotate"], database, f"k2:{K2_KEY},default:{TEST_KEY}", tmp_path)
    assert rotated.returncode == 0, rotated.stderr
    assert rotated.report()["rows_rewrapped"] == 1
    marker = await a.save(org, secretKey=SK.replace("42", "43"))
    # The etag did not change with the rotation: the consumer was not bothered with it.
    assert (await stream.change()).etag == marker.etag
    stream.call.cancel()


@pytest.mark.postgres
async def test_a_lost_listener_connection_ends_the_stream_unavailable_and_a_new_one_works_after_reconnect(
    replicas: tuple[Replica, Replica], database: str
) -> None:
    a, b = replicas
    org = new_org()
    stream = await watch(b.stub, org)
    await sql(
        database,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1 AND datname = $2",
        APPLICATION_NAME,
        database.rsplit("/", 1)[1],
    )
    error = await stream.ended()
    assert error.code() is UNAVAILABLE
    assert "change feed" in (error.details() or "")

    # The listener reconnects without a restart; until it has, a new stream is refused UNAVAILABLE at once.
    for _ in range(200):
        again = Watch(b.stub, org)
        refused = await again.opened()
        if refused is None:
            break
        assert refused.code() is UNAVAILABLE
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("no stream could be opened after the listener's reconnection")
    saved = await a.save(org, secretKey=SK)
    assert (await again.change()).etag == saved.etag
    again.call.cancel()


@pytest.mark.postgres
async def test_sigterm_ends_streams_unavailable_at_once_while_an_in_flight_save_finishes(
    database: str,
    tmp_path: Path,
) -> None:
    # The grace is long: the process exits well within it only because its streams do not hold it.
    env = workers_env(database, INTEGRATIONS_SHUTDOWN_GRACE="60")
    with Processes(tmp_path) as processes:
        server = processes.serve(tmp_path / "one", env)
        await _streams_end_on_sigterm_while_saves_finish(server, database, streams=3)


@pytest.mark.postgres
async def test_serve_workers_drains_cleanly_with_open_streams(database: str, tmp_path: Path) -> None:
    env = workers_env(database, INTEGRATIONS_SHUTDOWN_GRACE="60")
    with Processes(tmp_path) as processes:
        server = processes.serve(tmp_path / "work", env, ["--workers", "2"])
        server.wait_workers_serving(2)
        metrics = env["INTEGRATIONS_METRICS_ADDRESS"]

        def open_streams() -> float:
            # One series per worker (the supervisor's multiprocess scrape): their sum is the service's.
            lines = scrape(metrics).splitlines()
            return sum(float(line.split()[-1]) for line in lines if line.startswith("integrations_watch_streams{"))

        await _streams_end_on_sigterm_while_saves_finish(server, database, streams=8, counted=open_streams)
        assert server.worker_pids() == set()


async def _streams_end_on_sigterm_while_saves_finish(
    server: ServeProcess, database: str, streams: int, counted: Callable[[], float] | None = None
) -> None:
    org = new_org()
    admin = await asyncpg.connect(database)
    watcher = await asyncpg.connect(database)
    try:
        async with channels(server.target, count=streams + 1) as stubs:
            opened = [await watch(stub, org) for stub in stubs[:streams]]
            if counted is not None:
                for _ in range(100):  # each worker's mirror copies its gauge every second
                    if counted() == streams:
                        break
                    await asyncio.sleep(0.1)
                assert counted() == streams
            lock = admin.transaction()
            await lock.start()
            await admin.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", ROW_LOCK_NAMESPACE, f"{org}/stripe")
            save = asyncio.ensure_future(
                stubs[-1].SaveIntegration(
                    pb.SaveIntegrationRequest(organization_id=org, provider="stripe", values={"secretKey": SK}),
                    timeout=60,
                )
            )
            await wait_until_blocked(watcher, database.rsplit("/", 1)[1])
            server.popen.send_signal(signal.SIGTERM)
            # Every stream ends while the save is still held: they do not wait for the grace period.
            for stream in opened:
                error = await stream.ended()
                assert error.code() is UNAVAILABLE
                assert error.details() == "server shutting down; reconnect"
            assert not save.done()
            assert server.running(), "the in-flight save holds the process"
            await lock.commit()
            reply = await save
        exit_code = await asyncio.to_thread(server.popen.wait, 30)
    finally:
        await watcher.close()
        await admin.close()
    assert reply.config.values["secretKey"].value == "••••••••0042"
    assert exit_code == 0, server.stderr()
    assert "stream ended" in server.stderr()


# --- in process: the embedded store, validation, mutual TLS ---------------------------------------------


@pytest.fixture
async def embedded_service(tmp_path: Path) -> AsyncIterator[Running]:
    running = await start_service(f"sqlite:///{tmp_path / 'store.sqlite3'}", tmp_path / "data")
    try:
        yield running
    finally:
        await running.close()


@pytest.fixture
def embedded(embedded_service: Running) -> pb_grpc.IntegrationServiceStub:
    return embedded_service.stub


async def test_the_embedded_store_streams_its_own_writes(embedded: pb_grpc.IntegrationServiceStub) -> None:
    org = new_org()
    stream = await watch(embedded, org, "stripe")
    saved = await embedded.SaveIntegration(
        pb.SaveIntegrationRequest(organization_id=org, provider="stripe", values={"secretKey": SK}), timeout=10
    )
    change = await stream.change()
    assert (change.type, change.etag, change.change_time) == (
        pb.CHANGE_TYPE_SAVED,
        saved.config.etag,
        saved.config.update_time,
    )
    await embedded.DeleteIntegration(pb.DeleteIntegrationRequest(organization_id=org, provider="stripe"), timeout=10)
    change = await stream.change()
    assert (change.type, change.etag) == (pb.CHANGE_TYPE_DELETED, "")
    stream.call.cancel()


@pytest.mark.parametrize(
    ("request_message", "field", "says"),
    [
        (pb.WatchConfigChangesRequest(providers=["stripe", "stripe", "no_such_provider"]), "providers[2]", "provider"),
        (pb.WatchConfigChangesRequest(providers=["stripe", "Not An Id"]), "providers[1]", "a-z"),
        (pb.WatchConfigChangesRequest(providers=["stripe"] * 17), "providers", "at most 16"),
        (pb.WatchConfigChangesRequest(organization_id="x" * 129), "organization_id", "at most 128"),
        (pb.WatchConfigChangesRequest(organization_id="has space"), "organization_id", "whitespace"),
    ],
)
async def test_a_bad_scope_is_invalid_argument_naming_the_field_before_any_message(
    embedded: pb_grpc.IntegrationServiceStub, request_message: pb.WatchConfigChangesRequest, field: str, says: str
) -> None:
    call = embedded.WatchConfigChanges(request_message, timeout=WAIT)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    error = rich_error(caught.value)
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert list(error.violations) == [field]
    assert says in error.violations[field]
    assert error.request_id


async def test_only_callers_with_a_role_may_watch_and_a_stranger_gets_nothing_but_permission_denied(
    start_mtls: StartMtls,  # noqa: F811
) -> None:
    mtls: MtlsService = await start_mtls()
    for role in ("dashboard", "commerce", "admin"):
        stream = await watch(mtls.stub(role))
        stream.call.cancel()
    stranger = mtls.ca.issue("stranger", uris=("spiffe://integrations.local/stranger",))
    call = mtls.stub(stranger).WatchConfigChanges(pb.WatchConfigChangesRequest(), timeout=WAIT)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()  # the very first read fails: nothing was sent before the status
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "no role in the policy" in (caught.value.details() or "")
    assert "WatchConfigChanges" in (caught.value.details() or "")


async def test_a_watch_ended_by_its_deadline_is_deadline_exceeded(embedded: pb_grpc.IntegrationServiceStub) -> None:
    call = embedded.WatchConfigChanges(pb.WatchConfigChangesRequest(), timeout=0.5)
    first = await call.read()
    assert first.WhichOneof("event") == "started"  # type: ignore[union-attr]
    with pytest.raises(grpc.aio.AioRpcError) as caught, contextlib.suppress(asyncio.CancelledError):
        await call.read()
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED


WATCH_RPC = "/integrations.v1.IntegrationService/WatchConfigChanges"


def scraped(running: Running, name: str, **labels: str) -> float:
    text = scrape(f"127.0.0.1:{running.service.metrics_port}")
    if labels:
        return sample(text, name, **labels)
    [value] = [float(line.split()[1]) for line in text.splitlines() if line.split(" ")[0] == name]
    return value


async def logged(caplog: pytest.LogCaptureFixture, message: str, count: int = 1) -> list[logging.LogRecord]:
    """The records of `message` about the watch RPC, once there are `count` (the server logs as the stream ends)."""
    for _ in range(100):
        records = [r for r in caplog.records if r.getMessage() == message and getattr(r, "rpc", None) == WATCH_RPC]
        if len(records) >= count:
            return records
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {message!r} line: {[r.getMessage() for r in caplog.records]}")


async def test_a_stream_logs_one_line_as_it_opens_and_one_as_it_ends_and_is_counted(
    embedded_service: Running, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="integrations.rpc")
    org = new_org()
    stream = await watch(embedded_service.stub, org, "stripe")
    await embedded_service.stub.SaveIntegration(
        pb.SaveIntegrationRequest(organization_id=org, provider="stripe", values={"secretKey": SK}), timeout=10
    )
    await stream.change()
    [opened] = await logged(caplog, "stream opened")
    assert (getattr(opened, "organization_id", None), getattr(opened, "providers", None)) == (org, ["stripe"])
    assert getattr(opened, "caller", None)
    assert await logged(caplog, "stream ended", count=0) == []  # nothing per event
    stream.call.cancel()
    [ended] = await logged(caplog, "stream ended")
    assert getattr(ended, "code", None) == "CANCELLED"
    assert getattr(ended, "count", None) == 2  # started and one change
    assert getattr(ended, "request_id", None) == getattr(opened, "request_id", None)
    assert SK not in caplog.text
    grpc_labels = {"grpc_type": "server_stream", "grpc_service": "integrations.v1.IntegrationService"}
    grpc_labels["grpc_method"] = "WatchConfigChanges"
    assert scraped(embedded_service, "integrations_rpc_requests_total", method=WATCH_RPC, code="CANCELLED") == 1
    assert scraped(embedded_service, "grpc_server_started_total", **grpc_labels) == 1
    assert scraped(embedded_service, "grpc_server_msg_sent_total", **grpc_labels) == 2
    assert scraped(embedded_service, "grpc_server_handled_total", grpc_code="CANCELLED", **grpc_labels) == 1
    assert scraped(embedded_service, "integrations_watch_streams") == 0


async def test_undecodable_bytes_are_invalid_argument(embedded_service: Running) -> None:
    call = embedded_service.channel.unary_stream(
        WATCH_RPC, request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    stream = call(bytes([1 << 3 | 2, 3]) + b"\xff\xfe\xfd", timeout=WAIT)  # organization_id: invalid UTF-8
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stream.read()
    error = rich_error(caught.value)
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.violations == {"request": "the request is not a valid WatchConfigChangesRequest protobuf"}
    assert error.request_id


async def test_an_unexpected_error_mid_stream_is_internal_with_the_request_id_logged(
    embedded_service: Running, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="integrations.rpc")
    stream = await watch(embedded_service.stub)
    real = convert.watch_event_to_pb

    def broken(event: object) -> pb.WatchConfigChangesResponse:
        raise RuntimeError("a bug in the translation")

    monkeypatch.setattr(convert, "watch_event_to_pb", broken)
    await embedded_service.stub.SaveIntegration(
        pb.SaveIntegrationRequest(organization_id=new_org(), provider="stripe", values={"secretKey": SK}), timeout=10
    )
    error = await stream.ended()
    monkeypatch.setattr(convert, "watch_event_to_pb", real)
    rich = rich_error(error)
    assert rich.code is grpc.StatusCode.INTERNAL
    assert rich.request_id in rich.message
    assert "a bug" not in rich.message
    [ended] = await logged(caplog, "stream ended")
    assert getattr(ended, "code", None) == "INTERNAL"
    [unexpected] = [r for r in caplog.records if r.getMessage() == "unexpected error"]
    assert unexpected.exc_info is not None
    assert getattr(unexpected, "request_id", None) == rich.request_id


async def test_keepalive_ends_the_stream_of_a_consumer_that_vanished(start_replica: StartReplica) -> None:  # noqa: F811
    server = await start_replica("k", None, INTEGRATIONS_KEEPALIVE_TIME="1", INTEGRATIONS_KEEPALIVE_TIMEOUT="1")
    host, port = server.process.target.rsplit(":", 1)
    proxy = TcpProxy(host, int(port))
    await proxy.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{proxy.port}")
    try:
        stream = await watch(pb_grpc.IntegrationServiceStub(channel))
        assert await server.sample("integrations_watch_streams") == 1
        # The consumer's host vanishes: its connection stays open, but nothing comes back, not even a ping's ack.
        proxy.freeze()
        for _ in range(300):
            if await server.sample("integrations_watch_streams") == 0:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the server still holds the stream of a consumer that stopped answering")
        assert "CANCELLED" in server.process.stderr()
        stream.call.cancel()
    finally:
        proxy.thaw()
        await channel.close()
        await proxy.stop()
