"""The row cache across real server processes: never wrong for longer than the documented bound.

Two `integrations-service serve` processes, "A" and "B", on one PostgreSQL
database, as two replicas: writes go through A (or behind both, in SQL, or by
the `rotate` command), reads through B. What B answers, and its /metrics,
show whether its cache let a change through in time. The embedded store's
cache, and INTEGRATIONS_CACHE_TTL=0, run in one process.
"""

from __future__ import annotations

import asyncio
import re
import statistics
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg  # type: ignore[import-untyped]
import grpc
import pytest

from integrations.v1 import integrations_pb2 as pb
from integrations.v1 import integrations_pb2_grpc as pb_grpc
from integrations_service.store.postgres_listener import APPLICATION_NAME
from tests.conftest import CreateDatabase
from tests.harness import TEST_KEY, new_org
from tests.integration.raw_rows import encrypt_v1
from tests.integration.test_rotation import cli, insert_rows
from tests.integration.test_store_outage import TcpProxy, _with_address
from tests.processes import Processes, ServeProcess, clean_env, free_port

GET = "/integrations.v1.IntegrationService/GetProviderConfig"
SK = "sk_test_51HxRowCache000000000000"
WEBHOOK = "whsec_row_cache_000000000001"


@dataclass
class Replica:
    process: ServeProcess
    channel: grpc.aio.Channel
    stub: pb_grpc.IntegrationServiceStub
    metrics_url: str

    async def save(self, org: str, **values: str) -> pb.ProviderConfig:
        reply = await self.stub.SaveIntegration(
            pb.SaveIntegrationRequest(organization_id=org, provider="stripe", values=values), timeout=10
        )
        return reply.config

    async def get(self, org: str, timeout: float = 10) -> pb.ProviderConfig:  # noqa: ASYNC109
        reply = await self.stub.GetProviderConfig(
            pb.GetProviderConfigRequest(organization_id=org, provider="stripe"), timeout=timeout
        )
        return reply.config

    async def sample(self, name: str, **labels: str) -> float:
        """One sample of this process's /metrics, 0 when absent (a counter not counted yet)."""

        def fetch() -> str:
            with urllib.request.urlopen(self.metrics_url, timeout=5) as reply:
                return str(reply.read().decode())

        wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
        for line in (await asyncio.to_thread(fetch)).splitlines():
            match = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
            if match and ",".join(sorted((match.group(1) or "").split(","))) == wanted:
                return float(match.group(2))
        return 0.0

    async def invalidations(self, reason: str) -> float:
        """Invalidations so far; after a read, since the cache applies what the feed brought as it is next used."""
        await self.get("org_unrelated_read")
        return await self.sample("integrations_cache_invalidations_total", reason=reason)

    async def cache(self) -> dict[str, float]:
        return {
            result: await self.sample("integrations_cache_requests_total", result=result)
            for result in ("hit", "miss", "bypass")
        }


StartReplica = Callable[..., Awaitable[Replica]]


@pytest.fixture
async def database(postgres_database_factory: CreateDatabase) -> str:
    return await postgres_database_factory()


@pytest.fixture
async def start_replica(tmp_path: Path) -> AsyncIterator[StartReplica]:
    """Starts `serve` processes with TEST_KEY and a metrics address of their own; stops them all at the end."""
    channels: list[grpc.aio.Channel] = []
    with Processes(tmp_path) as processes:

        async def start(name: str, database_url: str | None, **env: str) -> Replica:
            metrics = f"127.0.0.1:{free_port()}"
            environment = clean_env(
                {
                    "INTEGRATION_ENCRYPTION_KEY": TEST_KEY,
                    "INTEGRATIONS_METRICS_ADDRESS": metrics,
                    "INTEGRATIONS_DATA_DIR": str(tmp_path / name),
                    **({"DATABASE_URL": database_url} if database_url else {}),
                    **env,
                }
            )
            # On a thread: the event loop keeps running (a TcpProxy in it may carry the process's connections).
            process = await asyncio.to_thread(processes.serve, tmp_path / name, environment)
            channel = grpc.aio.insecure_channel(process.target)
            channels.append(channel)
            return Replica(process, channel, pb_grpc.IntegrationServiceStub(channel), f"http://{metrics}/metrics")

        yield start
        for channel in channels:
            await channel.close()


async def sql(url: str, statement: str, *args: object) -> str:
    conn = await asyncpg.connect(url)
    try:
        return str(await conn.execute(statement, *args))
    finally:
        await conn.close()


