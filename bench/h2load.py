"""h2load (nghttp2's C load generator) as the benchmark's main load generator.

A Python client needs about as much CPU per call as the grpc.aio server it drives, so on
2 cores it caps what the baseline can show. h2load does not. This module holds:

- pure functions (unit-tested): the gRPC frame of a request, h2load's command line, the
  parser of its summary and of its per-request log;
- `run`, which runs one h2load process and returns its parsed result.

gRPC over h2load: every request is a POST of the same body (a file given with `-d`: one
length-prefixed gRPC message) to `/<package.Service>/<Method>` with `content-type:
application/grpc` and `te: trailers`. h2load only sees HTTP statuses, and a gRPC error comes
with HTTP 200 too (its status is in the `grpc-status` trailer), so callers check the replies
another way: a real gRPC call before and after, the server's own RPC counters, and
`Result.data_bytes` (an error reply carries no message, so no DATA bytes).
"""

from __future__ import annotations

import asyncio
import math
import re
import shutil
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

INSTALL_HINT = "h2load is missing: install it with `apt-get install -y nghttp2-client` (Debian/Ubuntu)"
GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")
_FRAME_HEADER = struct.Struct(">BI")  # compressed flag, big-endian message length
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}  # to milliseconds


class H2loadError(RuntimeError):
    pass


def grpc_frame(message: bytes) -> bytes:
    """One uncompressed gRPC length-prefixed message: flag 0, 4-byte big-endian length, the bytes."""
    return _FRAME_HEADER.pack(0, len(message)) + message


def grpc_url(target: str, service: str, method: str) -> str:
    return f"http://{target}/{service}/{method}"


def executable() -> str:
    """The h2load on PATH; H2loadError naming the package to install when there is none."""
    path = shutil.which("h2load")
    if path is None:
        raise H2loadError(INSTALL_HINT)
    return path


@dataclass(frozen=True)
class Load:
    """One h2load run: `clients` connections, `streams` requests in flight on each.

    It sends `requests` requests and waits for every answer (nothing is cancelled at the end), or,
    with `requests` 0, runs for `seconds` and drops what is in flight then. Either way the run is
    killed `seconds` + a margin after it started.
    """

    url: str
    clients: int
    streams: int
    seconds: float
    body: Path | None = None  # POSTed when set (gRPC); GET otherwise
    headers: Sequence[str] = ()
    http1: bool = False  # --h1: for servers without h2c (cleartext HTTP/2)
    requests: int = 0

    @property
    def in_flight(self) -> int:
        return self.clients * self.streams


def command(load: Load, log_file: Path, binary: str = "h2load") -> list[str]:
    """The h2load command line: count- (-n) or time-bounded (-D), one thread, per-request log in `log_file`."""
    bound = ["--requests", str(load.requests)] if load.requests else ["--duration", f"{round(load.seconds * 1000)}ms"]
    argv = [
        binary,
        "--clients",
        str(load.clients),
        "--max-concurrent-streams",
        str(load.streams),
        "--threads",
        "1",
        *bound,
        "--log-file",
        str(log_file),
    ]
    if load.body is not None:
        argv += ["--data", str(load.body)]
    for header in load.headers:
        argv += ["--header", header]
    if load.http1:
        argv.append("--h1")
    return [*argv, load.url]


@dataclass
class Result:
    """h2load's summary, plus latency percentiles from its per-request log."""

    seconds: float = 0.0
    rps: float = 0.0
    total: int = 0
    done: int = 0
    succeeded: int = 0
    failed: int = 0
    errored: int = 0
    timeout: int = 0
    status: dict[str, int] = field(default_factory=dict)  # "2xx" -> count
    data_bytes: int = 0
    mean_ms: float = 0.0
    max_ms: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0

    @property
    def errors(self) -> int:
        """Requests that did not end in HTTP 2xx (failed, errored or timed out included)."""
        return self.total - self.status.get("2xx", 0)


