"""Benchmark of integrations-service against do-nothing baselines, in one run.

Creates a scratch PostgreSQL database, starts the real service twice (PostgreSQL
store, embedded SQLite store) and an empty-handler gRPC server, each as its own
subprocess, seeds one organization's Stripe credentials, then drives each with
bench/load.py in a separate process. Prints a markdown table and writes it to
bench/results/latest.md. Everything it started is stopped and the database is
dropped at the end.

Run: `make bench` or `.venv/bin/python bench/run.py [--duration S] [--concurrency N]`.
PostgreSQL admin URL: env BENCH_POSTGRES_URL (default postgresql://postgres@127.0.0.1:5432/postgres).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import platform
import secrets
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg  # type: ignore[import-untyped]
import grpc
from report import Comparison, Measurement, render
from servers import (
    BENCH_DIR,
    Server,
    clean_environment,
    empty_server_command,
    free_port,
    service_command,
    service_environment,
    spawn,
    stop,
    wait_serving,
)

from integrations.v1 import integrations_pb2 as pb
from integrations.v1 import integrations_pb2_grpc as pb_grpc

ADMIN_URL_ENV = "BENCH_POSTGRES_URL"
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
RESULTS_DIR = BENCH_DIR / "results"
ORG = "org_bench"
SCRATCH_TABLE = "bench_upsert"
POOL_SIZE = 10  # the service's default INTEGRATIONS_DB_POOL_SIZE; the raw upsert pool gets the same

GET = "GetProviderConfig DECRYPTED"
SAVE = "SaveIntegration"
PG, EMBEDDED, EMPTY, RAW = "service (PostgreSQL)", "service (embedded)", "empty handler", "raw asyncpg upsert"
# INTEGRATIONS_AUDIT_READS=strict: every decrypted read stores its audit record before it answers.
PG_STRICT = "service (PostgreSQL, strict audit)"

COMPARISONS = (
    Comparison(GET, PG, EMPTY),
    Comparison(GET, EMBEDDED, EMPTY),
    Comparison(SAVE, PG, RAW),
    Comparison(SAVE, EMBEDDED, EMPTY),
    # What strict read auditing costs: the buffered service is the baseline.
    Comparison(GET, PG_STRICT, PG),
)


@dataclass(frozen=True)
class Job:
    workload: str
    server: str  # key into the running servers; RAW has none
    call: str  # load.py --call


JOBS = (
    Job(GET, PG, "get"),
    Job(GET, EMBEDDED, "get"),
    Job(GET, EMPTY, "get"),
    Job(SAVE, PG, "save"),
    Job(SAVE, RAW, "upsert"),
    Job(SAVE, EMBEDDED, "save"),
    Job(SAVE, EMPTY, "save"),
    Job(GET, PG_STRICT, "get"),
)
# `--workloads audit-reads`: only buffered vs strict decrypted reads on PostgreSQL (a short run).
WORKLOADS = {
    "all": (JOBS, COMPARISONS),
    "audit-reads": (
        tuple(job for job in JOBS if job.workload == GET and job.server in (PG, PG_STRICT)),
        (Comparison(GET, PG_STRICT, PG),),
    ),
}


# --- PostgreSQL ------------------------------------------------------------------------------------


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


async def admin_execute(admin_url: str, sql: str) -> str:
    conn = await asyncpg.connect(admin_url, timeout=5)
    try:
        await conn.execute(sql)
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def scratch_database(admin_url: str) -> AsyncIterator[tuple[str, str]]:
    """A new, empty database: (its URL, the server version); dropped on exit."""
    name = f"integrations_bench_{os.getpid()}_{secrets.token_hex(4)}"
    server_version = await admin_execute(admin_url, f'CREATE DATABASE "{name}"')
    try:
        yield with_database(admin_url, name), server_version
    finally:
        await admin_execute(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def create_scratch_table(database_url: str) -> None:
    """The raw upsert's table: integration_config's schema, and a copy of the seeded row."""
    conn = await asyncpg.connect(database_url, timeout=5)
    try:
        await conn.execute(f"CREATE TABLE {SCRATCH_TABLE} (LIKE integration_config INCLUDING ALL)")
        await conn.execute(f"INSERT INTO {SCRATCH_TABLE} SELECT * FROM integration_config "
                           "WHERE organization_id = $1 AND provider = 'stripe'", ORG)
    finally:
        await conn.close()


# --- servers ---------------------------------------------------------------------------------------


async def seed(target: str) -> None:
    """The organization's Stripe credentials (random test-shaped values, never printed)."""
    values = {
        "secretKey": f"sk_test_{secrets.token_hex(24)}",
        "webhookSecret": f"whsec_{secrets.token_hex(16)}",
        "publishableKey": f"pk_test_{secrets.token_hex(24)}",
    }
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.IntegrationServiceStub(channel)
        await stub.SaveIntegration(
            pb.SaveIntegrationRequest(organization_id=ORG, provider="stripe", values=values), timeout=10
        )


@contextlib.contextmanager
def running(servers: dict[str, Server]) -> Iterator[dict[str, Server]]:
    try:
        yield servers
    finally:
        for server in servers.values():
            stop(server)


