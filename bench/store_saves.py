"""The PostgreSQL store's save, or the whole service's, without gRPC: saves per second and CPU per save.

A second opinion on the SaveIntegration rows of run.py that leaves out gRPC. With `--through store`
(the default) it leaves out everything but the store: `PostgresStore.upsert` with an audit record,
as the service calls it, merging a new value into the row's config (without encryption). With
`--through service` it drives `CredentialService.save` wired as `serve` wires it (`app.open_domain`:
sealing, fingerprints, the audit record, the row cache, the change feed's listener, store timing),
with the request a benchmark save sends: what a save costs the server before gRPC, the interceptor
and logging. Either runs on a scratch database, by `--concurrency` tasks in one process for
`--duration` seconds, writing `--rows` rows side by side (task i writes row i mod rows), then the
same one call at a time. Prints one JSON line per phase; `thread_cpu_us_per_save` is the event
loop's thread alone, which is what bounds a server's saves.

Compare two versions of the store by running it twice, with PYTHONPATH pointing at the other
version's `service/` directory; their numbers are comparable within one pair of runs only.

Run: `.venv/bin/python bench/store_saves.py --rows 64 [--through service]` (BENCH_POSTGRES_URL as for run.py).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import resource
import secrets
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from urllib.parse import urlsplit, urlunsplit

import asyncpg  # type: ignore[import-untyped]
from run import credentials
from workloads import SAVED_VALUE

from integrations_service.app import open_domain
from integrations_service.config import load_settings
from integrations_service.domain.audit import Caller
from integrations_service.domain.service import SaveRequest
from integrations_service.metrics import Metrics
from integrations_service.store.base import AuditRecord, StoredIntegration, StoredValue
from integrations_service.store.postgres import PostgresStore

Save = Callable[[int], Awaitable[object]]  # a save of row `index`

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


async def phase(save: Save, rows: int, tasks: int, seconds: float) -> dict[str, float]:
    done = 0
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker(index: int) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await save(index % rows)
            latencies.append(time.perf_counter() - started)
            done += 1

    cpu = time.process_time()
    thread_cpu = _thread_cpu()
    wall = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(tasks)))
    wall = time.perf_counter() - wall
    cpu = time.process_time() - cpu
    thread_cpu = _thread_cpu() - thread_cpu
    return {
        "in_flight": tasks,
        "saves_per_s": round(done / wall, 1),
        "mean_ms": round(sum(latencies) / len(latencies) * 1000, 3),
        "client_cpu_us_per_save": round(cpu / done * 1e6, 1),
        "thread_cpu_us_per_save": round(thread_cpu / done * 1e6, 1),
    }


def _thread_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_utime + usage.ru_stime


@asynccontextmanager
async def store_saves(url: str, rows: int) -> AsyncIterator[Save]:
    """`PostgresStore.upsert` of a new publishable key into row `index`, with its audit record."""
    store = await PostgresStore.connect(url)
    count = 0

    async def save(index: int) -> None:
        nonlocal count
        count += 1
        organization = f"org_store_bench_{index}"
        await store.upsert(organization, PROVIDER, merge(f"pk_test_{count:010d}"), audit(organization))

    try:
        yield save
    finally:
        await store.close()


@asynccontextmanager
async def service_saves(url: str, rows: int) -> AsyncIterator[Save]:
    """`CredentialService.save` of row `index`, as `serve` wires it, with the request run.py's saves send: each
    row first holds run.py's three seeded Stripe fields, so a save keeps (decrypts) two and seals one."""
    environment = {
        "INTEGRATIONS_MODE": "development",
        "DATABASE_URL": url,
        "INTEGRATION_ENCRYPTION_KEY": base64.b64encode(secrets.token_bytes(32)).decode(),  # never printed
        "INTEGRATIONS_DATA_DIR": tempfile.mkdtemp(prefix="service-saves-"),
    }
    domain = await open_domain(load_settings(None, environment), Metrics())
    domain.audit.start()
    caller = Caller("bench", "bench")
    for index in range(rows):
        await domain.service.save(SaveRequest(f"org_store_bench_{index}", PROVIDER, credentials(), (), ""), caller)

    async def save(index: int) -> None:
        request = SaveRequest(f"org_store_bench_{index}", PROVIDER, {"publishableKey": SAVED_VALUE}, (), "")
        await domain.service.save(request, caller)

    try:
        yield save
    finally:
        await domain.audit.close()
        await domain.store.close()


async def main(args: argparse.Namespace) -> None:
    admin = os.environ.get("BENCH_POSTGRES_URL") or DEFAULT_ADMIN_URL
    name = f"integrations_store_bench_{os.getpid()}_{secrets.token_hex(3)}"
    conn = await asyncpg.connect(admin)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    try:
        url = urlunsplit(urlsplit(admin)._replace(path=f"/{name}"))
        saves = service_saves if args.through == "service" else store_saves
        async with saves(url, args.rows) as save:
            for i in range(args.rows):  # the first save of each row
                await save(i)
            await phase(save, args.rows, args.concurrency, args.warmup)
            for tasks in (args.concurrency, 1):
                result = await phase(save, args.rows, tasks, args.duration)
                print(json.dumps({"through": args.through, "rows": args.rows, **result}), flush=True)
    finally:
        conn = await asyncpg.connect(admin)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--through",
        choices=("store", "service"),
        default="store",
        help="store: PostgresStore.upsert alone; service: CredentialService.save as serve wires it (default store)",
    )
    parser.add_argument("--rows", type=int, default=64, help="rows written side by side (default 64)")
    parser.add_argument("--concurrency", type=int, default=64, help="upserts in flight (default 64)")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per phase (default 3)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up (default 1)")
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