async def until_served(replica: Replica, org: str, wanted: Callable[[pb.ProviderConfig], bool]) -> float:
    """Seconds until `replica` answers a config that is `wanted`, reading as fast as it answers."""
    started = time.perf_counter()
    while not wanted(await replica.get(org)):
        assert time.perf_counter() - started < 5, "the other replica never served the change"
    return time.perf_counter() - started


async def until_invalidated(replica: Replica, changes: int) -> None:
    """Until `replica`'s cache has applied at least `changes` notified changes since it started."""
    started = time.perf_counter()
    while await replica.invalidations("change") < changes:
        assert time.perf_counter() - started < 5, f"fewer than {changes} notifications reached the cache"
        await asyncio.sleep(0.01)


def percentiles(delays: list[float]) -> tuple[float, float]:
    ordered = sorted(delays)
    return statistics.median(ordered), ordered[max(0, round(len(ordered) * 0.99) - 1)]


@pytest.mark.postgres
async def test_saves_through_one_replica_are_served_by_the_other_within_milliseconds(
    database: str, start_replica: StartReplica
) -> None:
    a = await start_replica("a", database)
    b = await start_replica("b", database)
    org = new_org()
    await a.save(org, secretKey=SK)
    await b.get(org)
    delays = []
    for i in range(200):
        etag = (await a.save(org, secretKey=f"sk_test_51HxRowCache{i:012d}")).etag
        delays.append(await until_served(b, org, lambda config, etag=etag: config.etag == etag))  # type: ignore[misc]
    p50, p99 = percentiles(delays)
    print(
        f"\nrow cache across replicas, 200 saves through A: B serves the new etag "
        f"p50 {p50 * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms after A acknowledged the save"
    )
    # Target 50 ms; the bound is loose since the 2-core CI machine is shared.
    assert p99 <= 0.25, f"p99 {p99 * 1000:.1f} ms"

    before = await b.cache()
    for _ in range(20):
        await b.get(org)
    after = await b.cache()
    assert after["hit"] - before["hit"] >= 19, "B answered unchanged reads from the store, not its cache"
    assert after["bypass"] == 0


@pytest.mark.postgres
async def test_a_delete_through_one_replica_empties_the_others_answer(
    database: str, start_replica: StartReplica
) -> None:
    a = await start_replica("a", database)
    b = await start_replica("b", database)
    org = new_org()
    etag = (await a.save(org, secretKey=SK)).etag
    await until_served(b, org, lambda config: config.etag == etag)
    await b.get(org)  # cached now
    await a.stub.DeleteIntegration(pb.DeleteIntegrationRequest(organization_id=org, provider="stripe"), timeout=10)
    delay = await until_served(b, org, lambda config: config.etag == "")
    served = await b.get(org)
    assert served.values["secretKey"].source != pb.VALUE_SOURCE_ORGANIZATION
    assert delay < 1.0


@pytest.mark.postgres
async def test_a_row_moved_to_another_organization_by_sql_leaves_the_old_ones_cache(
    database: str, start_replica: StartReplica
) -> None:
    # A fix by hand: a row filed under the wrong organization is moved. B cached it under the old one; with
    # a TTL far beyond the wait, only the notification of the old key can make B stop serving it there.
    a = await start_replica("a", database)
    b = await start_replica("b", database, INTEGRATIONS_CACHE_TTL="300")
    org, right = new_org(), new_org()
    etag = (await a.save(org, secretKey=SK)).etag
    await until_served(b, org, lambda config: config.etag == etag)
    await b.get(org)  # cached now
    assert (await b.get(right)).etag == ""  # "no row", cached too
    moved = await sql(
        database, "UPDATE integration_config SET organization_id = $1 WHERE organization_id = $2", right, org
    )
    assert moved == "UPDATE 1"
    delay = await until_served(b, org, lambda config: config.etag == "")
    assert (await b.get(org)).values["secretKey"].source != pb.VALUE_SOURCE_ORGANIZATION
    assert delay < 1.0
    # The new key's "no row" is gone too: B reads the moved row, whose ciphertext is bound to the organization
    # it was saved for (so it refuses to decrypt it there, as it should).
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await b.get(right)
    assert refused.value.code() == grpc.StatusCode.DATA_LOSS


