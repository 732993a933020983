"""Change propagation benchmark (issue 10): how soon a cached client on one replica serves a save made on another.

Creates a scratch PostgreSQL database and starts two `integrations-service serve`
processes on it, replicas A and B (development mode, plaintext on loopback, one
key). Then, all in one run:

1. **watch on**: a cached Python client (`integrations_client.IntegrationsClient`,
   decrypted view, `cache_ttl` 300 s so the TTL cannot be what refreshes it) on B
   caches one row; `--saves` sequential saves through A each set a new
   `secretKey` on that row. For each save: the time from A's acknowledgement
   until the client's `get_config` returns the new etag and value, polled every
   `POLL_S` (the client answers from its cache between polls, so what is
   measured is the watch's eviction plus one re-read of B); then the same for the
   blocking client (`IntegrationsClientSync`, whose watch is a daemon thread), on
   another row;
2. **watch off**: the same with `watch=False` and `cache_ttl` `--short-ttl`
   (1 s), `--saves-without-watch` saves, each after a random pause in
   [0, TTL): the bound is the TTL;
3. **with idle streams**: `--streams` WatchConfigChanges streams opened on B by
   a separate process (bench/watch_streams.py, raw grpc.aio stubs over
   `--connections` connections, scope everything, only receiving). B's resident
   memory (VmRSS) before and after; `--saves` more saves through A, measured as
   in 1 by the same client, while the streams process records when each change
   reaches each stream: the fan-out delay, over every stream × save pair and per
   save until the last stream has it. The streams process's CPU time says
   whether it kept up;
4. **ends**: half the streams cancelled (B must count them gone), then B is sent
   SIGTERM with the rest open: how long it takes to exit, and the status each
   stream ended with;
5. **baseline**: the same streams on bench/empty_server.py, whose
   WatchConfigChanges queues one prebuilt message per change for every stream
   (DeleteIntegration publishes one), `--baseline-saves` changes one at a time:
   what gRPC itself costs per stream message, and per stream in memory.

Prints a markdown report and writes it to bench/results/watch.md. Everything it
started is stopped and the database is dropped at the end. Asserts nothing.

Run: `.venv/bin/python bench/watch.py [--saves 200] [--streams 1000] [--connections 1000]`
(about 2 minutes on the 2 busy cores, most of it the fan-out to 1,000 streams).
PostgreSQL admin URL: env BENCH_POSTGRES_URL
(default postgresql://postgres@127.0.0.1:5432/postgres).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import os
import platform
import random
import re
import secrets
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import grpc
from run import (
    ADMIN_URL_ENV,
    DEFAULT_ADMIN_URL,
    RESULTS_DIR,
    cpu_model,
    cpu_seconds,
    load_average,
    scratch_database,
    source_revision,
    warn_if_busy,
)
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
from integrations_client import IntegrationsClient, IntegrationsClientSync

PROVIDER = "stripe"
ORG = "org_watch_bench"  # the row the watched client reads and A's saves write
TTL_ORG = "org_watch_bench_ttl"  # the same for the client without a watch
SYNC_ORG = "org_watch_bench_sync"  # the same for the blocking client
POLL_S = 0.001  # the client is asked again this often until it serves the new value
TARGET_MS = 100.0
SAVE_TIMEOUT_S = 10.0
SIGTERM_WAIT_S = 15.0
GAUGE_WAIT_S = 5.0  # for B's gauge to count the cancelled streams gone
EMPTY = "empty handler"


def secret_key(serial: int) -> str:
    """A new test-shaped secretKey per save (random: never a value anyone uses; never printed)."""
    return f"sk_test_51Watch{serial:06d}{secrets.token_hex(12)}"


# --- measurements ----------------------------------------------------------------------------------


@dataclass
class Propagation:
    """Per save: ms from A's acknowledgement until the client served the new value (None: not within the bound)."""

    case: str
    ttl: float
    bound: float  # seconds waited at most per save
    served_ms: list[float | None] = field(default_factory=list)
    event_ms: list[float] = field(default_factory=list)  # until the client had counted the watch event (if on)
    reads: list[int] = field(default_factory=list)  # GetProviderConfig calls the client made to B per save
    acked: dict[str, float] = field(default_factory=dict)  # etag -> monotonic time A acknowledged it
    wrong_value: int = 0  # the new etag served with another value (never expected)
    seconds: float = 0.0
    watching: bool = False  # the client's watch was live when the saves started

    @property
    def missed(self) -> int:
        return sum(1 for ms in self.served_ms if ms is None)

    @property
    def served(self) -> list[float]:
        return [ms for ms in self.served_ms if ms is not None]


