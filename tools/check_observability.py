"""`make lint`'s check of the operator kit against a real scrape of the service.

Starts `integrations-service serve` (embedded store, a development key, both
ports free ones on 127.0.0.1, in a temporary folder), makes a few calls, reads
/metrics and then runs:

- `promtool check metrics` on the scrape (names, suffixes, units, HELP);
- `promtool check rules` on deploy/prometheus/alerts.yml, and `promtool test rules`
  on its unit tests, deploy/prometheus/alerts.test.yml;
- `promtool check rules` on every dashboard query of deploy/grafana, written
  as recording rules (Grafana's `$__rate_interval` and the like as 5m), so a
  PromQL syntax error in a panel fails too.

`--scrape-only` prints the scrape and stops (the tests use it). Needs promtool
on PATH (Debian package `prometheus`; `.ci/run` installs it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from integrations.v1 import integrations_pb2 as pb
from integrations.v1 import integrations_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yml"
DASHBOARDS = ROOT / "deploy" / "grafana"
SERVICE = Path(sys.executable).parent / "integrations-service"
GRAFANA_VARIABLE = re.compile(r"\$(__rate_interval|__interval|__range|\{__rate_interval\}|\{__interval\})")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_serving(channel: grpc.Channel, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"integrations-service exited with {process.returncode} before serving")
        try:
            if check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            time.sleep(0.1)
    raise SystemExit("integrations-service did not answer SERVING in time")


def _exercise(channel: grpc.Channel) -> None:
    """A save, reads, a refused call: each metric family gets samples."""
    stub = pb_grpc.IntegrationServiceStub(channel)
    org = "org_metrics_check"
    stub.ListProviders(pb.ListProvidersRequest(organization_id=org), timeout=10)
    values = {"secretKey": "sk_test_51MetricsCheck000000000042", "publishableKey": "pk_test_51MetricsCheck"}
    stub.SaveIntegration(pb.SaveIntegrationRequest(organization_id=org, provider="stripe", values=values), timeout=10)
    stub.GetProviderConfig(pb.GetProviderConfigRequest(organization_id=org, provider="stripe"), timeout=10)
    try:
        stub.GetProviderConfig(pb.GetProviderConfigRequest(organization_id=org, provider="no-such"), timeout=10)
    except grpc.RpcError:
        pass  # NOT_FOUND / INVALID_ARGUMENT: wanted, for grpc_code
    else:
        raise SystemExit("an unknown provider was answered OK")


def scrape() -> str:
    """The /metrics text of a real service after a few calls."""
    with tempfile.TemporaryDirectory() as folder:
        grpc_port, metrics_port = _free_port(), _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("INTEGRATION") and k != "DATABASE_URL"}
        env |= {
            "INTEGRATIONS_DATA_DIR": folder,
            "INTEGRATIONS_LISTEN_ADDRESS": f"127.0.0.1:{grpc_port}",
            "INTEGRATIONS_METRICS_ADDRESS": f"127.0.0.1:{metrics_port}",
        }
        with open(Path(folder) / "serve.log", "wb") as log:
            process = subprocess.Popen(  # noqa: S603 (our own console script)
                [str(SERVICE), "serve"], cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
            try:
                with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                    _wait_serving(channel, process)
                    _exercise(channel)
                url = f"http://127.0.0.1:{metrics_port}/metrics"
                with urllib.request.urlopen(url, timeout=10) as reply:
                    return str(reply.read().decode())
            finally:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panels(panel)  # rows keep their panels inside


def _concrete(expr: str, dashboard: dict[str, Any]) -> str:
    """The query as Grafana sends it: intervals as 5m, each template variable as its default value."""
    expr = GRAFANA_VARIABLE.sub("5m", expr)
    for variable in dashboard.get("templating", {}).get("list", []):
        value = variable.get("current", {}).get("value", "")
        if value == "$__all":
            value = variable.get("allValue", ".*")
        name, value = variable["name"], str(value)
        expr = re.sub(rf"\${re.escape(name)}\b", value.replace("\\", "\\\\"), expr.replace(f"${{{name}}}", value))
    return expr


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every dashboard target, as Grafana would send it by default."""
    queries = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        dashboard = json.loads(path.read_text())
        for panel in panels(dashboard):
            for target in panel.get("targets", []):
                if expr := target.get("expr"):
                    queries.append((f"{path.name}: {panel['title']}", _concrete(expr, dashboard)))
    return queries


def _promtool(promtool: str, *args: str, stdin: str | None = None) -> None:
    result = subprocess.run([promtool, *args], input=stdin, capture_output=True, text=True, check=False)  # noqa: S603
    print(f"promtool {' '.join(args)}: {'ok' if result.returncode == 0 else 'FAILED'}")
    if result.returncode != 0:
        raise SystemExit(result.stdout + result.stderr)


def check() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        raise SystemExit("promtool not found: apt-get install prometheus (Debian), or see .ci/run")
    _promtool(promtool, "check", "metrics", stdin=scrape())
    _promtool(promtool, "check", "rules", str(ALERTS))
    _promtool(promtool, "test", "rules", str(ALERT_TESTS))
    rules = [{"record": f"dashboard:query:{n}", "expr": expr} for n, (_, expr) in enumerate(dashboard_queries())]
    with tempfile.NamedTemporaryFile("w", suffix=".yml") as file:
        # JSON is YAML: no YAML library needed to write the rules file.
        json.dump({"groups": [{"name": "dashboard-queries", "rules": rules}]}, file)
        file.flush()
        _promtool(promtool, "check", "rules", file.name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scrape-only", action="store_true", help="print a real scrape and stop")
    if parser.parse_args().scrape_only:
        sys.stdout.write(scrape())
    else:
        check()
    return 0


if __name__ == "__main__":
    sys.exit(main())