@pytest.mark.postgres
async def test_a_manual_sql_update_and_the_rotate_command_invalidate_the_other_replica(
    database: str, start_replica: StartReplica, tmp_path: Path
) -> None:
    a = await start_replica("a", database)
    b = await start_replica("b", database)
    org = new_org()
    etag = (await a.save(org, secretKey=SK, webhookSecret=WEBHOOK)).etag
    await until_served(b, org, lambda config: config.etag == etag)

    # A manual fix, behind both replicas: the trigger notifies in the writing transaction.
    await sql(
        database,
        "UPDATE integration_config SET config = config - 'webhookSecret', version = version + 1 "
        "WHERE organization_id = $1",
        org,
    )
    delay = await until_served(b, org, lambda config: config.etag != etag)
    assert (await b.get(org)).values["webhookSecret"].source != pb.VALUE_SOURCE_ORGANIZATION
    assert delay < 1.0

    # `rotate` rewraps the dashboard's enc:v1 rows: same version and etag, new ciphertext. B read the old rows
    # (each read of a legacy value is counted) and keeps them (ciphertext; a plaintext row it would not keep);
    # once they are rewrapped it must read them again.
    legacy = [new_org() for _ in range(3)]
    await insert_rows(
        database, [(f"legacy-{org}", org, "stripe", {"secretKey": encrypt_v1(SK, TEST_KEY)}) for org in legacy]
    )
    for org in legacy:
        await until_served(b, org, lambda config: config.etag != "")
    # The database is this test's own: the save, the SQL fix and the inserts notified so far.
    await until_invalidated(b, 2 + len(legacy))
    for org in legacy:
        await b.get(org)  # cached again, had an insert's notification evicted it
    hits = (await b.cache())["hit"]
    for org in legacy:
        await b.get(org)
    assert (await b.cache())["hit"] == hits + len(legacy)
    legacy_reads = await b.sample("integrations_legacy_values_read_total", format="v1", provider="stripe")
    rotated = await cli(["rotate"], database, f"default:{TEST_KEY}", tmp_path)
    assert rotated.returncode == 0, rotated.stderr
    await until_invalidated(b, 2 + 2 * len(legacy))
    misses = (await b.cache())["miss"]
    for org in legacy:
        assert (await b.get(org)).values["secretKey"].source == pb.VALUE_SOURCE_ORGANIZATION
    assert (await b.cache())["miss"] == misses + len(legacy), "B served rows cached before the rotation"
    # What B read again is the rewrapped row, not the legacy format.
    assert await b.sample("integrations_legacy_values_read_total", format="v1", provider="stripe") == legacy_reads


@pytest.mark.postgres
async def test_a_rolled_back_sql_write_invalidates_nothing(database: str, start_replica: StartReplica) -> None:
    a = await start_replica("a", database)
    b = await start_replica("b", database)
    org = new_org()
    etag = (await a.save(org, secretKey=SK)).etag
    await until_served(b, org, lambda config: config.etag == etag)
    await until_invalidated(b, 1)  # the save's own notification (the database is this test's own)
    await b.get(org)  # cached again, had that notification evicted it

    conn = await asyncpg.connect(database)
    try:
        transaction = conn.transaction()
        await transaction.start()
        await conn.execute("UPDATE integration_config SET version = version + 1 WHERE organization_id = $1", org)
        await transaction.rollback()
        # Notifications keep commit order: once this later write reached B, a notification of the rolled-back
        # one would have too.
        await insert_rows(database, [("marker-row", new_org(), "stripe", {"secretKey": SK})])
    finally:
        await conn.close()
    await until_invalidated(b, 2)
    assert await b.invalidations("change") == 2, "the rolled-back write notified"
    before = await b.cache()
    assert (await b.get(org)).etag == etag
    after = await b.cache()
    assert after["hit"] == before["hit"] + 1, "the rolled-back write evicted B's cached row"