async def propagation(
    a: pb_grpc.IntegrationServiceStub,
    client: IntegrationsClient,
    result: Propagation,
    org: str,
    saves: int,
    pause: float = 0.0,
    halfway: Callable[[], None] | None = None,
) -> Propagation:
    """`saves` sequential saves through A, each followed by polling the client on B until it serves the new value."""
    creds = await client.get_config(org, PROVIDER)  # cached now; the first read also starts the client's watch
    result.watching = client.cache_stats.watching
    began = time.monotonic()
    for serial in range(saves):
        if halfway is not None and serial == saves // 2:
            halfway()
        if pause:
            await asyncio.sleep(random.uniform(0, pause))
        value = secret_key(serial)
        stats = client.cache_stats
        events_before, rpcs_before = stats.watch_events, stats.rpc_count
        reply = await a.SaveIntegration(
            pb.SaveIntegrationRequest(organization_id=org, provider=PROVIDER, values={"secretKey": value}),
            timeout=SAVE_TIMEOUT_S,
        )
        acked = time.monotonic()
        etag = reply.config.etag
        result.acked[etag] = acked
        event_at: float | None = None
        served_ms: float | None = None
        while True:
            if event_at is None and client.cache_stats.watch_events > events_before:
                event_at = time.monotonic()  # the watch delivered the change; the read below is the re-read
            creds = await client.get_config(org, PROVIDER)
            now = time.monotonic()
            if creds.etag == etag:
                if creds["secretKey"] != value:
                    result.wrong_value += 1
                served_ms = (now - acked) * 1000
                break
            if now - acked > result.bound:
                break
            await asyncio.sleep(POLL_S)
        result.served_ms.append(served_ms)
        if event_at is not None:
            result.event_ms.append((event_at - acked) * 1000)
        result.reads.append(client.cache_stats.rpc_count - rpcs_before)
    result.seconds = time.monotonic() - began
    return result


def propagation_sync(
    a_target: str, client: IntegrationsClientSync, result: Propagation, org: str, saves: int
) -> Propagation:
    """`propagation` for the blocking client (its watch is a daemon thread), on a thread of its own."""
    with grpc.insecure_channel(a_target) as channel:
        a = pb_grpc.IntegrationServiceStub(channel)
        client.get_config(org, PROVIDER)
        result.watching = client.cache_stats.watching
        began = time.monotonic()
        for serial in range(saves):
            value = secret_key(serial)
            stats = client.cache_stats
            events_before, rpcs_before = stats.watch_events, stats.rpc_count
            reply = a.SaveIntegration(
                pb.SaveIntegrationRequest(organization_id=org, provider=PROVIDER, values={"secretKey": value}),
                timeout=SAVE_TIMEOUT_S,
            )
            acked = time.monotonic()
            etag = reply.config.etag
            result.acked[etag] = acked
            event_at: float | None = None
            served_ms: float | None = None
            while True:
                if event_at is None and client.cache_stats.watch_events > events_before:
                    event_at = time.monotonic()
                creds = client.get_config(org, PROVIDER)
                now = time.monotonic()
                if creds.etag == etag:
                    if creds["secretKey"] != value:
                        result.wrong_value += 1
                    served_ms = (now - acked) * 1000
                    break
                if now - acked > result.bound:
                    break
                time.sleep(POLL_S)
            result.served_ms.append(served_ms)
            if event_at is not None:
                result.event_ms.append((event_at - acked) * 1000)
            result.reads.append(client.cache_stats.rpc_count - rpcs_before)
        result.seconds = time.monotonic() - began
    return result


