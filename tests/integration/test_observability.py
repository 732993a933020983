"""Every metric an alert or a dashboard panel queries exists in a real scrape of the service, with those labels.

The scrape comes from `tools/check_observability.py --scrape-only` (what
`make lint` runs promtool on): a real `integrations-service serve` after a
few calls. A misspelt metric or label in deploy/ would otherwise show up only
as an alert that never fires or an empty panel.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from types import ModuleType

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "check_observability.py"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
# Not in a scrape of a fresh embedded-store service, for a stated reason.
ABSENT_FOR_A_REASON = {
    "up": "Prometheus makes it for every target",
    "integrations_store_pool_connections": "PostgreSQL only (tests/integration/test_metrics.py checks it there)",
}
PROMETHEUS_LABELS = {"job", "instance"}
PROMQL_WORDS = {
    "and",
    "or",
    "unless",
    "offset",
    "bool",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_SELECTOR = re.compile(r"(?<![\w:.])([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}")


def load_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_observability", TOOL)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, keywords, labels or numbers)."""
    bare = _STRING.sub('""', expr)
    bare = re.sub(r"\{[^}]*\}", " ", bare)
    bare = re.sub(r"\[[^\]]*\]", " ", bare)
    bare = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", bare)
    names = re.findall(r"(?<![\w:.])([a-zA-Z_:][\w:]*)\b(?!\s*\()", bare)
    return {name for name in names if name.lower() not in PROMQL_WORDS}


def matcher_labels(expr: str) -> dict[str, set[str]]:
    """Label names each selector matches on, by metric name."""
    labels: dict[str, set[str]] = defaultdict(set)
    for name, matchers in _SELECTOR.findall(_STRING.sub('""', expr)):
        labels[name] |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
    return labels


class Scrape:
    def __init__(self, text: str) -> None:
        self.names: set[str] = set()
        self.labels: dict[str, set[str]] = defaultdict(set)
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split()
                self.names.add(name)
                if kind in ("histogram", "summary"):
                    self.names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            elif line and not line.startswith("#"):
                name, _, rest = line.partition("{")
                self.names.add(name.split()[0])
                self.labels[name.split()[0]] |= set(re.findall(r'(\w+)="', rest))


def expressions() -> list[tuple[str, str]]:
    rules = [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]
    return [(f"alert {rule['alert']}", rule["expr"]) for rule in rules] + load_tool().dashboard_queries()


@pytest.fixture(scope="module")
def scrape() -> Scrape:
    result = subprocess.run(
        [sys.executable, str(TOOL), "--scrape-only"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    return Scrape(result.stdout)


def test_the_expression_parser_finds_names_and_only_names() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, grpc_method) (rate(grpc_server_handling_seconds_bucket"
        '{job=~"a|b",grpc_code!="OK"}[5m]))) / on (job) group_left max(integrations_key_encryptions) '
        '/ 4294967296 > 0.5 and absent(up{job="x"}) or vector(1) unless foo offset 10m'
    )
    assert metric_names(expr) == {"grpc_server_handling_seconds_bucket", "integrations_key_encryptions", "up", "foo"}
    assert matcher_labels(expr)["grpc_server_handling_seconds_bucket"] == {"job", "grpc_code"}


def test_alerts_and_dashboards_query_something(scrape: Scrape) -> None:
    used = {name for _, expr in expressions() for name in metric_names(expr)}
    # The families the issue names: gRPC traffic, store, audit, key wear, legacy reads.
    assert {
        "grpc_server_handled_total",
        "grpc_server_handling_seconds_bucket",
        "integrations_store_operation_duration_seconds_bucket",
        "integrations_store_unavailable_total",
        "integrations_audit_buffered_records",
        "integrations_audit_dropped_records",
        "integrations_key_encryptions",
        "integrations_legacy_values_read_total",
        "up",
    } <= used
    assert "grpc_server_handling_seconds_bucket" in scrape.names


def test_every_metric_queried_exists_in_a_real_scrape(scrape: Scrape) -> None:
    missing = sorted(
        f"{where}: {name}"
        for where, expr in expressions()
        for name in metric_names(expr)
        if name not in scrape.names and name not in ABSENT_FOR_A_REASON
    )
    assert not missing, "queried but not exported:\n" + "\n".join(missing)


def test_every_label_matched_on_exists_on_its_metric(scrape: Scrape) -> None:
    wrong = sorted(
        f"{where}: {name}{{{label}}}"
        for where, expr in expressions()
        for name, labels in matcher_labels(expr).items()
        if scrape.labels.get(name)  # families with samples in the scrape; the others have no labels to compare
        for label in labels - PROMETHEUS_LABELS - scrape.labels[name]
    )
    assert not wrong, "matched on labels the metric does not have:\n" + "\n".join(wrong)


def test_a_misspelt_metric_would_be_caught(scrape: Scrape) -> None:
    assert "grpc_server_handeld_total" not in scrape.names
    assert metric_names('sum(rate(grpc_server_handeld_total{job="x"}[5m]))') == {"grpc_server_handeld_total"}
    assert "grpc_mehtod" not in scrape.labels["grpc_server_handled_total"]
    assert {"grpc_method", "grpc_code", "grpc_service", "grpc_type"} <= scrape.labels["grpc_server_handled_total"]


def test_dashboard_panels_are_laid_out_and_use_the_data_source_variable() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "integrations-service.json").read_text())
    tool = load_tool()
    panels = list(tool.panels(dashboard))
    assert len({p["id"] for p in panels}) == len(panels), "panel ids are unique"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"], panel["title"]
            assert panel["description"], panel["title"]
    titles = {p["title"] for p in panels}
    assert {
        "Requests by method",
        "Errors by code",
        "Latency percentiles",
        "Store latency p99 by operation",
        "Store outages",
        "Audit records buffered",
        "Audit records dropped",
        "Key usage against the nonce budget",
        "Legacy values read",
    } <= titles
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["job"]["current"]["value"] == "integrations-service"  # the alerts' job
