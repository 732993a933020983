"""The benchmark's markdown report: the ratios against the baselines first, then every row."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

CONCURRENT, SEQUENTIAL = "concurrent", "sequential"
MODES = (CONCURRENT, SEQUENTIAL)

Key = tuple[str, str, str]  # (workload, server, load generator)


@dataclass(frozen=True)
class Measurement:
    workload: str
    server: str
    tool: str  # the load generator: h2load or python
    phases: Mapping[str, Mapping[str, Any]]  # mode -> rps, mean_ms, p50_ms, p99_ms, errors, first_error
    cpu_us_per_call: float | None  # the server process's CPU time per call; None without one
    note: str = ""  # checks made, or why the row has no numbers

    @property
    def available(self) -> bool:
        return bool(self.phases)


def median_round(rounds: Sequence[Measurement]) -> Measurement:
    """Of one row's rounds, the one with the median calls per second at full concurrency (the lower middle
    of an even count): a real measurement, with its own latency and CPU, that one noisy round cannot move."""
    measured = [m for m in rounds if m.available and m.phases.get(CONCURRENT, {}).get("rps") is not None]
    if not measured:
        return rounds[0]
    ordered = sorted(measured, key=lambda m: float(m.phases[CONCURRENT]["rps"]))
    return ordered[(len(ordered) - 1) // 2]


@dataclass(frozen=True)
class Comparison:
    service: Key
    baseline: Key
    target: str = ""  # the target for this pair, as text


def _phase(results: Mapping[Key, Measurement], key: Key, mode: str) -> Mapping[str, Any] | None:
    measurement = results.get(key)
    return measurement.phases.get(mode) if measurement is not None else None


def throughput_ratio(results: Mapping[Key, Measurement], comparison: Comparison) -> str:
    """Service req/s ÷ baseline req/s with `concurrency` in flight (1.0 = as fast as the baseline)."""
    service = _phase(results, comparison.service, CONCURRENT)
    baseline = _phase(results, comparison.baseline, CONCURRENT)
    if not service or not baseline or not baseline["rps"]:
        return "n/a"
    return f"{service['rps'] / baseline['rps']:.2f}"


def latency_ratio(results: Mapping[Key, Measurement], comparison: Comparison) -> str:
    """Service mean latency ÷ baseline mean latency, one call in flight (1.0× = as fast)."""
    service = _phase(results, comparison.service, SEQUENTIAL)
    baseline = _phase(results, comparison.baseline, SEQUENTIAL)
    if not service or not baseline or not baseline["mean_ms"] or not service["mean_ms"]:
        return "n/a"
    return f"{service['mean_ms'] / baseline['mean_ms']:.2f}×"


def _cpu(measurement: Measurement | None) -> str:
    if measurement is None or measurement.cpu_us_per_call is None:
        return "—"
    return f"{measurement.cpu_us_per_call:.0f}"


def _label(key: Key) -> str:
    return f"{key[0]} · {key[1]} ({key[2]})"


def _ratio_table(results: Mapping[Key, Measurement], comparisons: Sequence[Comparison], concurrency: int) -> list[str]:
    lines = [
        f"| service row | baseline row | req/s ratio, {concurrency} in flight | mean latency ratio, 1 in flight "
        "| server CPU µs/call (service / baseline) | target |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for c in comparisons:
        cpu = f"{_cpu(results.get(c.service))} / {_cpu(results.get(c.baseline))}"
        lines.append(
            f"| {_label(c.service)} | {_label(c.baseline)} | {throughput_ratio(results, c)} | "
            f"{latency_ratio(results, c)} | {cpu} | {c.target} |"
        )
    return lines


def _errors(phase: Mapping[str, Any]) -> str:
    if not phase["errors"]:
        return "0"
    return f"{phase['errors']} ({phase['first_error']})" if phase.get("first_error") else str(phase["errors"])


def _row_table(results: Mapping[Key, Measurement], concurrency: int) -> list[str]:
    lines = [
        f"| workload | server | load | req/s, {concurrency} in flight | p50 / p99 ms, {concurrency} in flight "
        "| mean ms, 1 in flight | p99 ms, 1 in flight | errors | server CPU µs/call | checks |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for m in results.values():
        if not m.available:
            lines.append(f"| {m.workload} | {m.server} | {m.tool} | — | — | — | — | — | — | {m.note} |")
            continue
        busy, alone = m.phases[CONCURRENT], m.phases[SEQUENTIAL]
        errors = " / ".join(_errors(phase) for phase in (busy, alone))
        lines.append(
            f"| {m.workload} | {m.server} | {m.tool} | {busy['rps']:.0f} | {busy['p50_ms']:.2f} / "
            f"{busy['p99_ms']:.2f} | {alone['mean_ms']:.3f} | {alone['p99_ms']:.2f} | {errors} | {_cpu(m)} | "
            f"{m.note} |"
        )
    return lines


def render(
    results: Mapping[Key, Measurement], comparisons: Sequence[Comparison], machine: Mapping[str, str], concurrency: int
) -> str:
    header = " · ".join(f"{key}: {value}" for key, value in machine.items())
    lines = [
        "# integrations-service benchmark",
        "",
        header,
        "",
        "## Ratios: service ÷ baseline, in the same run",
        "",
        "req/s ratio: 1.00 = as many calls per second as the baseline, higher is better. "
        "Latency ratio: 1.00× = as fast as the baseline one call at a time, lower is better.",
        "",
        *_ratio_table(results, comparisons, concurrency),
        "",
        "## Measurements",
        "",
        *_row_table(results, concurrency),
        "",
        "errors: in the 64-in-flight / the 1-in-flight phase, calls that did not end in HTTP 2xx (h2load) or "
        "raised (python). A gRPC error is an HTTP 200 too, so for h2load rows the checks column has what the "
        "server itself counted: one real gRPC call before and after the row, and the calls its "
        "`integrations_rpc_requests_total` counted with a code other than OK over the whole row (warm-ups "
        "included). server CPU µs/call: CPU time (user + system, all threads) of the server process "
        "over the whole row (both phases and their warm-ups) divided by the calls answered; PostgreSQL's own "
        "CPU is not in it.",
        "",
    ]
    return "\n".join(lines)