def sync_case(a_target: str, b_target: str, args: argparse.Namespace) -> Propagation:
    result = Propagation("watch on, blocking client, B idle", args.ttl, args.give_up)
    with IntegrationsClientSync(b_target, cache_ttl=args.ttl, timeout=5.0) as client:
        return propagation_sync(a_target, client, result, SYNC_ORG, args.saves)


def nearest_rank(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def summary(values: Sequence[float]) -> str:
    """p50 / p99 / max in ms (p99: nearest rank)."""
    if not values:
        return "—"
    return f"{statistics.median(values):.1f} / {nearest_rank(values, 0.99):.1f} / {max(values):.1f}"


def p99(values: Sequence[float]) -> float | None:
    return nearest_rank(values, 0.99) if values else None


# --- replicas --------------------------------------------------------------------------------------


def vm_rss_kib(pid: int) -> int:
    """Resident memory of a live process and its live descendants (`serve --workers`), from /proc/<pid>/status."""
    total = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            total = int(line.split()[1])  # kB there means KiB
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in children.read_text().split():
            with contextlib.suppress(OSError):
                total += vm_rss_kib(int(child))
    return total


def watch_streams_gauge(metrics_address: str) -> int | None:
    """B's own count of the WatchConfigChanges streams it has open (integrations_watch_streams, every sample)."""
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    samples = re.findall(r"^integrations_watch_streams(?:\{[^}]*\})? (\S+)$", text, re.M)
    return round(sum(float(sample) for sample in samples)) if samples else None  # summed over workers


def start_replicas(database_url: str, work_dir: Path, log_dir: Path, b_workers: int) -> dict[str, Server]:
    key = base64.b64encode(secrets.token_bytes(32)).decode()  # fresh, only in the servers' environment
    servers = {}
    for name in ("A", "B"):
        target = f"127.0.0.1:{free_port()}"
        data_dir = work_dir / name
        data_dir.mkdir()
        env = service_environment(target, database_url, key, data_dir)
        command = service_command()
        if name == "B" and b_workers > 1:
            command += ["--workers", str(b_workers)]
        servers[name] = spawn(f"watch-replica-{name.lower()}", command, env, log_dir, target)
        servers[name].metrics_address = env["INTEGRATIONS_METRICS_ADDRESS"]
    return servers


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


# --- the idle streams ------------------------------------------------------------------------------


class StreamsProcess:
    """bench/watch_streams.py, driven through its stdin and stdout (JSON lines)."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, target: str, streams: int, connections: int, organization: str) -> StreamsProcess:
        command = [
            sys.executable,
            str(BENCH_DIR / "watch_streams.py"),
            "--target",
            target,
            "--streams",
            str(streams),
            "--connections",
            str(connections),
            "--organization",
            organization,
        ]
        process = await asyncio.create_subprocess_exec(
            *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        return cls(process)

    async def answer(self, timeout: float = 90.0) -> dict[str, Any]:  # noqa: ASYNC109
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"watch_streams.py exited ({await self.process.wait()})")
        message: dict[str, Any] = json.loads(line)
        return message

    async def ask(self, command: str, timeout: float = 90.0) -> dict[str, Any]:  # noqa: ASYNC109
        assert self.process.stdin is not None
        self.process.stdin.write(f"{command}\n".encode())
        await self.process.stdin.drain()
        return await self.answer(timeout)

    async def finish(self) -> None:
        if self.process.returncode is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                await asyncio.wait_for(self.process.wait(), 20)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


@dataclass
class FanOut:
    streams: int
    connections: int
    server: str = "B"  # B, or the empty handler (the baseline)
    ends: bool = False  # whether the stream ends (cancel, SIGTERM) were measured
    open_seconds: float = 0.0
    live: int = 0
    gauge_open: int | None = None
    rss_before_kib: int = 0
    rss_after_kib: int = 0
    rss_halfway_kib: int = 0  # after half the saves: growth in the second half would be a leak
    rss_after_saves_kib: int = 0
    pairs_ms: list[float] = field(default_factory=list)  # every stream × save: arrival − acknowledgement
    last_ms: list[float] = field(default_factory=list)  # per save: until the last stream had it
    expected: int = 0
    received: int = 0
    resyncs: int = 0
    duplicates: int = 0
    streams_cpu_percent: float = 0.0  # of one core, over the saves
    bench_cpu_percent: float = 0.0  # this process (the watched client, its polling, the saves), the same
    server_cpu_ms_per_save: float = 0.0
    closed: int = 0
    gauge_after_close: int | None = None
    gauge_after_close_s: float = 0.0  # when it was read, after the cancels
    sigterm_exit_s: float | None = None
    end_codes: dict[str, int] = field(default_factory=dict)
    still_open: int = 0
    last_end_s: float | None = None


def fan_out_delays(
    result: FanOut, arrivals: dict[str, list[float]], acked: dict[str, float], *, in_scope: bool = True
) -> None:
    """The delays of the changes that reached the streams; `in_scope` False: none should have (another org)."""
    for etag, at in acked.items():
        times = arrivals.get(etag, [])
        result.received += len(times)
        result.pairs_ms.extend((t - at) * 1000 for t in times)
        if len(times) == result.live:
            result.last_ms.append((max(times) - at) * 1000)
    result.expected = result.live * len(acked) if in_scope else 0


# --- report ----------------------------------------------------------------------------------------


def _mib(kib: int) -> str:
    return f"{kib / 1024:.1f}"


def _fan_row(fan: FanOut) -> str:
    per_stream = (fan.rss_after_kib - fan.rss_before_kib) / max(fan.live, 1)
    first_half = fan.rss_halfway_kib - fan.rss_after_kib
    second_half = fan.rss_after_saves_kib - fan.rss_halfway_kib
    missing = fan.expected - fan.received  # negative: events a stream should not have had
    gauge = f" ({fan.gauge_open})" if fan.gauge_open is not None else ""
    per_message = fan.server_cpu_ms_per_save * 1000 / max(fan.live, 1)
    return (
        f"| {fan.server} | {fan.live}{gauge} | {fan.open_seconds:.1f} s | {_mib(fan.rss_before_kib)} → "
        f"{_mib(fan.rss_after_kib)} → {_mib(fan.rss_after_saves_kib)} ({first_half:+d} / {second_half:+d} KiB) | "
        f"{per_stream:.1f} KiB | {summary(fan.pairs_ms)} | {summary(fan.last_ms)} | "
        f"{missing} of {fan.expected} / {fan.resyncs} / {fan.duplicates} | "
        f"{fan.streams_cpu_percent:.0f} % / {fan.bench_cpu_percent:.0f} % of a core | "
        f"{fan.server_cpu_ms_per_save:.1f} ms ({per_message:.0f} µs) |"
    )


def _ends(fan: FanOut) -> str:
    return (
        f"Ends: {fan.closed} streams cancelled by the consumer → B's gauge {fan.gauge_after_close} "
        f"{fan.gauge_after_close_s:.1f} s later (expected {fan.live + 1 - fan.closed}, the watched client's stream "
        "included). SIGTERM to B with "
        f"{fan.live - fan.closed} open: B exited after "
        + (f"{fan.sigterm_exit_s:.2f} s" if fan.sigterm_exit_s is not None else "**no exit**")
        + f"; the streams ended with {json.dumps(fan.end_codes)}"
        + (f", the last {fan.last_end_s:.2f} s after the signal" if fan.last_end_s is not None else "")
        + (f", **{fan.still_open} still open**" if fan.still_open else "")
        + "."
    )


def render(machine: dict[str, str], cases: list[Propagation], fans: Sequence[FanOut]) -> str:
    lines = [
        "# integrations-service change propagation (issue 10)",
        "",
        " · ".join(f"{key}: {value}" for key, value in machine.items()),
        "",
        "## Save acknowledged by A → the cached client on B serves the new value",
        "",
        f"Per save, ms from A's reply to the save until `get_config` on the client of B returned the new etag and "
        f"value (polled every {POLL_S * 1000:g} ms; p99 is the nearest rank). 'event seen': until the client had "
        "counted the change from its watch stream (same polling). 'reads of B': GetProviderConfig calls the client "
        "made per save.",
        "",
        "| case | client TTL | saves | served p50 / p99 / max ms | not served within | event seen p50 / p99 ms "
        "| reads of B per save (mean) | target |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for case in cases:
        event = summary(case.event_ms).rsplit(" / ", 1)[0] if case.event_ms else "—"
        missed = f"{case.missed} of {len(case.served_ms)} ({case.bound:g} s)"
        if case.missed:
            missed = f"**{missed}**"
        reads = statistics.mean(case.reads) if case.reads else 0.0
        target = ""
        if "watch on" in case.case:
            value = p99(case.served)
            verdict = "met" if value is not None and value <= TARGET_MS and not case.missed else "**not met**"
            target = f"p99 ≤ {TARGET_MS:g} ms: {verdict}"
            if not case.watching:
                target += " (**the client's watch was not live when the saves began**)"
        wrong = f"; **{case.wrong_value} new etags with another value**" if case.wrong_value else ""
        lines.append(
            f"| {case.case} | {case.ttl:g} s | {len(case.served_ms)} | {summary(case.served)} | {missed} | {event} | "
            f"{reads:.2f} | {target}{wrong} |"
        )
    on = next((c for c in cases if c.case.startswith("watch on") and "streams" not in c.case), None)
    off = next((c for c in cases if c.case.startswith("watch off")), None)
    if on and off and on.served and off.served:
        lines += [
            "",
            f"Without its watch the client served a new value {statistics.median(off.served):.0f} ms after the save "
            f"(median; p99 {p99(off.served):.0f} ms) with a {off.ttl:g} s TTL, i.e. bounded by the TTL; with it, "
            f"{statistics.median(on.served):.1f} ms (p99 {p99(on.served):.1f} ms) with a {on.ttl:g} s TTL: "
            f"p99 {p99(off.served) / p99(on.served):.0f}× shorter, and independent of the TTL.",  # type: ignore[operator]
        ]
    if fans:
        lines += [
            "",
            f"## {fans[0].streams} idle watch streams",
            "",
            f"Opened by bench/watch_streams.py (raw grpc.aio stubs) over {fans[0].connections} connections, on B and "
            "on the baseline, bench/empty_server.py (one prebuilt message per change queued for every stream: no "
            "interceptor, scope or conversion per stream). Memory: VmRSS of the server before opening them, once all "
            "had their first message, halfway through the saves and after them. Fan-out: ms from the save's reply "
            "(A's; the baseline's DeleteIntegration) until the change reached a stream, over every stream × save "
            "pair, and per save until the last stream had it.",
            "",
            "| server | streams live (its gauge) | opened in | RSS before → after open → after the saves, MiB (growth "
            "over the first / second half of the saves) | memory per stream "
            "| fan-out p50 / p99 / max ms, stream × save | per save, last stream: p50 / p99 / max ms "
            "| events missing / resyncs / duplicates | CPU of the streams process / of this one "
            "| server CPU per save (per stream) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for fan in fans:
            lines.append(_fan_row(fan))
        b = fans[0]
        if len(fans) > 1 and fans[1].server_cpu_ms_per_save and b.server_cpu_ms_per_save:
            lines += [
                "",
                f"B spends {b.server_cpu_ms_per_save / fans[1].server_cpu_ms_per_save:.1f}× the baseline's CPU per "
                "change fanned out to the same streams.",
            ]
        for fan in fans:
            if fan.ends:
                lines += ["", _ends(fan)]
            missing = fan.expected - fan.received
            if missing:
                lines.append(f"\n**{fan.server}: {missing} stream × save events never arrived.**")
    lines.append("")
    return "\n".join(lines)


def machine(args: argparse.Namespace, postgres_version: str, load_before: float) -> dict[str, str]:
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": source_revision(),
        "nproc": str(os.cpu_count()),
        "CPU": cpu_model(),
        "Python": platform.python_version(),
        "grpcio": version("grpcio"),
        "PostgreSQL": postgres_version.split()[0],
        "B": f"serve --workers {args.b_workers}" if args.b_workers > 1 else "one process",
        "idle streams watch": f"organization {args.streams_organization}"
        if args.streams_organization
        else "everything",
        "load avg (1 min) before": f"{load_before:.2f}",
        "after": f"{load_average():.2f}",
    }


# --- main ------------------------------------------------------------------------------------------


async def open_streams(args: argparse.Namespace, server: Server, fan: FanOut, organization: str) -> StreamsProcess:
    """Opens the idle streams on `server`: its memory before and after, its own count of them."""
    await asyncio.sleep(0.5)
    fan.rss_before_kib = vm_rss_kib(server.process.pid)
    streams = await StreamsProcess.start(server.target, args.streams, args.connections, organization)
    try:
        ready = await streams.answer()
        fan.open_seconds, fan.live = ready["seconds"], ready["live"]
        await asyncio.sleep(1.0)  # let the server settle (allocations of the last streams, a gc pass)
        fan.rss_after_kib = vm_rss_kib(server.process.pid)
        if server.metrics_address:
            fan.gauge_open = await asyncio.to_thread(watch_streams_gauge, server.metrics_address)
    except BaseException:
        await streams.finish()
        raise
    return streams


async def fanned_out(
    fan: FanOut,
    streams: StreamsProcess,
    server: Server,
    work_dir: Path,
    saves: int,
    run_saves: Callable[[Callable[[], None]], Awaitable[dict[str, float]]],
    *,
    in_scope: bool = True,
) -> None:
    """Runs `saves` saves (`run_saves(halfway)` -> etag: acknowledged at) and measures their fan-out to the streams."""
    cpu_streams, cpu_server, began = cpu_seconds(streams.process.pid), cpu_seconds(server.process.pid), time.monotonic()
    cpu_self = own_cpu_seconds()

    def halfway() -> None:
        fan.rss_halfway_kib = vm_rss_kib(server.process.pid)

    acked = await run_saves(halfway)
    await asyncio.sleep(1.0)  # the last fan-out
    wall = time.monotonic() - began
    fan.streams_cpu_percent = (cpu_seconds(streams.process.pid) - cpu_streams) / wall * 100
    fan.bench_cpu_percent = (own_cpu_seconds() - cpu_self) / wall * 100
    fan.server_cpu_ms_per_save = (cpu_seconds(server.process.pid) - cpu_server) / max(saves, 1) * 1000
    fan.rss_after_saves_kib = vm_rss_kib(server.process.pid)
    report_path = work_dir / f"arrivals-{fan.server}.json"
    await streams.ask(f"report {report_path}")
    report = json.loads(report_path.read_text())
    fan.resyncs, fan.duplicates = report["resyncs"], report["duplicates"]
    fan_out_delays(fan, report["arrivals"], acked, in_scope=in_scope)


async def measure_streams(
    args: argparse.Namespace,
    servers: dict[str, Server],
    a: pb_grpc.IntegrationServiceStub,
    client: IntegrationsClient,
    work_dir: Path,
) -> tuple[Propagation, FanOut]:
    b = servers["B"]
    fan = FanOut(args.streams, args.connections, server="B", ends=True)
    streams = await open_streams(args, b, fan, args.streams_organization)
    try:
        print(f"{fan.live} streams live on B; saving through A …", file=sys.stderr)
        case = Propagation(f"watch on, {fan.live} idle streams on B", args.ttl, args.give_up)

        async def saves(halfway: Callable[[], None]) -> dict[str, float]:
            await propagation(a, client, case, ORG, args.saves, halfway=halfway)
            return case.acked

        await fanned_out(fan, streams, b, work_dir, args.saves, saves, in_scope=not args.streams_organization)
        # The ends: cancelled streams must be gone from B, and SIGTERM must end the rest.
        fan.closed = (await streams.ask(f"close {fan.live // 2}"))["n"]
        closed_at = time.monotonic()
        expected = fan.live + 1 - fan.closed  # the watched client's stream stays
        while True:  # with --workers the supervisor's gauge lags by up to a second
            fan.gauge_after_close = await asyncio.to_thread(watch_streams_gauge, b.metrics_address)
            fan.gauge_after_close_s = time.monotonic() - closed_at
            if fan.gauge_after_close == expected or fan.gauge_after_close_s > GAUGE_WAIT_S:
                break
            await asyncio.sleep(0.1)
        await client.close()  # its stream would reconnect to nothing
        signalled = time.monotonic()
        b.process.send_signal(signal.SIGTERM)
        ended = await streams.ask(f"wait-end {SIGTERM_WAIT_S}", timeout=SIGTERM_WAIT_S + 30)
        try:
            await asyncio.to_thread(b.process.wait, SIGTERM_WAIT_S)
            fan.sigterm_exit_s = time.monotonic() - signalled
        except Exception:  # subprocess.TimeoutExpired: stop() kills it later
            fan.sigterm_exit_s = None
        fan.end_codes = {code: n for code, n in ended["codes"].items() if code != "CANCELLED"}
        fan.still_open = ended["open"]
        if ended["open"] == 0:
            fan.last_end_s = ended["last_end"] - signalled
    finally:
        await streams.finish()
    return case, fan


async def measure_baseline(args: argparse.Namespace, log_dir: Path, work_dir: Path) -> FanOut:
    """The same streams and fan-out on bench/empty_server.py: one prebuilt message per change, queued per stream."""
    target = f"127.0.0.1:{free_port()}"
    server = spawn(
        "watch-empty-handler",
        [*empty_server_command(), "--listen-address", target],
        clean_environment(),
        log_dir,
        target,
    )
    fan = FanOut(args.streams, args.connections, server=EMPTY)
    try:
        await wait_serving(server)
        streams = await open_streams(args, server, fan, "")
        try:
            print(f"{fan.live} streams live on the empty handler; fanning out …", file=sys.stderr)
            async with grpc.aio.insecure_channel(target) as channel:
                stub = pb_grpc.IntegrationServiceStub(channel)

                async def saves(halfway: Callable[[], None]) -> dict[str, float]:
                    acked: dict[str, float] = {}
                    for serial in range(args.baseline_saves):
                        if serial == args.baseline_saves // 2:
                            halfway()
                        etag = f"baseline-{serial}"
                        await stub.DeleteIntegration(
                            pb.DeleteIntegrationRequest(organization_id=ORG, provider=PROVIDER, etag=etag),
                            timeout=SAVE_TIMEOUT_S,
                        )
                        acked[etag] = time.monotonic()
                        # One change at a time, as B's are (each waits for the client to serve it).
                        await streams.ask(f"await {etag} {args.give_up}")
                    return acked

                await fanned_out(fan, streams, server, work_dir, args.baseline_saves, saves)
        finally:
            await streams.finish()
    finally:
        stop(server)
    return fan


async def bench(args: argparse.Namespace) -> None:
    admin_url = os.environ.get(ADMIN_URL_ENV) or DEFAULT_ADMIN_URL
    load_before = warn_if_busy()
    log_dir = RESULTS_DIR / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    cases: list[Propagation] = []
    fans: list[FanOut] = []
    async with scratch_database(admin_url) as (database_url, pg_version):
        with tempfile.TemporaryDirectory(prefix="integrations-watch-bench-") as work:
            work_dir = Path(work)
            servers = start_replicas(database_url, work_dir, log_dir, args.b_workers)
            try:
                for server in servers.values():
                    await wait_serving(server)
                async with grpc.aio.insecure_channel(servers["A"].target) as channel:
                    a = pb_grpc.IntegrationServiceStub(channel)
                    for org in (ORG, TTL_ORG, SYNC_ORG):
                        await a.SaveIntegration(
                            pb.SaveIntegrationRequest(
                                organization_id=org, provider=PROVIDER, values={"secretKey": secret_key(0)}
                            ),
                            timeout=SAVE_TIMEOUT_S,
                        )
                    b = servers["B"].target
                    watched = IntegrationsClient(b, cache_ttl=args.ttl, timeout=5.0)
                    try:
                        print(f"watch on: {args.saves} saves …", file=sys.stderr)
                        case = Propagation("watch on, B idle", args.ttl, args.give_up)
                        cases.append(await propagation(a, watched, case, ORG, args.saves))
                        print(f"watch on, blocking client: {args.saves} saves …", file=sys.stderr)
                        cases.append(await asyncio.to_thread(sync_case, servers["A"].target, b, args))
                        print(f"watch off: {args.saves_without_watch} saves …", file=sys.stderr)
                        async with IntegrationsClient(b, cache_ttl=args.short_ttl, watch=False, timeout=5.0) as ttl:
                            case = Propagation("watch off", args.short_ttl, args.short_ttl + 2.0)
                            cases.append(
                                await propagation(a, ttl, case, TTL_ORG, args.saves_without_watch, args.short_ttl)
                            )
                        if args.streams:
                            case, fan = await measure_streams(args, servers, a, watched, work_dir)
                            cases.append(case)
                            fans.append(fan)
                    finally:
                        await watched.close()
            finally:
                for server in servers.values():
                    stop(server)
            if args.streams and args.baseline:
                fans.append(await measure_baseline(args, log_dir, work_dir))
    text = render(machine(args, pg_version, load_before), cases, fans)
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / "watch.md"
    path.write_text(text)
    print(text, end="")
    print(f"written to {path}", file=sys.stderr)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saves", type=int, default=200, help="saves through A per watched case (default 200)")
    parser.add_argument("--ttl", type=float, default=300.0, help="the watched client's cache TTL, s (default 300)")
    parser.add_argument(
        "--give-up", type=float, default=5.0, help="s to wait for a watched client to serve a save (default 5)"
    )
    parser.add_argument(
        "--saves-without-watch", type=int, default=10, help="saves for the client without a watch (default 10)"
    )
    parser.add_argument(
        "--short-ttl", type=float, default=1.0, help="cache TTL of the client without a watch, s (default 1)"
    )
    parser.add_argument("--streams", type=int, default=1000, help="idle watch streams opened on B (default 1000)")
    parser.add_argument(
        "--connections", type=int, default=1000, help="connections the idle streams share (default 1000: one each)"
    )
    parser.add_argument(
        "--streams-organization",
        default="",
        help="the idle streams watch only this organization, not the one saved (default: everything, so every "
        "save reaches every stream, as the Python client's own watch does)",
    )
    parser.add_argument(
        "--baseline-saves", type=int, default=50, help="changes fanned out by the baseline server (default 50)"
    )
    parser.add_argument(
        "--no-baseline",
        dest="baseline",
        action="store_false",
        help="skip the fan-out baseline (the same streams on bench/empty_server.py)",
    )
    parser.add_argument(
        "--b-workers", type=int, default=1, help="B runs `serve --workers N` (default 1: one process, like A)"
    )
    args = parser.parse_args()
    if (
        args.saves < 1
        or args.saves_without_watch < 1
        or args.baseline_saves < 2
        or args.ttl <= 0
        or args.short_ttl <= 0
        or args.streams < 0
    ):
        parser.error(
            "--saves and --saves-without-watch must be >= 1, --baseline-saves >= 2, the TTLs > 0, --streams >= 0"
        )
    if args.streams and not 1 <= args.connections <= args.streams:
        parser.error("1 <= --connections <= --streams")
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
