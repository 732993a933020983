"""PostgreSQL goes away and comes back while the service keeps running.

The service reaches PostgreSQL through a TCP proxy the test controls: stopping
the proxy closes its listener and every forwarded connection (a crash or a
network cut), starting it again on the same port brings the database back.
Every call must answer UNAVAILABLE quickly during the outage, change nothing,
and succeed again afterwards on the same running service.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg  # type: ignore[import-untyped]
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from integrations.v1 import integrations_pb2 as pb
from integrations_service.api.readiness import PROBE_INTERVAL
from tests.conftest import CreateDatabase
from tests.harness import Running, new_org, rich_error, start_service, values_of

pytestmark = pytest.mark.postgres

DB_TIMEOUT = 1.0
# Connection refused is immediate and a stalled connection waits DB_TIMEOUT; the rest is slack for slow CI.
BOUND = 3 * DB_TIMEOUT + 1.0
RPC_DEADLINE = 15.0  # the client's own deadline: a hang shows up as DEADLINE_EXCEEDED, not a stuck test
DECRYPTED = pb.CONFIG_VIEW_DECRYPTED
SK = "sk_test_51HxOutageBefore00001111"
SK_DURING = "sk_test_51HxOutageDuring00002222"
SK_AFTER = "sk_test_51HxOutageAfter000003333"

T = TypeVar("T")


class TcpProxy:
    """Forwards 127.0.0.1:<port> to an upstream address; stoppable and restartable on the same port."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.BaseTransport] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.port = 0

    async def start(self) -> None:
        assert self._server is None
        # reuse_address (the default on POSIX) lets the port be bound again right after stop().
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Refuse new connections and cut every open one, both sides, at once."""
        server, self._server = self._server, None
        assert server is not None
        server.close()
        await server.wait_closed()
        for transport in list(self._transports):
            transport.abort()
        self._flowing.set()  # releases what freeze() holds: it meets closed transports and ends
        await asyncio.gather(*self._handlers, return_exceptions=True)

    def freeze(self) -> None:
        """A network partition: connections stay open, but no byte gets through until thaw()."""
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    @property
    def open_connections(self) -> int:
        return len(self._handlers)

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)  # type: ignore[arg-type]
        transports = [client_writer.transport]
        self._transports.update(transports)
        try:
            await self._flowing.wait()
            if self._server is None:
                return
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection(*self._upstream)
            except OSError:
                return
            transports.append(upstream_writer.transport)
            self._transports.add(upstream_writer.transport)
            if self._server is None:  # stopped while we were connecting upstream
                return
            pipes = [
                asyncio.ensure_future(self._pipe(client_reader, upstream_writer)),
                asyncio.ensure_future(self._pipe(upstream_reader, client_writer)),
            ]
            # Either side closing ends the pair, as a real cut would.
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            for pipe in pipes:
                pipe.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
        finally:
            for transport in transports:
                transport.abort()
                self._transports.discard(transport)
            self._handlers.discard(task)  # type: ignore[arg-type]

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                await self._flowing.wait()  # held, like packets in a partition, until thaw()
                writer.write(data)
                await writer.drain()


def _with_address(url: str, host: str, port: int) -> str:
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{host}:{port}" if userinfo else f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


@pytest.fixture
async def database_url(postgres_database_factory: CreateDatabase) -> str:
    """A database of its own: terminating its backends disturbs no other test."""
    return await postgres_database_factory()


@pytest.fixture
async def proxy(database_url: str) -> AsyncIterator[TcpProxy]:
    parts = urlsplit(database_url)
    running = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    await running.start()
    yield running
    if running._server is not None:
        await running.stop()


@pytest.fixture
async def proxied(proxy: TcpProxy, database_url: str, tmp_path: Path) -> AsyncIterator[Running]:
    url = _with_address(database_url, "127.0.0.1", proxy.port)
    # No row cache: these tests are about the store's waits (a cached row outlives a partition by up to its
    # TTL; tests/integration/test_row_cache.py shows that bound).
    running = await start_service(
        url, tmp_path, {"INTEGRATIONS_DB_TIMEOUT": str(DB_TIMEOUT), "INTEGRATIONS_CACHE_TTL": "0"}
    )
    yield running
    await running.close()


@pytest.fixture
async def direct(database_url: str, tmp_path: Path) -> AsyncIterator[Running]:
    running = await start_service(database_url, tmp_path, {"INTEGRATIONS_DB_TIMEOUT": str(DB_TIMEOUT)})
    yield running
    await running.close()


def get(svc: Running, org: str) -> Any:
    return svc.stub.GetProviderConfig(
        pb.GetProviderConfigRequest(organization_id=org, provider="stripe", view=DECRYPTED),
        timeout=RPC_DEADLINE,
    )


def save(svc: Running, org: str, **values: str) -> Any:
    return svc.stub.SaveIntegration(
        pb.SaveIntegrationRequest(organization_id=org, provider="stripe", values=values),
        timeout=RPC_DEADLINE,
    )


def list_providers(svc: Running, org: str = "") -> Any:
    return svc.stub.ListProviders(pb.ListProvidersRequest(organization_id=org), timeout=RPC_DEADLINE)


async def timed(call: Awaitable[T]) -> tuple[T | grpc.aio.AioRpcError, float]:
    started = time.monotonic()
    try:
        result: T | grpc.aio.AioRpcError = await call
    except grpc.aio.AioRpcError as error:
        result = error
    return result, time.monotonic() - started


async def raw_version_and_config(database_url: str, org: str) -> tuple[int, str]:
    conn = await asyncpg.connect(database_url)
    try:
        record = await conn.fetchrow(
            "SELECT version, config::text AS config FROM integration_config "
            "WHERE organization_id = $1 AND provider = 'stripe'",
            org,
        )
    finally:
        await conn.close()
    return record["version"], record["config"]


def assert_unavailable(result: object, elapsed: float, svc: Running, database_url: str) -> None:
    assert isinstance(result, grpc.aio.AioRpcError), f"expected UNAVAILABLE, the call succeeded: {result}"
    error = rich_error(result)
    assert error.code is grpc.StatusCode.UNAVAILABLE, f"{error.code}: {error.message}"
    # From the service itself (its request id), not the client failing to reach the gRPC server.
    assert error.request_id
    assert "credential store" in error.message
    assert urlsplit(database_url).path.lstrip("/") not in error.message  # never the DSN
    assert elapsed < BOUND, f"UNAVAILABLE took {elapsed:.2f}s (INTEGRATIONS_DB_TIMEOUT={DB_TIMEOUT})"


async def test_calls_are_unavailable_while_postgres_is_down_and_succeed_once_it_is_back(
    proxied: Running, proxy: TcpProxy, database_url: str
) -> None:
    svc = proxied
    org = new_org()
    before = (await save(svc, org, secretKey=SK)).config
    # Several pooled connections, all of which the outage will cut.
    await asyncio.gather(*(get(svc, org) for _ in range(4)))
    assert proxy.open_connections >= 1
    stored_before = await raw_version_and_config(database_url, org)

    await proxy.stop()
    assert proxy.open_connections == 0

    # One at a time (a gRPC call starts when it is created, hence the lambdas), each timed on its own.
    for name, call in (
        ("GetProviderConfig", lambda: get(svc, org)),
        ("SaveIntegration", lambda: save(svc, org, secretKey=SK_DURING)),
        ("ListProviders", lambda: list_providers(svc, org)),
        ("GetProviderConfig again", lambda: get(svc, org)),
    ):
        result, elapsed = await timed(call())
        try:
            assert_unavailable(result, elapsed, svc, database_url)
        except AssertionError as failure:
            raise AssertionError(f"{name} during the outage: {failure}") from None

    # The catalog does not need the store: it is still served.
    catalog = await list_providers(svc)
    assert "stripe" in [p.id for p in catalog.providers]
    # The save attempted during the outage changed nothing (read directly, around the proxy).
    assert await raw_version_and_config(database_url, org) == stored_before

    await proxy.start()  # same port: the service's DATABASE_URL is unchanged

    config = (await get(svc, org)).config
    assert values_of(config)["secretKey"] == (SK, pb.VALUE_SOURCE_ORGANIZATION)
    assert config.etag == before.etag
    saved = (await save(svc, org, secretKey=SK_AFTER)).config
    assert saved.etag != before.etag
    assert values_of((await get(svc, org)).config)["secretKey"][0] == SK_AFTER
    stripe = next(p for p in (await list_providers(svc, org)).providers if p.id == "stripe")
    assert stripe.configured


async def test_a_network_partition_answers_unavailable_within_the_database_timeout(
    proxied: Running, proxy: TcpProxy, database_url: str
) -> None:
    """Nothing refuses the connection here: only INTEGRATIONS_DB_TIMEOUT bounds the wait."""
    svc = proxied
    org = new_org()
    before = (await save(svc, org, secretKey=SK)).config
    await asyncio.gather(*(get(svc, org) for _ in range(4)))
    stored_before = await raw_version_and_config(database_url, org)

    proxy.freeze()
    try:
        for name, call in (
            ("GetProviderConfig", lambda: get(svc, org)),
            ("SaveIntegration", lambda: save(svc, org, secretKey=SK_DURING)),
            ("ListProviders", lambda: list_providers(svc, org)),
        ):
            result, elapsed = await timed(call())
            try:
                assert_unavailable(result, elapsed, svc, database_url)
            except AssertionError as failure:
                raise AssertionError(f"{name} during the partition: {failure}") from None
        assert await raw_version_and_config(database_url, org) == stored_before
    finally:
        proxy.thaw()

    config = (await get(svc, org)).config
    assert values_of(config)["secretKey"][0] == SK
    assert config.etag == before.etag
    await save(svc, org, secretKey=SK_AFTER)
    assert values_of((await get(svc, org)).config)["secretKey"][0] == SK_AFTER


async def test_a_second_outage_is_survived_too(proxied: Running, proxy: TcpProxy, database_url: str) -> None:
    svc = proxied
    org = new_org()
    await save(svc, org, secretKey=SK)
    for round_ in range(2):
        await proxy.stop()
        result, elapsed = await timed(get(svc, org))
        assert_unavailable(result, elapsed, svc, database_url)
        await proxy.start()
        value = f"sk_test_51HxOutageRound{round_}000004444"
        await save(svc, org, secretKey=value)
        assert values_of((await get(svc, org)).config)["secretKey"][0] == value


async def terminate_backends(admin_url: str, database_url: str) -> int:
    """What a PostgreSQL restart or failover does to the service's pooled connections."""
    conn = await asyncpg.connect(admin_url)
    try:
        killed = await conn.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            urlsplit(database_url).path.lstrip("/"),
        )
    finally:
        await conn.close()
    return sum(1 for record in killed if record[0])


