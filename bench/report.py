"""The benchmark's markdown report: the ratios first, then every measurement."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MODES = ("concurrent", "sequential")


@dataclass(frozen=True)
class Measurement:
    workload: str
    server: str
    phases: Mapping[str, Mapping[str, Any]]  # mode -> load.Stats as a dict
    cpu_us_per_call: float | None  # the server process's CPU time per call; None without one


@dataclass(frozen=True)
class Comparison:
    workload: str
    service: str
    baseline: str


def ratio(results: Mapping[tuple[str, str], Measurement], comparison: Comparison, mode: str) -> str:
    service = results[(comparison.workload, comparison.service)].phases[mode]["rps"]
    baseline = results[(comparison.workload, comparison.baseline)].phases[mode]["rps"]
    return f"{baseline / service:.1f}×" if service else "n/a"


def _ratio_table(results: Mapping[tuple[str, str], Measurement], comparisons: Sequence[Comparison],
                 concurrency: int) -> list[str]:
    lines = [
        f"| workload | service | baseline | {concurrency} in flight | 1 in flight |",
        "| --- | --- | --- | ---: | ---: |",
    ]
    for c in comparisons:
        cells = " | ".join(ratio(results, c, mode) for mode in MODES)
        lines.append(f"| {c.workload} | {c.service} | {c.baseline} | {cells} |")
    return lines


def _raw_table(results: Mapping[tuple[str, str], Measurement], concurrency: int) -> list[str]:
    lines = [
        "| workload | server | in flight | req/s | p50 ms | p99 ms | errors | server CPU µs/call |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m in results.values():
        cpu = f"{m.cpu_us_per_call:.0f}" if m.cpu_us_per_call is not None else "—"
        for mode in MODES:
            s = m.phases[mode]
            errors = f"{s['errors']} ({s['first_error']})" if s["errors"] else "0"
            in_flight = concurrency if mode == "concurrent" else 1
            lines.append(f"| {m.workload} | {m.server} | {in_flight} | {s['rps']:.0f} | {s['p50_ms']:.2f} | "
                         f"{s['p99_ms']:.2f} | {errors} | {cpu} |")
    return lines


def render(results: Mapping[tuple[str, str], Measurement], comparisons: Sequence[Comparison],
           machine: Mapping[str, str], concurrency: int) -> str:
    header = " · ".join(f"{key}: {value}" for key, value in machine.items())
    lines = [
        "# integrations-service benchmark",
        "",
        header,
        "",
        "## Ratios: baseline req/s ÷ service req/s (1.0× = the service costs nothing over its baseline)",
        "",
        *_ratio_table(results, comparisons, concurrency),
        "",
        "## Measurements",
        "",
        *_raw_table(results, concurrency),
        "",
        "server CPU µs/call: CPU time of the server process (user + system) over the whole load run "
        "(both phases and their warm-ups) divided by the calls it answered; PostgreSQL's own CPU is not in it.",
        "",
    ]
    return "\n".join(lines)