@pytest.mark.postgres
async def test_with_the_listener_killed_mid_run_no_read_is_older_than_the_ttl(
    database: str, start_replica: StartReplica
) -> None:
    ttl = 1.0
    a = await start_replica("a", database)
    b = await start_replica("b", database, INTEGRATIONS_CACHE_TTL=str(ttl))
    org = new_org()
    saves = [(time.perf_counter(), (await a.save(org, secretKey=SK)).etag)]
    await until_served(b, org, lambda config: config.etag == saves[0][1])
    reads: list[tuple[float, str]] = []
    done = asyncio.Event()

    async def write() -> None:
        for i in range(150):
            etag = (await a.save(org, secretKey=f"sk_test_51HxRowCache{i:012d}")).etag
            saves.append((time.perf_counter(), etag))
            await asyncio.sleep(0.005)
        done.set()

    async def read() -> None:
        while not done.is_set():
            started = time.perf_counter()
            reads.append((started, (await b.get(org)).etag))

    async def kill_listeners() -> None:
        await asyncio.sleep(0.3)
        killed = await sql(
            database,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = $1 AND datname = current_database()",
            APPLICATION_NAME,
        )
        assert killed == "SELECT 2", killed  # A's and B's

    await asyncio.gather(write(), read(), kill_listeners())
    acknowledged = {etag: at for at, etag in saves}
    order = [etag for _, etag in saves]
    staleness = []
    for started, etag in reads:
        newer = order.index(etag) + 1
        superseded = saves[newer][0] if newer < len(saves) else started
        staleness.append(max(0.0, started - superseded))
    assert set(acknowledged) >= {etag for _, etag in reads}
    bypassed = await b.sample("integrations_cache_requests_total", result="bypass")
    print(
        f"\nlistener killed mid-run: {len(reads)} reads on B, {bypassed:.0f} bypassed the cache while "
        f"disconnected; oldest read {max(staleness) * 1000:.1f} ms behind the latest acknowledged save"
    )
    assert max(staleness) < ttl, "a read served a row older than the TTL"
    assert bypassed > 0, "B kept answering from its cache while its listener was down"
    assert await b.sample("integrations_change_feed_connected") == 1
    assert await b.sample("integrations_cache_invalidations_total", reason="connected") >= 1


@pytest.mark.postgres
async def test_through_a_silent_partition_the_ttl_caps_what_a_cached_row_may_be_served(
    database: str, start_replica: StartReplica
) -> None:
    """The listener cannot notice at once that nothing gets through: only the TTL bounds the cache then."""
    ttl = 1.0
    parts = urlsplit(database)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    await proxy.start()
    try:
        a = await start_replica("a", database)
        b = await start_replica(
            "b",
            _with_address(database, "127.0.0.1", proxy.port),
            INTEGRATIONS_CACHE_TTL=str(ttl),
            INTEGRATIONS_DB_TIMEOUT="0.5",
        )
        org = new_org()
        etag = (await a.save(org, secretKey=SK)).etag
        await until_served(b, org, lambda config: config.etag == etag)
        proxy.freeze()
        saved = (await a.save(org, secretKey="sk_test_51HxRowCacheAfter0000000")).etag
        acknowledged = time.perf_counter()
        answers: list[tuple[float, str]] = []
        while time.perf_counter() - acknowledged < ttl + 1.0:
            started = time.perf_counter()
            try:
                answers.append((started, (await b.get(org, timeout=5)).etag))
            except grpc.aio.AioRpcError as error:
                answers.append((started, error.code().name))
        stale = [started - acknowledged for started, answer in answers if answer == etag]
        assert answers[0][1] == etag  # served from the cache: nothing told B of the save yet
        assert max(stale) < ttl, f"served a row {max(stale):.2f} s after it changed (TTL {ttl} s)"
        assert answers[-1][1] == "UNAVAILABLE", "past the TTL, B must ask the (unreachable) store"
        assert saved not in {answer for _, answer in answers}
    finally:
        proxy.thaw()
        await proxy.stop()


async def test_the_embedded_stores_cache_sees_its_own_writes_at_once(start_replica: StartReplica) -> None:
    service = await start_replica("embedded", None)
    org = new_org()
    await service.save(org, secretKey=SK)
    for i in range(5):
        await service.get(org)
        etag = (await service.save(org, secretKey=f"sk_test_51HxRowCache{i:012d}")).etag
        assert (await service.get(org)).etag == etag
        assert (await service.get(org)).etag == etag
    counts = await service.cache()
    # Each save evicts at once; the read after it is a miss, the next one a hit.
    assert counts == {"hit": 9, "miss": 6, "bypass": 0}
    assert await service.sample("integrations_cache_invalidations_total", reason="write") == 6


async def test_a_ttl_of_zero_turns_the_cache_off(start_replica: StartReplica) -> None:
    service = await start_replica("uncached", None, INTEGRATIONS_CACHE_TTL="0")
    org = new_org()
    await service.save(org, secretKey=SK)
    for _ in range(5):
        await service.get(org)
    assert await service.cache() == {"hit": 0, "miss": 0, "bypass": 0}
    assert await service.sample("integrations_store_operation_duration_seconds_count", operation="get") == 5
