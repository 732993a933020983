"""Load generator for the benchmark: one kind of call, two phases, JSON on stdout.

Runs in its own process (bench/run.py starts it), so its CPU time is not the
server's. For one kind of call it measures:

- concurrent: `--concurrency` workers sharing one channel (or one asyncpg pool),
  each sending its next call as soon as the previous one returns;
- sequential: one worker, one call at a time.

Each phase runs `--warmup` seconds (discarded), then `--duration` seconds,
and stops early after `--max-requests` calls. Calls:

- get: GetProviderConfig(view=CONFIG_VIEW_DECRYPTED) on `--target`;
- save: SaveIntegration setting publishableKey to a new value every call;
- upsert: the same change as a raw `INSERT ... ON CONFLICT DO UPDATE` on
  `--table`, with its audit row inserted in the same statement, through an
  asyncpg pool of `--pool-size` connections to `--dsn`;
- txn: the service's own save of an existing row on PostgreSQL, issued raw on
  `integration_config`: saves of the row queue in the process, and each is one
  statement, `integrations_save_if_unchanged` (migration 0005: the UPDATE if
  the row is still the version the previous save wrote, with its audit INSERT),
  same pool.

With `--rows N` (upsert) worker i writes organization `<org>_<i mod N>`, so
N rows are written side by side instead of one.

Prints one JSON object: {"phases": {"concurrent": Stats, "sequential": Stats},
"calls": calls made, warm-ups included}. Never prints response content (it
holds decrypted credentials).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import grpc

from integrations.v1 import integrations_pb2 as pb
from integrations.v1 import integrations_pb2_grpc as pb_grpc

PROVIDER = "stripe"
CALL_TIMEOUT_S = 10.0

Call = Callable[[int, int], Awaitable[object]]  # (call serial, worker index)

_AUDIT = (
    "WITH audited AS (INSERT INTO audit_events "
    "(time, caller, rpc, outcome, organization_id, provider, fields, request_id, details) "
    "VALUES (clock_timestamp(), 'bench', 'SaveIntegration', 'ok', $2, $3, '[\"publishableKey\"]'::jsonb, $5, "
    "'{{}}'::jsonb)) "
)
# {table} is a fixed identifier from the command line of bench/run.py; values are bind parameters.
UPSERT_SQL = _AUDIT + (
    "INSERT INTO {table} AS t (id, organization_id, provider, config, version, created_at, updated_at) "
    "VALUES ($1, $2, $3, $4::jsonb, 1, clock_timestamp(), clock_timestamp()) "
    "ON CONFLICT (organization_id, provider) DO UPDATE SET config = t.config || EXCLUDED.config, "
    "version = t.version + 1, updated_at = clock_timestamp() "
    "RETURNING id, organization_id, provider, config, version, created_at, updated_at"
)
# The service's save of an existing row as of this benchmark (store/postgres.py, migration 0005),
# statement for statement: the row as last written (read once at the start), then one statement that
# writes the row and its audit record if the row is still that version, else returns it as stored.
TXN_SELECT_SQL = (
    "SELECT id, organization_id, provider, config, version, created_at, updated_at, xmin AS row_xmin "
    "FROM integration_config WHERE organization_id = $1 AND provider = $2"
)
TXN_SAVE_SQL = (
    "SELECT written, id, organization_id, provider, config, version, created_at, updated_at, row_xmin "
    "FROM integrations_save_if_unchanged($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)"
)
# What the service passes as lock_timeout: what is left of its budget (INTEGRATIONS_DB_TIMEOUT, 5 s).
TXN_LOCK_TIMEOUT_MS = 4900


@dataclass
class Stats:
    requests: int
    errors: int
    seconds: float
    rps: float
    mean_ms: float
    p50_ms: float
    p99_ms: float
    first_error: str = ""


@dataclass
class Recorder:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""

    @property
    def calls(self) -> int:
        return len(self.latencies) + self.errors

    def failed(self, error: BaseException) -> None:
        self.errors += 1
        if not self.first_error:
            code = error.code().name if isinstance(error, grpc.aio.AioRpcError) else type(error).__name__
            self.first_error = code


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list; 0 when empty."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


async def _worker(
    call: Call, index: int, serial: itertools.count[int], deadline: float, limit: int, recorder: Recorder
) -> None:
    while time.perf_counter() < deadline and recorder.calls < limit:
        started = time.perf_counter()
        try:
            await call(next(serial), index)
        except (grpc.aio.AioRpcError, asyncpg.PostgresError, OSError, TimeoutError) as error:
            recorder.failed(error)
            continue
        recorder.latencies.append(time.perf_counter() - started)


async def run_phase(call: Call, workers: int, seconds: float, limit: int, serial: itertools.count[int]) -> Stats:
    """`workers` loops calling `call` for `seconds` (at most `limit` calls); `serial` numbers the calls."""
    recorder = Recorder()
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(*(_worker(call, i, serial, deadline, limit, recorder) for i in range(workers)))
    elapsed = time.perf_counter() - started
    ordered = sorted(recorder.latencies)
    return Stats(
        requests=len(ordered),
        errors=recorder.errors,
        seconds=round(elapsed, 3),
        rps=round(len(ordered) / elapsed, 1) if elapsed else 0.0,
        mean_ms=round(sum(ordered) / len(ordered) * 1000, 3) if ordered else 0.0,
        p50_ms=round(percentile(ordered, 0.50) * 1000, 3),
        p99_ms=round(percentile(ordered, 0.99) * 1000, 3),
        first_error=recorder.first_error,
    )


async def measure(call: Call, args: argparse.Namespace) -> tuple[dict[str, Stats], int]:
    """Both phases' stats, and the number of calls made, warm-ups included."""
    serial = itertools.count()  # across phases, so every save writes a value not written before
    results = {}
    for mode, workers in (("concurrent", args.concurrency), ("sequential", 1)):
        await run_phase(call, workers, args.warmup, args.max_requests, serial)
        results[mode] = await run_phase(call, workers, args.duration, args.max_requests, serial)
    return results, next(serial)


