"""Benchmark of integrations-service against do-nothing baselines and OpenBao, in one run.

Creates a scratch PostgreSQL database; starts the real service (PostgreSQL store, embedded
SQLite store), an empty-handler gRPC server and, when its binary is there, an OpenBao dev
server, each as its own subprocess on loopback; seeds the same Stripe credentials into each;
then measures every row of JOBS with h2load (bench/h2load.py) or the Python load generator
(bench/load.py), each load in its own process. Prints a markdown report (the ratios of
COMPARISONS, then every row) and writes it to bench/results/latest.md. Everything it started is
stopped and the database is dropped at the end.

Run: `make bench` or `.venv/bin/python bench/run.py [--duration S] [--concurrency N] [--connections C]
[--worker-connections W]`.
Needs h2load (`apt-get install -y nghttp2-client`); OpenBao's `bao` is optional (see README.md).
PostgreSQL admin URL: env BENCH_POSTGRES_URL (default postgresql://postgres@127.0.0.1:5432/postgres).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import json
import math
import os
import platform
import secrets
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg  # type: ignore[import-untyped]
import grpc
import h2load
import openbao
import server_metrics
from report import CONCURRENT, MODES, SEQUENTIAL, Comparison, Key, Measurement, median_round, render
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
from workloads import CALLS, SERVICE

from integrations.v1 import integrations_pb2 as pb
from integrations.v1 import integrations_pb2_grpc as pb_grpc

ADMIN_URL_ENV = "BENCH_POSTGRES_URL"
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
RESULTS_DIR = BENCH_DIR / "results"
ORG = "org_bench"  # read by every read row
SAVE_ORG = "org_bench_save"  # the one row the service's single-row saves write
RAW_ORG = "org_bench_raw"  # the one row the raw service transaction writes
ROWS_ORG = "org_bench_rows"  # prefix of the 64 rows written side by side: org_bench_rows_0 …
SCRATCH_TABLE = "bench_upsert"
POOL_SIZE = 10  # the service's default INTEGRATIONS_DB_POOL_SIZE; the raw pools get the same
WORKERS = 2

GET = "GetProviderConfig DECRYPTED"
MASKED = "GetProviderConfig MASKED"
LIST = "ListProviders with status"
SAVE = "SaveIntegration, one row"
SAVE_ROWS = "SaveIntegration, 64 rows"
PG, EMBEDDED, EMPTY = "service (PostgreSQL)", "service (embedded)", "empty handler"
PG_WORKERS = f"service, {WORKERS} workers (PostgreSQL)"
# INTEGRATIONS_AUDIT_READS=strict: every decrypted read stores its audit record before it answers.
PG_STRICT = "service (PostgreSQL, strict audit)"
OPENBAO = "OpenBao KV v2 read"
RAW_UPSERT, RAW_TXN = "raw asyncpg upsert + audit", "raw asyncpg service transaction"
H2LOAD, PYTHON = "h2load", "python"

# h2load phases: a warm-up of WARMUP_CALLS (at least WARMUP_CALLS_PER_STREAM per call in flight), then as
# many calls as the warm-up's rate makes in --duration (at least MIN_CALLS_PER_STREAM per call in flight).
# Each h2load process is killed BOUND_S (+ 3 × --duration for a measured phase) + h2load.run's 30 s margin after
# it started.
WARMUP_CALLS = 200
WARMUP_CALLS_PER_STREAM = 20
MIN_CALLS_PER_STREAM = 10
# A server's first row first gets this many calls of its workload at full concurrency, thrown away: a process
# just started pays, for its first thousands of calls, for growing its heap and its caches. Measured on
# 2026-12-01 without it, one run with each order: whichever of the decrypted and the masked read ran first on
# the service measured fewer calls per second and more CPU per call (masked first: masked 0.46 of the empty
# handler, decrypted 0.54; decrypted first: decrypted 0.46-0.54, masked 0.53-0.66 in three runs). Every server
# gets it, baselines too.
SETTLE_CALLS = 10_000
BOUND_S = 60.0
GRPC_TARGETS = "≥ 0.60 req/s; ≤ 1.6× latency; ≤ 450 µs CPU"


@dataclass(frozen=True)
class Job:
    workload: str
    server: str  # key into the running servers; the raw rows have none
    call: str  # workloads.CALLS key or "kv" (h2load rows); load.py --call (python rows)
    tool: str = H2LOAD
    rows: int = 1  # rows written side by side (saves)

    @property
    def key(self) -> Key:
        return (self.workload, self.server, self.tool)


JOBS = (
    Job(GET, PG, "get"),
    Job(GET, PG_WORKERS, "get"),
    Job(GET, PG_STRICT, "get"),
    Job(GET, EMBEDDED, "get"),
    Job(GET, EMPTY, "get"),
    Job(GET, OPENBAO, "kv"),
    Job(MASKED, PG, "masked"),
    Job(LIST, PG, "list"),
    Job(LIST, EMPTY, "list"),
    Job(SAVE, PG, "save"),
    Job(SAVE, EMBEDDED, "save"),
    Job(SAVE, EMPTY, "save"),
    Job(SAVE, RAW_TXN, "txn", PYTHON),
    Job(SAVE, RAW_UPSERT, "upsert", PYTHON),
    Job(SAVE_ROWS, PG, "save", rows=64),
    Job(SAVE_ROWS, RAW_UPSERT, "upsert", PYTHON, rows=64),
    # The second opinion: the Python load generator on the main pair.
    Job(GET, PG, "get", PYTHON),
    Job(GET, EMPTY, "get", PYTHON),
)

# --only saves: the save rows, their baselines and the servers they need (PostgreSQL, embedded, empty).
SAVE_WORKLOADS = frozenset({SAVE, SAVE_ROWS})

COMPARISONS = (
    Comparison((GET, PG, H2LOAD), (GET, EMPTY, H2LOAD), GRPC_TARGETS),
    Comparison((MASKED, PG, H2LOAD), (GET, EMPTY, H2LOAD), GRPC_TARGETS),
    Comparison((LIST, PG, H2LOAD), (LIST, EMPTY, H2LOAD), GRPC_TARGETS),
    Comparison((GET, EMBEDDED, H2LOAD), (GET, EMPTY, H2LOAD)),
    Comparison((GET, PG, H2LOAD), (GET, OPENBAO, H2LOAD)),
    # What strict read auditing costs: the buffered service is the baseline.
    Comparison((GET, PG_STRICT, H2LOAD), (GET, PG, H2LOAD)),
    Comparison((GET, PG_WORKERS, H2LOAD), (GET, OPENBAO, H2LOAD), "≥ 0.80 req/s"),
    Comparison((SAVE_ROWS, PG, H2LOAD), (SAVE_ROWS, RAW_UPSERT, PYTHON), "≥ 0.50 req/s"),
    Comparison((SAVE, PG, H2LOAD), (SAVE, RAW_TXN, PYTHON), "≥ 0.90 req/s"),
    Comparison((SAVE, PG, H2LOAD), (SAVE, RAW_UPSERT, PYTHON)),
    Comparison((SAVE, EMBEDDED, H2LOAD), (SAVE, EMPTY, H2LOAD)),
    Comparison((GET, PG, PYTHON), (GET, EMPTY, PYTHON)),
    Comparison((GET, EMPTY, PYTHON), (GET, EMPTY, H2LOAD)),
)


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


# The change feed's trigger (migration 0003) on the scratch table, notifying a channel of its own (the
# servers listen to theirs). PostgreSQL serializes the commits of notifying transactions: each holds one
# lock of the whole server from its notification until its commit is flushed to disk. Every write of
# integration_config pays that, so the baseline must too.
SCRATCH_NOTIFY = f"""
CREATE FUNCTION {SCRATCH_TABLE}_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{SCRATCH_TABLE}_changes', json_build_object(
        'operation', 'saved', 'organization_id', NEW.organization_id, 'provider', NEW.provider, 'id', NEW.id,
        'version', NEW.version,
        'time', to_char(NEW.updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))::text);
    RETURN NULL;