@pytest.mark.parametrize("rpc", ["GetProviderConfig", "SaveIntegration", "ListProviders"])
async def test_calls_recover_after_postgres_terminates_every_backend(
    direct: Running, postgres_server: str, database_url: str, rpc: str
) -> None:
    svc = direct
    org = new_org()
    await save(svc, org, secretKey=SK)
    saved = [SK]

    async def save_next() -> object:
        value = f"sk_test_51HxAfterTermination{len(saved):04d}"
        reply = await save(svc, org, secretKey=value)
        saved.append(value)
        return reply

    calls = {
        "GetProviderConfig": lambda: get(svc, org),
        "SaveIntegration": save_next,
        "ListProviders": lambda: list_providers(svc, org),
    }
    # Several idle pooled connections, so the next calls meet dead ones.
    await asyncio.gather(*(get(svc, org) for _ in range(5)))
    assert await terminate_backends(postgres_server, database_url) >= 1

    first, elapsed = await timed(calls[rpc]())
    if isinstance(first, grpc.aio.AioRpcError):  # allowed once, and only as UNAVAILABLE
        assert_unavailable(first, elapsed, svc, database_url)
    for _ in range(3):
        await calls[rpc]()  # every following call succeeds

    assert values_of((await get(svc, org)).config)["secretKey"][0] == saved[-1]
    if rpc == "SaveIntegration":
        assert len(saved) >= 4


