"""The PostgreSQL store's save alone, without gRPC: upserts per second and client CPU per upsert.

A second opinion on the SaveIntegration rows of run.py that leaves out everything but the store:
`PostgresStore.upsert` with an audit record, as the service calls it, on a scratch database, by
`--concurrency` tasks in one process for `--duration` seconds, writing `--rows` rows side by side
(task i writes row i mod rows), then the same one call at a time. Each upsert merges a new value
into the row's config, as a save does (without encryption). Prints one JSON line per phase.

Compare two versions of the store by running it twice, with PYTHONPATH pointing at the other
version's `service/` directory; their numbers are comparable within one pair of runs only.

Run: `.venv/bin/python bench/store_saves.py --rows 64` (BENCH_POSTGRES_URL as for run.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from urllib.parse import urlsplit, urlunsplit

import asyncpg  # type: ignore[import-untyped]

from integrations_service.store.base import AuditRecord, StoredIntegration, StoredValue
from integrations_service.store.postgres import PostgresStore

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
PROVIDER = "stripe"


def audit(organization_id: str) -> AuditRecord:
    return AuditRecord(
        time=datetime.now(UTC),
        caller="bench",
        action="SaveIntegration",
        outcome="OK",
        organization_id=organization_id,
        provider=PROVIDER,
        fields=("publishableKey",),
        request_id=secrets.token_hex(8),
        details={"fingerprint.publishableKey": "hmac:bench"},
    )


def merge(value: str) -> Callable[[StoredIntegration | None], dict[str, StoredValue]]:
    def mutate(current: StoredIntegration | None) -> dict[str, StoredValue]:
        return {**(current.config if current else {}), "publishableKey": StoredValue(value)}

    return mutate


async def phase(store: PostgresStore, rows: int, tasks: int, seconds: float) -> dict[str, float]:
    done = 0
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker(index: int) -> None:
        nonlocal done
        organization = f"org_store_bench_{index % rows}"
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await store.upsert(organization, PROVIDER, merge(f"pk_test_{done:010d}"), audit(organization))
            latencies.append(time.perf_counter() - started)
            done += 1

    cpu = time.process_time()
    wall = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(tasks)))
    wall = time.perf_counter() - wall
    cpu = time.process_time() - cpu
    return {
        "in_flight": tasks,
        "upserts_per_s": round(done / wall, 1),
        "mean_ms": round(sum(latencies) / len(latencies) * 1000, 3),
        "client_cpu_us_per_upsert": round(cpu / done * 1e6, 1),
    }


async def main(args: argparse.Namespace) -> None:
    admin = os.environ.get("BENCH_POSTGRES_URL") or DEFAULT_ADMIN_URL
    name = f"integrations_store_bench_{os.getpid()}_{secrets.token_hex(3)}"
    conn = await asyncpg.connect(admin)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    try:
        url = urlunsplit(urlsplit(admin)._replace(path=f"/{name}"))
        store = await PostgresStore.connect(url)
        try:
            for i in range(args.rows):  # the first save of each row
                organization = f"org_store_bench_{i}"
                await store.upsert(organization, PROVIDER, merge("pk_test_seed"), audit(organization))
            await phase(store, args.rows, args.concurrency, args.warmup)
            for tasks in (args.concurrency, 1):
                result = await phase(store, args.rows, tasks, args.duration)
                print(json.dumps({"rows": args.rows, **result}), flush=True)
        finally:
            await store.close()
    finally:
        conn = await asyncpg.connect(admin)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64, help="rows written side by side (default 64)")
    parser.add_argument("--concurrency", type=int, default=64, help="upserts in flight (default 64)")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per phase (default 3)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up (default 1)")
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