END
$$;
CREATE TRIGGER {SCRATCH_TABLE}_changed AFTER INSERT OR UPDATE ON {SCRATCH_TABLE}
    FOR EACH ROW EXECUTE FUNCTION {SCRATCH_TABLE}_notify();
"""


async def create_scratch_table(database_url: str) -> None:
    """The raw upsert's table: integration_config's schema, its change-feed trigger, a copy of the seeded rows."""
    conn = await asyncpg.connect(database_url, timeout=5)
    try:
        await conn.execute(f"CREATE TABLE {SCRATCH_TABLE} (LIKE integration_config INCLUDING ALL)")
        await conn.execute(SCRATCH_NOTIFY)
        await conn.execute(
            f"INSERT INTO {SCRATCH_TABLE} SELECT * FROM integration_config "
            "WHERE provider = 'stripe' AND (organization_id = $1 OR organization_id LIKE $2)",
            ORG,
            f"{ROWS_ORG}_%",
        )
    finally:
        await conn.close()


# --- servers ---------------------------------------------------------------------------------------


def credentials() -> dict[str, str]:
    """Stripe credentials of one organization: random test-shaped values, never printed."""
    return {
        "secretKey": f"sk_test_{secrets.token_hex(24)}",
        "webhookSecret": f"whsec_{secrets.token_hex(16)}",
        "publishableKey": f"pk_test_{secrets.token_hex(24)}",
    }


async def seed(target: str, organizations: Iterable[str], values: dict[str, str]) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.IntegrationServiceStub(channel)
        for organization in organizations:
            await stub.SaveIntegration(
                pb.SaveIntegrationRequest(organization_id=organization, provider="stripe", values=values), timeout=10
            )


@contextlib.contextmanager
def running(servers: dict[str, Server]) -> Iterator[dict[str, Server]]:
    try:
        yield servers
    finally:
        for server in servers.values():
            stop(server)


def supports_workers() -> bool:
    """Whether `serve` has --workers yet (the 2-worker row is a placeholder until it does)."""
    done = subprocess.run(
        [*service_command(), "--help"], capture_output=True, text=True, check=False, env=clean_environment()
    )
    return "--workers" in done.stdout


def start_servers(
    servers: dict[str, Server],
    missing: dict[str, str],
    database_url: str,
    work_dir: Path,
    log_dir: Path,
    *,
    saves_only: bool = False,
) -> None:
    key = base64.b64encode(secrets.token_bytes(32)).decode()  # a fresh key, only in the servers' environment
    sqlite_url = f"sqlite:///{work_dir / 'integrations.sqlite3'}"
    stores: dict[str, tuple[str, tuple[str, ...]]] = {PG: (database_url, ()), EMBEDDED: (sqlite_url, ())}
    if not saves_only:
        stores[PG_STRICT] = (database_url, ("--audit-reads", "strict"))
        if supports_workers():
            stores[PG_WORKERS] = (database_url, ("--workers", str(WORKERS)))
        else:
            missing[PG_WORKERS] = "not available: `integrations-service serve --workers` does not exist yet"
    for name, (store_url, extra) in stores.items():
        target = f"127.0.0.1:{free_port()}"
        env = service_environment(target, store_url, key, work_dir)
        servers[name] = spawn(_slug(name), [*service_command(), *extra], env, log_dir, target)
        servers[name].metrics_address = env["INTEGRATIONS_METRICS_ADDRESS"]
    target = f"127.0.0.1:{free_port()}"
    command = [*empty_server_command(), "--listen-address", target]
    servers[EMPTY] = spawn(_slug(EMPTY), command, clean_environment(), log_dir, target)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


async def start_openbao(log_dir: Path, home: Path, values: dict[str, str]) -> openbao.OpenBao | None:
    binary = openbao.executable()
    if binary is None:
        print(f"bench: {openbao.INSTALL_HINT}", file=sys.stderr)
        return None
    bao = openbao.start(binary, log_dir, home)
    await openbao.wait_ready(bao)
    await openbao.seed(bao, values)
    return bao


# --- load ------------------------------------------------------------------------------------------


@dataclass
class Context:
    args: argparse.Namespace
    servers: dict[str, Server]
    missing: dict[str, str]  # server -> why its rows have no numbers
    database_url: str
    work_dir: Path
    bao: openbao.OpenBao | None = None
    fields: frozenset[str] = frozenset()
    settled: set[str] = dataclasses.field(default_factory=set)  # servers that had their SETTLE_CALLS


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process and its live descendants, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in children.read_text().split():
            with contextlib.suppress(OSError):
                total += cpu_seconds(int(child))
    return total


def load_command(job: Job, args: argparse.Namespace, target: str, database_url: str) -> list[str]:
    org = {"txn": RAW_ORG, "save": SAVE_ORG}.get(job.call, ORG)
    if job.rows > 1:
        org = ROWS_ORG
    command = [
        sys.executable,
        str(BENCH_DIR / "load.py"),
        "--call",
        job.call,
        "--org",
        org,
        "--concurrency",
        str(args.concurrency),
        "--duration",
        str(args.duration),
        "--warmup",
        str(args.warmup),
        "--rows",
        str(job.rows),
    ]
    if job.call in ("upsert", "txn"):
        table = SCRATCH_TABLE if job.call == "upsert" else "integration_config"
        return [*command, "--dsn", database_url, "--table", table, "--pool-size", str(POOL_SIZE)]
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


async def measure_python(job: Job, ctx: Context) -> Measurement:
    args = ctx.args
    server = ctx.servers.get(job.server)
    command = load_command(job, args, server.target if server else "", ctx.database_url)
    cpu_before = cpu_seconds(server.process.pid) if server else 0.0
    result = await run_load(command, timeout=2 * (args.warmup + args.duration) + 60)
    cpu_per_call = None
    if server and isinstance(result["calls"], int) and result["calls"]:
        cpu_per_call = (cpu_seconds(server.process.pid) - cpu_before) / result["calls"] * 1e6
    phases = result["phases"]
    assert isinstance(phases, dict)
    return Measurement(job.workload, job.server, job.tool, phases, cpu_per_call)


def h2load_loads(job: Job, ctx: Context, mode: str, seconds: float, requests: int) -> list[h2load.Load]:
    """What h2load runs for one phase: one process, or one per row for saves to several rows.

    `requests` calls in all, within `seconds` (a bound: the process is killed after that).
    """
    args = ctx.args
    if job.call == "kv":
        assert ctx.bao is not None
        clients = args.concurrency if mode == CONCURRENT else 1  # HTTP/1.1: one request in flight per connection
        return [
            h2load.Load(ctx.bao.read_url, clients, 1, seconds, headers=ctx.bao.headers, http1=True, requests=requests)
        ]
    call = CALLS[job.call]
    url = h2load.grpc_url(ctx.servers[job.server].target, SERVICE, call.method)
    org = SAVE_ORG if job.call == "save" else ORG
    if job.rows > 1:
        rows = range(job.rows) if mode == CONCURRENT else range(1)
        each = max(1, requests // len(rows))
        return [
            h2load.Load(
                url,
                1,
                1,
                seconds,
                call.write_body(f"{ROWS_ORG}_{i}", ctx.work_dir, f"{job.call}-{i}"),
                h2load.GRPC_HEADERS,
                requests=each,
            )
            for i in rows
        ]
    body = call.write_body(org, ctx.work_dir, job.call)
    if mode == SEQUENTIAL:
        return [h2load.Load(url, 1, 1, seconds, body, h2load.GRPC_HEADERS, requests=requests)]
    # The kernel spreads connections over the workers (SO_REUSEPORT hashes each one), not calls: a few
    # connections often land 3 to 1 on 2 workers, so the workers' row opens more of them.
    connections = min(args.worker_connections if job.server == PG_WORKERS else args.connections, args.concurrency)
    streams = math.ceil(args.concurrency / connections)
    return [h2load.Load(url, connections, streams, seconds, body, h2load.GRPC_HEADERS, requests=requests)]


async def check_call(job: Job, ctx: Context) -> tuple[str, int]:
    """One real call of the row's workload (h2load only sees HTTP statuses): "OK" or what went wrong,
    and the size of a gRPC reply's DATA (0 when unknown)."""
    try:
        if job.call == "kv":
            assert ctx.bao is not None
            await openbao.check_read(ctx.bao, set(ctx.fields))
            return "OK", 0
        org = f"{ROWS_ORG}_0" if job.rows > 1 else (SAVE_ORG if job.call == "save" else ORG)
        return "OK", await CALLS[job.call].check(ctx.servers[job.server].target, org)
    except grpc.aio.AioRpcError as error:
        return f"**{error.code().name}**", 0
    except RuntimeError as error:
        return f"**{error}**", 0