# --- outages PostgreSQL reports with a SQLSTATE -------------------------------------------------------


def unavailable_count(svc: Running) -> float:
    registry = svc.service.metrics.registry
    return sum(
        registry.get_sample_value("integrations_store_unavailable_total", {"operation": operation}) or 0.0
        for operation in ("get", "upsert", "list_for_organization")
    )


async def admin(admin_url: str, *statements: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def assert_every_call_unavailable(svc: Running, org: str, database_url: str) -> None:
    counted = unavailable_count(svc)
    for name, call in (
        ("GetProviderConfig", lambda: get(svc, org)),
        ("SaveIntegration", lambda: save(svc, org, secretKey=SK_DURING)),
        ("ListProviders", lambda: list_providers(svc, org)),
    ):
        result, elapsed = await timed(call())
        try:
            assert_unavailable(result, elapsed, svc, database_url)
        except AssertionError as failure:
            raise AssertionError(f"{name}: {failure}") from None
    assert unavailable_count(svc) == counted + 3, "the unavailable metric did not count every refused call"


async def assert_served_again(svc: Running, org: str) -> None:
    assert values_of((await get(svc, org)).config)["secretKey"][0] == SK
    await save(svc, org, secretKey=SK_AFTER)
    assert values_of((await get(svc, org)).config)["secretKey"][0] == SK_AFTER


async def test_a_database_that_refuses_connections_is_unavailable_until_it_allows_them_again(
    direct: Running, postgres_server: str, database_url: str
) -> None:
    """SQLSTATE 55000 (`ALTER DATABASE … ALLOW_CONNECTIONS false`): an outage, not an internal error."""
    svc = direct
    org = new_org()
    await save(svc, org, secretKey=SK)
    name = urlsplit(database_url).path.lstrip("/")
    await admin(postgres_server, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
    try:
        await terminate_backends(postgres_server, database_url)
        await assert_every_call_unavailable(svc, org, database_url)
    finally:
        await admin(postgres_server, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    await assert_served_again(svc, org)


async def test_a_database_renamed_away_is_unavailable_until_it_is_back(
    direct: Running, postgres_server: str, database_url: str
) -> None:
    """SQLSTATE 3D000 after start-up (the database was renamed or dropped): an outage, not an internal error."""
    svc = direct
    org = new_org()
    await save(svc, org, secretKey=SK)
    name = urlsplit(database_url).path.lstrip("/")
    moved = f"{name}_moved"
    # No session may use a database being renamed: keep the service's pool out first.
    await admin(postgres_server, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
    await terminate_backends(postgres_server, database_url)
    await admin(
        postgres_server,
        f'ALTER DATABASE "{name}" RENAME TO "{moved}"',
        f'ALTER DATABASE "{moved}" ALLOW_CONNECTIONS true',
    )
    try:
        await assert_every_call_unavailable(svc, org, database_url)
    finally:
        await admin(postgres_server, f'ALTER DATABASE "{moved}" RENAME TO "{name}"')
    await assert_served_again(svc, org)


# --- readiness ------------------------------------------------------------------------------------------

SERVICE_NAME = "integrations.v1.IntegrationService"
# The probe runs at least every 5 s, and its check waits at most INTEGRATIONS_DB_TIMEOUT.
READINESS_BOUND = 5.0 + DB_TIMEOUT + 1.0


async def health(svc: Running, service: str) -> str:
    stub = health_pb2_grpc.HealthStub(svc.channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_DEADLINE)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


async def wait_for_health(svc: Running, wanted: str, bound: float) -> float:
    started = time.monotonic()
    while (status := await health(svc, SERVICE_NAME)) != wanted:
        assert time.monotonic() - started < bound, f"{SERVICE_NAME} still {status} after {bound} s"
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def healthcheck_exit_code(svc: Running, *flags: str) -> int:
    # Not subprocess.run: the service under test shares this event loop and must keep answering.
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "integrations_service",
        "healthcheck",
        "--address",
        svc.target,
        *flags,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await asyncio.wait_for(process.wait(), timeout=60)


async def test_readiness_follows_the_store_while_liveness_stays_serving(proxied: Running, proxy: TcpProxy) -> None:
    svc = proxied
    assert await health(svc, SERVICE_NAME) == "SERVING"
    assert await healthcheck_exit_code(svc, "--ready") == 0

    await proxy.stop()
    try:
        # No call needs the store meanwhile: the background probe finds the outage by itself.
        await wait_for_health(svc, "NOT_SERVING", READINESS_BOUND)
        assert await health(svc, "") == "SERVING"  # alive: restarting the process would not help
        assert await healthcheck_exit_code(svc, "--ready") == 1
        assert await healthcheck_exit_code(svc) == 0
    finally:
        await proxy.start()
    await wait_for_health(svc, "SERVING", READINESS_BOUND)
    assert await health(svc, "") == "SERVING"
    assert await healthcheck_exit_code(svc, "--ready") == 0


async def test_an_unavailable_call_makes_readiness_check_the_store_at_once(
    proxied: Running, proxy: TcpProxy, database_url: str
) -> None:
    svc = proxied
    readiness = svc.service.readiness
    org = new_org()
    await save(svc, org, secretKey=SK)
    # No periodic check from now on (once the current wait ends), so only a failed call can trigger one.
    readiness.interval = 3600.0
    await asyncio.sleep(PROBE_INTERVAL + 0.5)
    await proxy.stop()
    try:
        await asyncio.sleep(1.0)
        assert await health(svc, SERVICE_NAME) == "SERVING"  # nothing has checked yet
        result, elapsed = await timed(get(svc, org))
        assert_unavailable(result, elapsed, svc, database_url)
        assert await wait_for_health(svc, "NOT_SERVING", 1.5) < 1.5
    finally:
        await proxy.start()
    readiness.interval = PROBE_INTERVAL
    await get(svc, org)
    readiness.store_unavailable()  # ends the long wait; the next check finds the store back
    await wait_for_health(svc, "SERVING", READINESS_BOUND)
