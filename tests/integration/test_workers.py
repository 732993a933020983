"""`serve --workers N`: real worker processes on one port under a supervisor, on PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import grpc
import pytest

from integrations.v1 import integrations_pb2 as pb
from integrations.v1 import integrations_pb2_grpc as pb_grpc
from integrations_client import IntegrationsClient, IntegrationsClientSync
from integrations_service.store.migrate import MIGRATION_LOCK_KEY
from integrations_service.store.postgres import ROW_LOCK_NAMESPACE
from tests.harness import TEST_KEY, new_org
from tests.integration.test_metrics import sample
from tests.integration.test_shutdown import wait_until_blocked
from tests.processes import (
    SERVICE,
    Processes,
    ServeProcess,
    children,
    clean_env,
    free_port,
    health_status,
    run_cli,
    scrape,
)

# Enough connections that the kernel's spread puts some on each worker (all on one: 2 in 2**12).
CHANNELS = 12
LIST = "/integrations.v1.IntegrationService/ListProviders"


def workers_env(database_url: str, **extra: str) -> dict[str, str]:
    return clean_env(
        {
            "DATABASE_URL": database_url,
            "INTEGRATION_ENCRYPTION_KEY": TEST_KEY,
            "INTEGRATIONS_LOG_FORMAT": "json",
            "INTEGRATIONS_METRICS_ADDRESS": f"127.0.0.1:{free_port()}",
            **extra,
        }
    )


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    with Processes(tmp_path) as started:
        yield started


@asynccontextmanager
async def channels(target: str, count: int = CHANNELS) -> AsyncIterator[list[pb_grpc.IntegrationServiceStub]]:
    """`count` stubs, each on a TCP connection of its own (grpc otherwise shares one between equal channels)."""
    opened = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(count)]
    try:
        yield [pb_grpc.IntegrationServiceStub(channel) for channel in opened]
    finally:
        for channel in opened:
            await channel.close()


def log_entries(server: ServeProcess) -> list[dict[str, object]]:
    entries = []
    for line in server.stderr().splitlines():
        if line.startswith("{"):
            entries.append(json.loads(line))
    return entries


def workers_that_logged(server: ServeProcess, rpc: str) -> set[object]:
    return {entry.get("worker") for entry in log_entries(server) if entry.get("rpc") == rpc}


def until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    """Poll a condition on the processes (nothing in this test's event loop has to run meanwhile)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def feed_connected(text: str, worker: str) -> bool:
    try:
        return sample(text, "integrations_change_feed_connected", worker=worker) == 1
    except AssertionError:
        return False


def exited(pid: int) -> bool:
    """Whether `pid` is gone or a zombie (its parent has not reaped it yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def entries_of(stderr: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def metrics_files(worker: int) -> set[str]:
    """The files in the supervisor's multiprocess metrics folder (named in a worker's environment)."""
    environ = Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")
    folder = next(v.split(b"=", 1)[1].decode() for v in environ if v.startswith(b"PROMETHEUS_MULTIPROC_DIR="))
    return {path.name for path in Path(folder).iterdir()}


class Starting:
    """`serve --workers 2` started without waiting for anything, for signals sent while its workers start."""

    def __init__(self, tmp_path: Path, env: dict[str, str], workers: str = "2") -> None:
        self.stderr_path = tmp_path / "starting.stderr"
        env = {**env, "INTEGRATIONS_LISTEN_ADDRESS": f"127.0.0.1:{free_port()}"}
        with self.stderr_path.open("wb") as stderr:
            self.popen = subprocess.Popen(
                [str(SERVICE), "serve", "--workers", workers],
                cwd=tmp_path,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        self.workers: set[int] = set()

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="backslashreplace")

    def wait_workers_spawned(self) -> None:
        """Until the supervisor has spawned both workers (logged just after each spawn: long before they serve)."""
        until(lambda: self.stderr().count('"event": "worker_started"') == 2 or self.popen.poll() is not None)
        assert self.popen.poll() is None, self.stderr()
        self.workers = {pid for pid in children(self.popen.pid) if Path(f"/proc/{pid}/cmdline").exists()}
        self.workers = {pid for pid in self.workers if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()}
        assert len(self.workers) == 2

    def cleanup(self) -> None:
        """Whatever the test found, leave no process behind."""
        for pid in [self.popen.pid, *self.workers]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.popen.wait(5)


pytestmark = pytest.mark.postgres


async def test_two_workers_both_serve_and_their_metrics_add_up(
    processes: Processes, postgres_database_url: str, tmp_path: Path
) -> None:
    env = workers_env(postgres_database_url)
    server = processes.serve(tmp_path / "work", env, ["--workers", "2"])
    server.wait_workers_serving(2)
    assert len(server.worker_pids()) == 2
    calls = 0
    async with channels(server.target) as stubs:
        for _ in range(3):
            for stub in stubs:
                await stub.ListProviders(pb.ListProvidersRequest(), timeout=10)
                calls += 1
    assert workers_that_logged(server, LIST) == {0, 1}

    metrics_address = env["INTEGRATIONS_METRICS_ADDRESS"]
    labels = {
        "grpc_type": "unary",
        "grpc_service": "integrations.v1.IntegrationService",
        "grpc_method": "ListProviders",
    }
    rpc_counts = (
        ("grpc_server_handled_total", {**labels, "grpc_code": "OK"}),
        ("grpc_server_started_total", labels),
        ("grpc_server_handling_seconds_count", labels),
        ("integrations_rpc_requests_total", {"method": LIST, "code": "OK"}),
    )

    def mirrored(text: str) -> bool:
        """Whether both workers' mirrors have copied everything the test waits for (each within a second)."""
        try:
            counted = all(sample(text, name, **series) == calls for name, series in rpc_counts)
        except AssertionError:  # a series not there yet
            return False
        return counted and all(feed_connected(text, worker) for worker in ("0", "1"))

    until(lambda: mirrored(scrape(metrics_address)))
    text = await asyncio.to_thread(scrape, metrics_address)
    # Summed over both workers, into one series each (no `worker` label), as with one process.
    for name, series in rpc_counts:
        assert sample(text, name, **series) == calls
    assert not [line for line in text.splitlines() if line.startswith("grpc_server_") and "worker=" in line]
    # Read-at-scrape state: one series per worker.
    for worker in ("0", "1"):
        assert sample(text, "integrations_change_feed_connected", worker=worker) == 1
        assert sample(text, "integrations_store_pool_connections", state="max", worker=worker) == 10
        assert sample(text, "integrations_audit_records_failed_total", worker=worker) == 0
    assert sample(text, "integrations_worker_restarts_total", worker="0") == 0
    assert server.terminate() == 0