async def stored_versions(job: Job, ctx: Context) -> int | None:
    """Sum of the written rows' versions (PostgreSQL saves): every save must really write."""
    if job.call != "save" or job.server != PG:
        return None
    organizations = [f"{ROWS_ORG}_{i}" for i in range(job.rows)] if job.rows > 1 else [SAVE_ORG]
    conn = await asyncpg.connect(ctx.database_url, timeout=5)
    try:
        total = await conn.fetchval(
            "SELECT coalesce(sum(version), 0) FROM integration_config "
            "WHERE provider = 'stripe' AND organization_id = ANY($1::text[])",
            organizations,
        )
    finally:
        await conn.close()
    return int(total)


async def run_h2load(loads: list[h2load.Load], ctx: Context, name: str) -> h2load.Result:
    if len(loads) == 1:
        return await h2load.run(loads[0], ctx.work_dir, name)
    return await h2load.run_parallel(loads, ctx.work_dir, name)


def _phase(result: h2load.Result) -> dict[str, object]:
    first_error = ""
    if result.errors:
        first_error = ", ".join(f"{n} {kind}" for kind, n in result.status.items() if kind != "2xx" and n)
        first_error = first_error or f"{result.failed} failed"
    return {
        "rps": result.rps,
        "mean_ms": result.mean_ms,
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "errors": result.errors,
        "first_error": first_error,
    }