def grpc_call(stub: pb_grpc.IntegrationServiceStub, kind: str, org: str) -> Call:
    if kind == "get":
        request = pb.GetProviderConfigRequest(organization_id=org, provider=PROVIDER, view=pb.CONFIG_VIEW_DECRYPTED)
        return lambda _n, _worker: stub.GetProviderConfig(request, timeout=CALL_TIMEOUT_S)

    def save(n: int, _worker: int) -> Awaitable[object]:
        request = pb.SaveIntegrationRequest(
            organization_id=org, provider=PROVIDER, values={"publishableKey": f"pk_test_bench{n:010d}"}
        )
        return stub.SaveIntegration(request, timeout=CALL_TIMEOUT_S)

    return save


def upsert_call(pool: Any, table: str, org: str, rows: int) -> Call:
    sql = UPSERT_SQL.format(table=table)

    def upsert(n: int, worker: int) -> Awaitable[object]:
        organization = f"{org}_{worker % rows}" if rows > 1 else org
        change = json.dumps({"publishableKey": f"pk_test_bench{n:010d}"})
        return pool.fetchrow(
            sql, uuid.uuid4().hex, organization, PROVIDER, change, uuid.uuid4().hex, timeout=CALL_TIMEOUT_S
        )

    return upsert


def transaction_call(pool: Any, org: str) -> Call:
    # Like the service, saves of the row queue in this process, and each starts from the row as the
    # previous one wrote it; a save that finds the row changed retries on the row it got back.
    queue = asyncio.Lock()
    last: dict[str, Any] = {}

    async def save(n: int, _worker: int) -> object:
        async with queue:
            row = last.get("row") or await pool.fetchrow(TXN_SELECT_SQL, org, PROVIDER, timeout=CALL_TIMEOUT_S)
            while True:
                config = {**json.loads(row["config"]), "publishableKey": f"pk_test_bench{n:010d}"}
                audit = (datetime.now(UTC), "bench", "SaveIntegration", "OK", org, PROVIDER)
                row = await pool.fetchrow(
                    TXN_SAVE_SQL,
                    org,
                    PROVIDER,
                    row["id"],
                    row["version"],
                    row["row_xmin"],
                    json.dumps(config),
                    TXN_LOCK_TIMEOUT_MS,
                    True,
                    *audit,
                    '["publishableKey"]',
                    uuid.uuid4().hex,
                    "{}",
                    timeout=CALL_TIMEOUT_S,
                )
                if row["written"]:
                    last["row"] = row
                    return row

    return save


async def _keep_session(_connection: Any) -> None:
    pass


async def run(args: argparse.Namespace) -> tuple[dict[str, Stats], int]:
    if args.call in ("upsert", "txn"):
        # No reset query on release, like the service's pool (asyncpg still rolls back an open transaction).
        pool = await asyncpg.create_pool(
            args.dsn, min_size=args.pool_size, max_size=args.pool_size, reset=_keep_session
        )
        try:
            call = (
                upsert_call(pool, args.table, args.org, args.rows)
                if args.call == "upsert"
                else transaction_call(pool, args.org)
            )
            return await measure(call, args)
        finally:
            await pool.close()
    async with grpc.aio.insecure_channel(args.target) as channel:
        await asyncio.wait_for(channel.channel_ready(), timeout=CALL_TIMEOUT_S)
        return await measure(grpc_call(pb_grpc.IntegrationServiceStub(channel), args.call, args.org), args)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--call", choices=("get", "save", "upsert", "txn"), required=True)
    parser.add_argument("--target", help="host:port of the gRPC server (get, save)")
    parser.add_argument("--dsn", help="PostgreSQL URL of the benchmark database (upsert)")
    parser.add_argument("--table", default="bench_upsert", help="scratch table (upsert)")
    parser.add_argument("--pool-size", type=int, default=10, help="asyncpg pool size (upsert)")
    parser.add_argument("--org", required=True, help="organization id of the seeded row")
    parser.add_argument("--rows", type=int, default=1, help="rows written side by side (upsert)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--max-requests", type=int, default=1_000_000)
    args = parser.parse_args()
    raw = args.call in ("upsert", "txn")
    if raw != bool(args.dsn) or (not raw) != bool(args.target):
        parser.error("upsert and txn need --dsn; get and save need --target")
    if args.rows < 1:
        parser.error("--rows must be >= 1")
    if not args.table.isidentifier():
        parser.error("--table must be a plain identifier")
    return args


def main() -> None:
    results, calls = asyncio.run(run(parse_args()))
    print(json.dumps({"phases": {mode: asdict(stats) for mode, stats in results.items()}, "calls": calls}))


if __name__ == "__main__":
    main()