async def test_sigterm_lets_the_in_flight_calls_of_every_worker_finish_and_exits_0(
    processes: Processes, postgres_database_url: str, tmp_path: Path
) -> None:
    # Every save below holds a connection of its worker's pool, whichever worker gets them all.
    env = workers_env(postgres_database_url, INTEGRATIONS_DB_POOL_SIZE=str(CHANNELS + 2))
    server = processes.serve(tmp_path / "work", env, ["--workers", "2"])
    server.wait_workers_serving(2)
    orgs = [new_org() for _ in range(CHANNELS)]
    admin = await asyncpg.connect(postgres_database_url)
    watcher = await asyncpg.connect(postgres_database_url)
    try:
        async with channels(server.target) as stubs:
            # Hold the row lock of every save below, so that they all stay in flight.
            lock = admin.transaction()
            await lock.start()
            for org in orgs:
                await admin.execute(
                    "SELECT pg_advisory_xact_lock($1, hashtext($2))", ROW_LOCK_NAMESPACE, f"{org}/stripe"
                )
            in_flight = [
                asyncio.ensure_future(
                    stub.SaveIntegration(
                        pb.SaveIntegrationRequest(
                            organization_id=org, provider="stripe", values={"secretKey": "sk_test_in_flight_0001"}
                        ),
                        timeout=30,
                    )
                )
                for stub, org in zip(stubs, orgs, strict=True)
            ]
            await wait_until_blocked(watcher, postgres_database_url.rsplit("/", 1)[1], at_least=CHANNELS)

            server.popen.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            assert server.running(), "the supervisor must wait for its workers' in-flight calls"
            assert health_status(server.target) != "SERVING"

            await lock.commit()
            replies = await asyncio.gather(*in_flight)
        exit_code = await asyncio.to_thread(server.popen.wait, 20)
    finally:
        await watcher.close()
        await admin.close()
    assert [reply.config.values["secretKey"].value for reply in replies] == ["••••••••0001"] * CHANNELS
    assert workers_that_logged(server, "/integrations.v1.IntegrationService/SaveIntegration") == {0, 1}
    assert exit_code == 0, server.stderr()
    assert server.worker_pids() == set()