async def measure_h2load(job: Job, ctx: Context) -> Measurement:
    server = ctx.bao.server if job.call == "kv" and ctx.bao else ctx.servers.get(job.server)
    if server is None:
        return Measurement(job.workload, job.server, job.tool, {}, None, ctx.missing.get(job.server, "not available"))
    if server.name not in ctx.settled:
        ctx.settled.add(server.name)
        loads = h2load_loads(job, ctx, CONCURRENT, BOUND_S, SETTLE_CALLS)
        await run_h2load(loads, ctx, _slug(f"{job.workload}-{job.server}-settle"))
    checked_before, reply_size = await check_call(job, ctx)
    counts_before = await server_metrics.rpc_counts(server.metrics_address) if server.metrics_address else None
    versions_before = await stored_versions(job, ctx)
    cpu_before = cpu_seconds(server.process.pid)
    phases, calls, messageless = {}, 0, 0
    for mode in MODES:
        name = _slug(f"{job.workload}-{job.server}-{mode}")
        in_flight = ctx.args.concurrency if mode == CONCURRENT else 1
        warm_calls = max(WARMUP_CALLS, WARMUP_CALLS_PER_STREAM * in_flight)
        warm = await run_h2load(h2load_loads(job, ctx, mode, BOUND_S, warm_calls), ctx, f"{name}-warmup")
        # As many calls as the warm-up's rate makes in --duration seconds, so that no call is in flight
        # when the phase ends: h2load's time bound (-D) would cancel them, and the server would log
        # and count the cancellations, and spend CPU on calls nobody counts.
        requests = max(in_flight * MIN_CALLS_PER_STREAM, round(warm.rps * ctx.args.duration))
        main = await run_h2load(h2load_loads(job, ctx, mode, BOUND_S + 3 * ctx.args.duration, requests), ctx, name)
        calls += warm.done + main.done
        phases[mode] = _phase(main)
        if reply_size:  # a gRPC error reply is trailers only: no DATA bytes, not even an empty message
            messageless += max(0, main.succeeded - round(main.data_bytes / reply_size))
    cpu_per_call = (cpu_seconds(server.process.pid) - cpu_before) / calls * 1e6 if calls else None
    versions_after = await stored_versions(job, ctx)
    notes = [f"real call before: {checked_before}, after: {(await check_call(job, ctx))[0]}"]
    if counts_before is not None:
        wrong = server_metrics.not_ok(counts_before, await server_metrics.rpc_counts(server.metrics_address))
        wrong_text = ", ".join(f"{n} {code}" for code, n in sorted(wrong.items()))
        notes.append(f"server non-OK: **{sum(wrong.values())}** ({wrong_text})" if wrong else "server non-OK: 0")
    if messageless > 0.01 * calls:  # replies vary a little in size (etag, version, timestamps)
        notes.append(f"**about {messageless} replies without a message**")
    if versions_before is not None and versions_after is not None:
        notes.append(f"rows written {versions_after - versions_before} times for {calls} saves answered")
    return Measurement(job.workload, job.server, job.tool, phases, cpu_per_call, "; ".join(notes))