def start_servers(
    servers: dict[str, Server], wanted: set[str], database_url: str, work_dir: Path, log_dir: Path
) -> None:
    key = base64.b64encode(secrets.token_bytes(32)).decode()  # a fresh key, only in the servers' environment
    stores = {
        PG: (database_url, {}),
        EMBEDDED: (f"sqlite:///{work_dir / 'integrations.sqlite3'}", {}),
        # The same database and key as PG: it reads the row seeded through PG.
        PG_STRICT: (database_url, {"INTEGRATIONS_AUDIT_READS": "strict"}),
    }
    for name, (store_url, extra) in stores.items():
        if name not in wanted:
            continue
        target = f"127.0.0.1:{free_port()}"
        env = {**service_environment(target, store_url, key, work_dir), **extra}
        servers[name] = spawn(_slug(name), service_command(), env, log_dir, target)
    if EMPTY in wanted:
        target = f"127.0.0.1:{free_port()}"
        command = [*empty_server_command(), "--listen-address", target]
        servers[EMPTY] = spawn(_slug(EMPTY), command, clean_environment(), log_dir, target)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


# --- load ------------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_command(job: Job, args: argparse.Namespace, target: str, database_url: str) -> list[str]:
    command = [sys.executable, str(BENCH_DIR / "load.py"), "--call", job.call, "--org", ORG,
               "--concurrency", str(args.concurrency), "--duration", str(args.duration),
               "--warmup", str(args.warmup)]
    if job.call == "upsert":
        return [*command, "--dsn", database_url, "--table", SCRATCH_TABLE, "--pool-size", str(POOL_SIZE)]
    return [*command, "--target", target]


async def run_load(command: list[str], timeout: float) -> dict[str, object]:  # noqa: ASYNC109
    process = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE)
    try:
        stdout, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    if process.returncode != 0:
        raise RuntimeError(f"load generator exited with {process.returncode}")
    result: dict[str, object] = json.loads(stdout)
    return result


async def measure(job: Job, args: argparse.Namespace, servers: dict[str, Server], database_url: str) -> Measurement:
    server = servers.get(job.server)
    command = load_command(job, args, server.target if server else "", database_url)
    cpu_before = cpu_seconds(server.process.pid) if server else 0.0
    result = await run_load(command, timeout=2 * (args.warmup + args.duration) + 60)
    cpu_per_call = None
    if server and isinstance(result["calls"], int) and result["calls"]:
        cpu_per_call = (cpu_seconds(server.process.pid) - cpu_before) / result["calls"] * 1e6
    phases = result["phases"]
    assert isinstance(phases, dict)
    return Measurement(job.workload, job.server, phases, cpu_per_call)


# --- report ----------------------------------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def source_revision() -> str:
    """The checkout's commit, flagged when the service's sources differ from it or PYTHONPATH overrides them."""
    def git(*argv: str) -> str:
        done = subprocess.run(["git", "-C", str(BENCH_DIR.parent), *argv], capture_output=True, text=True,
                              check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    revision = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--", "service", "clients", "protos"):
        revision += " + uncommitted changes"
    if os.environ.get("PYTHONPATH"):
        revision += " (PYTHONPATH set: the servers import from it first)"
    return revision


def load_average() -> float:
    """The 1-minute load average: other work on the machine skews every number."""
    return os.getloadavg()[0]


def warn_if_busy() -> float:
    load = load_average()
    if load > 0.5 * (os.cpu_count() or 1):
        print(f"bench: warning: load average {load:.2f} before the run; other work will skew the numbers",
              file=sys.stderr)
    return load


def machine(args: argparse.Namespace, postgres_version: str, load_before: float) -> dict[str, str]:
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": source_revision(),
        "nproc": str(os.cpu_count()),
        "CPU": cpu_model(),
        "Python": platform.python_version(),
        "grpcio": version("grpcio"),
        "PostgreSQL": postgres_version.split()[0],
        "phases": f"{args.duration:g} s each after {args.warmup:g} s warm-up",
        "load avg (1 min) before": f"{load_before:.2f}",
    }


def publish(text: str) -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / "latest.md"
    path.write_text(text)
    print(text, end="")
    return path


# --- main ------------------------------------------------------------------------------------------


async def bench(args: argparse.Namespace) -> None:
    jobs, comparisons = WORKLOADS[args.workloads]
    # PG is always started: the seeded row that every PostgreSQL job reads is written through it.
    wanted = {job.server for job in jobs} | {PG}
    admin_url = os.environ.get(ADMIN_URL_ENV) or DEFAULT_ADMIN_URL
    load_before = warn_if_busy()
    log_dir = RESULTS_DIR / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    async with scratch_database(admin_url) as (database_url, pg_version):
        with tempfile.TemporaryDirectory(prefix="integrations-bench-") as work, running({}) as servers:
            start_servers(servers, wanted, database_url, Path(work), log_dir)
            for server in servers.values():
                await wait_serving(server)
            await seed(servers[PG].target)
            if EMBEDDED in servers:
                await seed(servers[EMBEDDED].target)
            await create_scratch_table(database_url)
            results = {}
            for job in jobs:
                print(f"measuring {job.workload} on {job.server} …", file=sys.stderr)
                results[(job.workload, job.server)] = await measure(job, args, servers, database_url)
    path = publish(render(results, comparisons, machine(args, pg_version, load_before), args.concurrency))
    print(f"written to {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}",
          file=sys.stderr)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=4.0, help="seconds measured per phase (default 4)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per phase (default 1)")
    parser.add_argument("--concurrency", type=int, default=64,
                        help="calls in flight in the concurrent phase (default 64)")
    parser.add_argument("--workloads", choices=sorted(WORKLOADS), default="all",
                        help="all (default), or audit-reads: only decrypted reads, buffered vs strict audit")
    args = parser.parse_args()
    if args.duration <= 0 or args.warmup < 0 or args.concurrency < 1:
        parser.error("--duration must be > 0, --warmup >= 0, --concurrency >= 1")
    return args


def main() -> int:
    args = parse_args()
    try:
        asyncio.run(bench(args))
    except (RuntimeError, OSError, asyncpg.PostgresError, grpc.aio.AioRpcError, TimeoutError) as error:
        print(f"bench: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