def _milliseconds(text: str) -> float:
    match = re.fullmatch(r"([0-9.]+)(us|ms|s)", text)
    if match is None:
        raise H2loadError(f"unexpected duration in h2load output: {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_summary(text: str) -> Result:
    """The numbers of h2load's closing summary (stdout); H2loadError if it has none."""
    result = Result()
    finished = re.search(r"^finished in ([0-9.]+(?:us|ms|s)), ([0-9.]+) req/s", text, re.M)
    requests = re.search(
        r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
        r"(\d+) failed, (\d+) errored, (\d+) timeout",
        text,
        re.M,
    )
    if finished is None or requests is None:
        raise H2loadError("h2load printed no summary")
    result.seconds = _milliseconds(finished.group(1)) / 1e3
    result.rps = float(finished.group(2))
    (result.total, _, result.done, result.succeeded, result.failed, result.errored, result.timeout) = (
        int(n) for n in requests.groups()
    )
    status = re.search(r"^status codes: (.*)$", text, re.M)
    if status:
        result.status = {kind: int(count) for count, kind in re.findall(r"(\d+) (\dxx)", status.group(1))}
    data = re.search(r"^traffic: .*\((\d+)\) data", text, re.M)
    if data:
        result.data_bytes = int(data.group(1))
    timing = re.search(r"^time for request:\s+(\S+)\s+(\S+)\s+(\S+)", text, re.M)
    if timing:
        result.max_ms, result.mean_ms = _milliseconds(timing.group(2)), _milliseconds(timing.group(3))
    return result


def parse_log(text: str) -> list[float]:
    """Latencies in ms, ascending, of the requests in h2load's --log-file (start µs, status, duration µs)."""
    latencies = []
    for line in text.splitlines():
        columns = line.split("\t")
        if len(columns) >= 3 and columns[2].strip().isdigit():
            latencies.append(int(columns[2]) / 1e3)
    return sorted(latencies)


def percentile(ascending: Sequence[float], q: float) -> float:
    """Nearest-rank percentile; 0 when empty."""
    if not ascending:
        return 0.0
    return ascending[max(1, math.ceil(q * len(ascending))) - 1]


def with_percentiles(result: Result, latencies: Sequence[float]) -> Result:
    """Mean and percentiles from every logged request (the summary's timings may be sampled)."""
    if latencies:
        result.mean_ms = sum(latencies) / len(latencies)
    result.p50_ms = percentile(latencies, 0.50)
    result.p99_ms = percentile(latencies, 0.99)
    return result


def combine(results: Sequence[Result], latencies: Sequence[float]) -> Result:
    """Several h2load processes run side by side as one load: counts and rates add up."""
    total = Result(seconds=max((r.seconds for r in results), default=0.0))
    for r in results:
        total.rps += r.rps
        for name in ("total", "done", "succeeded", "failed", "errored", "timeout", "data_bytes"):
            setattr(total, name, getattr(total, name) + getattr(r, name))
        for kind, count in r.status.items():
            total.status[kind] = total.status.get(kind, 0) + count
        total.max_ms = max(total.max_ms, r.max_ms)
    if total.done:
        total.mean_ms = sum(r.mean_ms * r.done for r in results) / total.done
    return with_percentiles(total, sorted(latencies))


async def run(load: Load, work_dir: Path, name: str, timeout_margin: float = 30.0) -> Result:
    """Run h2load once; `work_dir/<name>.tsv` keeps its per-request log."""
    log_file = work_dir / f"{name}.tsv"
    log_file.unlink(missing_ok=True)  # h2load appends to an existing log
    process = await asyncio.create_subprocess_exec(
        *command(load, log_file, executable()),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        stdout, _ = await asyncio.wait_for(process.communicate(), load.seconds + timeout_margin)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise H2loadError(f"h2load did not finish within {load.seconds + timeout_margin:g} s") from None
    text = stdout.decode(errors="replace")
    if process.returncode != 0:
        raise H2loadError(f"h2load exited with {process.returncode}: {text[-500:]}")
    latencies = parse_log(log_file.read_text()) if log_file.exists() else []
    return with_percentiles(parse_summary(text), latencies)


async def run_parallel(loads: Sequence[Load], work_dir: Path, name: str) -> Result:
    """Several h2load processes at once (e.g. one per request body), combined into one result."""
    results = await asyncio.gather(*(run(load, work_dir, f"{name}-{i}") for i, load in enumerate(loads)))
    latencies: list[float] = []
    for i in range(len(loads)):
        latencies += parse_log((work_dir / f"{name}-{i}.tsv").read_text())
    return combine(results, latencies)
