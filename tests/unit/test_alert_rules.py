"""deploy/prometheus/alerts.yml does what docs/operations.md says: its unit tests pass, and it watches what the docs
tell operators to alert on. (That every metric and label the alerts query exists: test_observability.py.)"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yml"
OPERATIONS = (ROOT / "docs" / "operations.md").read_text()


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is not installed (Debian package prometheus, see .ci/run)", pytrace=False)
        pytest.skip("promtool is not installed (Debian package prometheus)")
    return found


def rules() -> list[dict[str, str]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def test_promtool_unit_tests_of_the_alerts_pass() -> None:
    result = subprocess.run(
        [promtool(), "test", "rules", str(ALERT_TESTS)], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_the_unit_tests_name_exists() -> None:
    tested = set(re.findall(r"alertname: (\w+)", ALERT_TESTS.read_text()))
    assert tested <= {rule["alert"] for rule in rules()}
    assert len(tested) >= 5  # the pattern still finds them


def test_what_the_docs_say_to_alert_on_has_an_alert() -> None:
    """The metrics table's "Alert on any increase" rows: an alert queries each of those metrics."""
    told = re.findall(r"^\| `(\w+)` \|[^|\n]*\|[^|\n]*Alert on any increase", OPERATIONS, re.M)
    assert told, "docs/operations.md no longer tells operators to alert on a metric: drop or fix this test"
    queried = " ".join(rule["expr"] for rule in rules())
    missing = [name for name in told if not re.search(rf"\b{name}\b", queried)]
    assert not missing, f"docs/operations.md says to alert on these, alerts.yml does not: {missing}"