async def test_a_killed_worker_is_restarted_and_serving_goes_on(
    processes: Processes, postgres_database_url: str, tmp_path: Path
) -> None:
    env = workers_env(postgres_database_url)
    server = processes.serve(tmp_path / "work", env, ["--workers", "2"])
    server.wait_workers_serving(2)
    before = server.worker_pids()
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    until(lambda: len(server.worker_pids()) == 2 and victim not in server.worker_pids())
    server.wait_workers_serving(3)

    died = [e for e in log_entries(server) if e.get("event") == "worker_died"]
    assert len(died) == 1
    assert died[0]["pid"] == victim
    assert "died unexpectedly (killed by signal 9, SIGKILL)" in str(died[0]["message"])
    assert died[0]["signal"] == "SIGKILL"
    async with channels(server.target) as stubs:
        for stub in stubs:
            await stub.ListProviders(pb.ListProvidersRequest(), timeout=10)
    text = await asyncio.to_thread(scrape, env["INTEGRATIONS_METRICS_ADDRESS"])
    assert sum(sample(text, "integrations_worker_restarts_total", worker=w) for w in ("0", "1")) == 1
    # The dead worker's counts are folded into the archived ones: no file of its own is left behind.
    files = metrics_files(min(server.worker_pids()))
    assert not [name for name in files if f"_{victim}." in name]
    assert {"counter_archived.db", "histogram_archived.db"} <= files
    assert server.terminate() == 0


async def test_the_clients_channels_option_spreads_calls_over_the_workers(
    processes: Processes, postgres_database_url: str, tmp_path: Path
) -> None:
    server = processes.serve(tmp_path / "work", workers_env(postgres_database_url), ["--workers", "2"])
    server.wait_workers_serving(2)

    def served_by() -> set[object]:
        return workers_that_logged(server, LIST)

    # One channel is one connection, which the kernel gave to one worker: every call goes there.
    async with IntegrationsClient(server.target) as one:
        for _ in range(CHANNELS):
            await one.list_providers()
    assert len(served_by()) == 1
    async with IntegrationsClient(server.target, channels=CHANNELS) as spread:
        for _ in range(CHANNELS):
            await spread.list_providers()
    assert served_by() == {0, 1}

    before = len([e for e in log_entries(server) if e.get("rpc") == LIST])
    with IntegrationsClientSync(server.target, channels=CHANNELS) as blocking:
        for _ in range(CHANNELS):
            blocking.list_providers()
    sync_calls = [e for e in log_entries(server) if e.get("rpc") == LIST][before:]
    assert {e.get("worker") for e in sync_calls} == {0, 1}


def test_workers_whose_supervisor_was_killed_drain_and_exit(
    processes: Processes, postgres_database_url: str, tmp_path: Path
) -> None:
    # Its metrics folder stays behind (documented): in the test's own TMPDIR, not the machine's /tmp.
    env = workers_env(postgres_database_url, TMPDIR=str(tmp_path))
    server = processes.serve(tmp_path / "work", env, ["--workers", "2"])
    server.wait_workers_serving(2)
    workers = server.worker_pids()
    server.kill()  # SIGKILL: no chance to stop its workers

    until(lambda: all(exited(pid) for pid in workers))
    assert sum(e.get("event") == "supervisor_gone" for e in log_entries(server)) == 2
    assert sum(e.get("event") == "stopped" for e in log_entries(server)) == 2