async def measure(job: Job, ctx: Context) -> Measurement:
    if job.tool == PYTHON:
        return await measure_python(job, ctx)
    return await measure_h2load(job, ctx)


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
        done = subprocess.run(["git", "-C", str(BENCH_DIR.parent), *argv], capture_output=True, text=True, check=False)
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
        print(
            f"bench: warning: load average {load:.2f} before the run; other work will skew the numbers", file=sys.stderr
        )
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
        "phases": (
            f"h2load: ~{args.duration:g} s of calls each after max({WARMUP_CALLS}, "
            f"{WARMUP_CALLS_PER_STREAM} × in flight) warm-up calls, {args.connections} connections at "
            f"{args.concurrency} in flight ({args.worker_connections} to the {WORKERS} workers); python: "
            f"{args.duration:g} s after {args.warmup:g} s"
        ),
        "rounds": f"{args.rounds} (each row: its median round by req/s at {args.concurrency} in flight)",
        "load avg (1 min) before": f"{load_before:.2f}",
        "after": f"{load_average():.2f}",  # this run's own load counts too (up to ~2 on 2 cores)
    }


def publish(text: str) -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / "latest.md"
    path.write_text(text)
    print(text, end="")
    return path


# --- main ------------------------------------------------------------------------------------------


async def bench(args: argparse.Namespace) -> None:
    h2load.executable()  # fails early, saying what to install
    admin_url = os.environ.get(ADMIN_URL_ENV) or DEFAULT_ADMIN_URL
    load_before = warn_if_busy()
    log_dir = RESULTS_DIR / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    values = credentials()
    jobs = [job for job in JOBS if args.only == "all" or job.workload in SAVE_WORKLOADS]
    async with scratch_database(admin_url) as (database_url, pg_version):
        with tempfile.TemporaryDirectory(prefix="integrations-bench-") as work, running({}) as servers:
            ctx = Context(args, servers, {}, database_url, Path(work), fields=frozenset(values))
            saves_only = args.only == "saves"
            start_servers(servers, ctx.missing, database_url, ctx.work_dir, log_dir, saves_only=saves_only)
            ctx.bao = None if saves_only else await start_openbao(log_dir, ctx.work_dir, values)
            if ctx.bao is not None:
                servers[OPENBAO] = ctx.bao.server
            elif not saves_only:
                ctx.missing[OPENBAO] = "not available: no `bao` binary (see bench/README.md)"
            for name, server in servers.items():
                if name != OPENBAO:
                    await wait_serving(server)
            await seed(servers[PG].target, [ORG, SAVE_ORG, RAW_ORG, *(f"{ROWS_ORG}_{i}" for i in range(64))], values)
            await seed(servers[EMBEDDED].target, [ORG, SAVE_ORG], values)
            await create_scratch_table(database_url)
            # Rounds interleave every row with its baseline again; each row reports its median round.
            rounds: dict[Key, list[Measurement]] = {}
            for number in range(1, args.rounds + 1):
                for job in jobs:
                    print(f"round {number}: {job.workload} on {job.server} with {job.tool} …", file=sys.stderr)
                    rounds.setdefault(job.key, []).append(await measure(job, ctx))
            results = {key: median_round(measured) for key, measured in rounds.items()}
    comparisons = [c for c in COMPARISONS if c.service in results and c.baseline in results]
    path = publish(render(results, comparisons, machine(args, pg_version, load_before), args.concurrency))
    print(f"written to {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}", file=sys.stderr)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds measured per phase (default 3)")
    parser.add_argument(
        "--warmup",
        type=float,
        default=1.0,
        help="seconds of warm-up per phase of the python rows (default 1); an h2load phase warms "
        f"up with max({WARMUP_CALLS}, {WARMUP_CALLS_PER_STREAM} × calls in flight) calls",
    )
    parser.add_argument(
        "--concurrency", type=int, default=64, help="calls in flight in the concurrent phase (default 64)"
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=4,
        help="h2load's connections to a gRPC server in the concurrent phase, the calls in "
        "flight shared among them as HTTP/2 streams (default 4)",
    )
    parser.add_argument(
        "--only",
        choices=("all", "saves"),
        default="all",
        help="saves: only the SaveIntegration rows and their baselines, without OpenBao, strict audit "
        "or workers (default all)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="times every row is measured, in turn with the others; each row shows its round with the median "
        "req/s at full concurrency (default 1)",
    )
    parser.add_argument(
        "--worker-connections",
        type=int,
        default=16,
        help=f"the same for the service with {WORKERS} workers (default 16): the kernel spreads connections, "
        "not calls, over the workers",
    )
    args = parser.parse_args()
    if args.duration <= 0 or args.warmup <= 0 or args.concurrency < 1 or not 1 <= args.connections <= args.concurrency:
        parser.error("--duration and --warmup must be > 0, --concurrency >= 1, 1 <= --connections <= --concurrency")
    if args.worker_connections < 1:
        parser.error("--worker-connections must be >= 1")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    return args


def main() -> int:
    args = parse_args()
    try:
        asyncio.run(bench(args))
    except (RuntimeError, OSError, asyncpg.PostgresError, grpc.aio.AioRpcError, TimeoutError) as error:
        # h2load.H2loadError is a RuntimeError: its message says what to install
        print(f"bench: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
