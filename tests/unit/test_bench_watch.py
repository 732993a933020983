"""bench/watch.py's pure parts: the percentiles, the fan-out delays from the streams' arrivals, the report."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def watch() -> ModuleType:
    # bench/watch.py imports its siblings (run, servers) as top-level modules, as when it is run as a script.
    sys.path.insert(0, str(BENCH_DIR))
    try:
        return importlib.import_module("watch")
    finally:
        sys.path.remove(str(BENCH_DIR))


def test_p99_is_the_nearest_rank(watch: ModuleType) -> None:
    values = [float(v) for v in range(200, 0, -1)]
    assert watch.nearest_rank(values, 0.99) == 198.0
    assert watch.summary(values) == "100.5 / 198.0 / 200.0"
    assert watch.summary([]) == "—"


def test_fan_out_counts_every_stream_and_save_and_times_the_last_stream_only_when_all_had_it(
    watch: ModuleType,
) -> None:
    fan = watch.FanOut(streams=3, connections=1, live=3)
    acked = {"etag-1": 10.0, "etag-2": 20.0}
    arrivals = {"etag-1": [10.001, 10.004, 10.002], "etag-2": [20.010, 20.030], "unrelated": [5.0]}
    watch.fan_out_delays(fan, arrivals, acked)
    assert fan.expected == 6
    assert fan.received == 5  # one stream never got etag-2
    assert sorted(round(ms, 3) for ms in fan.pairs_ms) == [1.0, 2.0, 4.0, 10.0, 30.0]
    assert [round(ms, 3) for ms in fan.last_ms] == [4.0]  # etag-2 never reached the third stream


def test_streams_scoped_elsewhere_expect_nothing(watch: ModuleType) -> None:
    fan = watch.FanOut(streams=2, connections=1, live=2)
    watch.fan_out_delays(fan, {}, {"etag-1": 1.0}, in_scope=False)
    assert (fan.expected, fan.received) == (0, 0)


def test_the_report_flags_unserved_saves_a_missed_target_and_lost_events(watch: ModuleType) -> None:
    on = watch.Propagation("watch on, B idle", ttl=300.0, bound=5.0, served_ms=[4.0, None], watching=True)
    on.event_ms = [1.0]
    on.reads = [1, 2]
    off = watch.Propagation("watch off", ttl=1.0, bound=3.0, served_ms=[400.0, 900.0])
    off.reads = [1, 1]
    fan = watch.FanOut(streams=2, connections=2, ends=True, live=2, expected=4, received=3, gauge_open=3)
    fan.closed, fan.gauge_after_close, fan.sigterm_exit_s, fan.end_codes = 1, 2, 1.5, {"UNAVAILABLE": 1}
    fan.server_cpu_ms_per_save = 0.4
    baseline = watch.FanOut(streams=2, connections=2, server="empty handler", live=2, expected=4, received=4)
    baseline.server_cpu_ms_per_save = 0.1
    text = watch.render({"date": "today"}, [on, off], [fan, baseline])
    assert "| watch on, B idle | 300 s | 2 | 4.0 / 4.0 / 4.0 | **1 of 2 (5 s)** |" in text
    assert "p99 ≤ 100 ms: **not met**" in text  # a save never served misses the target whatever the p99
    assert "**B: 1 stream × save events never arrived.**" in text
    assert "empty handler: " not in text  # the baseline lost nothing
    assert "B spends 4.0× the baseline's CPU per change" in text
    assert "| 0.4 ms (200 µs) |" in text
    assert 'B exited after 1.50 s; the streams ended with {"UNAVAILABLE": 1}' in text