def test_workers_whose_supervisor_is_killed_while_they_start_exit_too(
    postgres_database_url: str, tmp_path: Path
) -> None:
    # Killed before a worker could look at who its parent is: it must not take init for its supervisor.
    starting = Starting(tmp_path, workers_env(postgres_database_url, TMPDIR=str(tmp_path)))
    try:
        starting.wait_workers_spawned()
        starting.popen.kill()
        starting.popen.wait(5)
        until(lambda: all(exited(pid) for pid in starting.workers))
    finally:
        starting.cleanup()
    entries = entries_of(starting.stderr())
    assert sum(e.get("event") == "supervisor_gone" for e in entries) == 2
    assert not [e for e in entries if e.get("event") == "serving"], "nothing may serve unsupervised"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_the_workers_start_stops_them_all_and_exits_0(
    postgres_database_url: str, tmp_path: Path, signum: int
) -> None:
    starting = Starting(tmp_path, workers_env(postgres_database_url))
    try:
        starting.wait_workers_spawned()
        starting.popen.send_signal(signum)
        time.sleep(0.05)
        starting.popen.send_signal(signum)  # twice, as an impatient operator or orchestrator does
        code = starting.popen.wait(20)
        assert all(exited(pid) for pid in starting.workers)
    finally:
        starting.cleanup()
    entries = entries_of(starting.stderr())
    assert code == 0, starting.stderr()
    assert not [e for e in entries if e.get("level") == "error"], starting.stderr()


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_signal_while_waiting_to_migrate_stops_the_service_at_once_and_exits_0(
    postgres_database_url: str, tmp_path: Path, workers: str
) -> None:
    # The orchestrator's SIGTERM while the service waits for another replica's migrations (up to 5 minutes):
    # the wait ends, no worker starts, nothing served, the exit code is 0. (As PID 1 of a container, a process
    # without a handler yet would not even have been sent it: it would serve until the kubelet's SIGKILL.)
    admin = await asyncpg.connect(postgres_database_url)
    try:
        await admin.execute("SELECT pg_advisory_lock($1::bigint)", MIGRATION_LOCK_KEY)
        starting = Starting(tmp_path, workers_env(postgres_database_url), workers)
        try:
            await wait_until_blocked(admin, postgres_database_url.rsplit("/", 1)[1])
            starting.popen.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(starting.popen.wait, 10)
        finally:
            starting.cleanup()
    finally:
        await admin.close()
    assert code == 0, starting.stderr()
    entries = entries_of(starting.stderr())
    assert [e["event"] for e in entries if e.get("event") in ("worker_started", "serving", "stopped")] == ["stopped"]
    assert not [e for e in entries if e.get("level") == "error"], starting.stderr()


def test_a_crash_loop_ends_the_service_with_an_error(postgres_database_url: str, tmp_path: Path) -> None:
    # A plain socket (no SO_REUSEPORT) on the port: every worker fails to bind it, again and again.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        env = workers_env(postgres_database_url, INTEGRATIONS_LISTEN_ADDRESS=address)
        result = run_cli(["serve", "--workers", "2"], tmp_path, env, timeout=90)
    assert result.returncode == 1
    assert "died 6 times within 60 s" in result.stderr
    assert "cannot listen on" in result.stderr
    # Each restart waits twice as long as the one before, and says so: no tight loop.
    waits = [
        str(e["message"]).rsplit(" in ", 1)[1] for e in entries_of(result.stderr) if e.get("event") == "worker_died"
    ]
    assert sorted(set(waits)) == ["0.5 s", "1.0 s", "2.0 s", "4.0 s", "8.0 s"]
    assert len(waits) <= 10


def test_a_metrics_address_in_use_stops_the_supervisor_before_any_worker(
    postgres_database_url: str, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = workers_env(postgres_database_url, INTEGRATIONS_METRICS_ADDRESS=f"127.0.0.1:{taken.getsockname()[1]}")
        result = run_cli(["serve", "--workers", "2"], tmp_path, env, timeout=30)
    assert result.returncode == 1
    assert "INTEGRATIONS_METRICS_ADDRESS: cannot listen on" in result.stderr
    assert "worker_started" not in result.stderr


@pytest.mark.parametrize("database_url", ["", "sqlite:///data/store.sqlite3"])
def test_the_embedded_store_refuses_more_than_one_worker(database_url: str, tmp_path: Path) -> None:
    env = clean_env({"DATABASE_URL": database_url} if database_url else {})
    for args in (["serve", "--workers", "2"], ["serve", "--workers", "2", "--check"]):
        result = run_cli(args, tmp_path, env, timeout=15)
        assert result.returncode == 2
        assert "INTEGRATIONS_WORKERS is 2, but the embedded SQLite store serves one process only" in result.stderr
        assert "DATABASE_URL" in result.stderr
    assert not (tmp_path / ".data").exists(), "nothing may be created before the refusal"


def test_one_worker_is_the_plain_server_without_a_supervisor(
    processes: Processes, postgres_database_url: str, tmp_path: Path
) -> None:
    env = workers_env(postgres_database_url, INTEGRATIONS_METRICS_ADDRESS="")
    server = processes.serve(tmp_path / "work", env, ["--workers", "1"])
    assert server.worker_pids() == set()
    assert not any(e.get("logger") == "integrations.supervisor" for e in log_entries(server))
    assert all("worker" not in e for e in log_entries(server))
    assert server.terminate() == 0
