"""`serve --workers N`: the supervisor's view of its workers' multiprocess metric files, over their deaths."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from prometheus_client.mmap_dict import MmapedDict, mmap_key

from integrations_service.supervisor import MetricsFiles

RPCS = "integrations_rpc_requests"
LATENCY = "integrations_store_operation_duration_seconds"
FEED = "integrations_change_feed_connected"


def write(path: Path, kind: str, pid: int, samples: dict[tuple[str, str, str], float]) -> None:
    """One worker's file of `kind` (counter, histogram, gauge_livemostrecent): (metric, sample, label) → value."""
    values: Any = MmapedDict(str(path / f"{kind}_{pid}.db"))  # type: ignore[no-untyped-call]
    try:
        for (metric, sample, label), value in samples.items():
            labels, label_values = (["le"], [label]) if sample.endswith("_bucket") else (["worker"], [label])
            if sample.endswith(("_sum", "_count")) or metric == RPCS:
                labels, label_values = [], []
            # A gauge's time: its `mostrecent` mode keeps the newest value of each series.
            values.write_value(mmap_key(metric, sample, labels, label_values, "help"), value, time.time())
    finally:
        values.close()


def worker(path: Path, pid: int, calls: float, index: str) -> None:
    write(path, "counter", pid, {(RPCS, f"{RPCS}_total", ""): calls})
    # As prometheus_client writes a histogram: each bucket its own observations, no _count (the scrape adds up).
    write(
        path,
        "histogram",
        pid,
        {
            (LATENCY, f"{LATENCY}_bucket", "0.1"): calls,
            (LATENCY, f"{LATENCY}_bucket", "+Inf"): 0.0,
            (LATENCY, f"{LATENCY}_sum", ""): calls / 100,
        },
    )
    write(path, "gauge_livemostrecent", pid, {(FEED, FEED, index): 1.0})


def scraped(files: MetricsFiles) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in files.collect()
        for sample in family.samples
    }


def test_a_dead_workers_counts_stay_in_the_sums_but_its_files_and_gauges_go(tmp_path: Path) -> None:
    files = MetricsFiles(str(tmp_path))
    worker(tmp_path, 101, calls=3, index="0")
    worker(tmp_path, 102, calls=5, index="1")
    before = scraped(files)
    assert before[(f"{RPCS}_total", ())] == 8

    files.forget(101)  # worker 0 died: its replacement is pid 103
    meanwhile = scraped(files)
    assert meanwhile[(f"{RPCS}_total", ())] == 8, "its counts stay"
    assert (FEED, (("worker", "0"),)) not in meanwhile, "its gauges do not linger as if it were alive"
    assert meanwhile[(FEED, (("worker", "1"),))] == 1
    worker(tmp_path, 103, calls=2, index="0")
    after = scraped(files)
    assert after[(f"{RPCS}_total", ())] == 10
    assert after[(f"{LATENCY}_count", ())] == 10
    assert after[(f"{LATENCY}_bucket", (("le", "+Inf"),))] == 10
    assert after[(f"{LATENCY}_sum", ())] == 0.1
    assert after[(f"{LATENCY}_bucket", (("le", "0.1"),))] == 10
    assert after[(FEED, (("worker", "0"),))] == 1  # the replacement's, not the dead one's too
    assert not [name for name in os.listdir(tmp_path) if "_101." in name], "the dead worker's files are gone"

    # Many deaths later, still one archived file per type, and every count in the sums.
    for pid in range(103, 120):
        files.forget(pid)
        worker(tmp_path, pid + 1, calls=1, index="0")
    assert scraped(files)[(f"{RPCS}_total", ())] == 3 + 5 + 2 + 17
    assert sorted(os.listdir(tmp_path)) == [
        "counter_102.db",
        "counter_120.db",
        "counter_archived.db",
        "gauge_livemostrecent_102.db",
        "gauge_livemostrecent_120.db",
        "histogram_102.db",
        "histogram_120.db",
        "histogram_archived.db",
    ]


def test_a_worker_that_died_before_counting_anything_is_forgotten_too(tmp_path: Path) -> None:
    files = MetricsFiles(str(tmp_path))
    files.forget(999)
    assert scraped(files) == {}
    assert os.listdir(tmp_path) == []
