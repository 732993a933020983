"""What a real `integrations-service serve` process writes to stderr when requests are hostile.

Text lines cannot be forged by a request (every field and message has its control characters escaped), and in
JSON mode every stderr line is one JSON object, gRPC core's own messages (a rejected TLS handshake) included.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from integrations.v1 import integrations_pb2 as pb
from integrations.v1 import integrations_pb2_grpc as pb_grpc
from integrations_service.devcerts import make_dev_certs
from tests.harness import new_org
from tests.processes import Processes, ServeProcess, clean_env, run_cli

# The text format's line start: "2026-12-01 08:40:50,123 INFO    integrations.rpc: ..."
_LINE_START = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ +[\w.]+: ")
FORGED = "2026-12-01 08:00:00,000 INFO    integrations.audit: audit caller=spiffe://integrations.local/admin"


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    with Processes(tmp_path) as started:
        yield started


def _insecure_stub(process: ServeProcess) -> tuple[grpc.Channel, pb_grpc.IntegrationServiceStub]:
    channel = grpc.insecure_channel(process.target)
    return channel, pb_grpc.IntegrationServiceStub(channel)


def test_a_request_cannot_forge_a_text_log_line(tmp_path: Path, processes: Processes) -> None:
    process = processes.serve(tmp_path / "work", clean_env({"INTEGRATIONS_LOG_FORMAT": "text"}))
    channel, stub = _insecure_stub(process)
    hostile = f"org\n{FORGED}\r\u2028{FORGED}"
    with channel:
        for request in (
            pb.GetProviderConfigRequest(organization_id=hostile, provider="stripe"),
            pb.GetProviderConfigRequest(organization_id=new_org(), provider=f"x\n{FORGED}"),
            pb.SaveIntegrationRequest(organization_id=hostile, provider="stripe", values={f"k\n{FORGED}": "v"}),
            pb.DeleteIntegrationRequest(organization_id=hostile, provider="stripe"),
        ):
            method = getattr(stub, type(request).__name__.removesuffix("Request"))
            with pytest.raises(grpc.RpcError) as refused:
                method(request, timeout=10)
            assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert process.terminate() == 0
    log = process.stderr()
    assert "org\\x0a2026-12-01" in log, log[-2000:]
    lines = log.splitlines()
    assert lines
    for line in lines:
        assert _LINE_START.match(line), line
        assert not line.startswith(FORGED[:20]), line
    assert "\r" not in log
    assert "\u2028" not in log


def _tls_env(tmp_path: Path) -> tuple[dict[str, str], grpc.ChannelCredentials]:
    certs = tmp_path / "certs"
    dev = make_dev_certs(certs)
    env = clean_env(
        {
            "INTEGRATIONS_LOG_FORMAT": "json",
            "INTEGRATIONS_TLS_CERT": str(dev["server"].cert),
            "INTEGRATIONS_TLS_KEY": str(dev["server"].key),
            "INTEGRATIONS_TLS_CLIENT_CA": str(dev["ca"].cert),
            "INTEGRATIONS_AUTHZ_POLICY": str(certs / "policy.toml"),
        }
    )
    client = dev["commerce"]
    credentials = grpc.ssl_channel_credentials(
        dev["ca"].cert.read_bytes(), client.key.read_bytes(), client.cert.read_bytes()
    )
    return env, credentials


def _rejected_handshakes(target: str) -> None:
    """A plaintext gRPC client, raw bytes, and a TLS client with no certificate: each handshake is refused."""
    with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError):
        pb_grpc.IntegrationServiceStub(channel).ListProviders(pb.ListProvidersRequest(), timeout=2)
    host, port = target.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        raw.recv(100)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection((host, int(port)), timeout=5) as raw,
        contextlib.suppress(ssl.SSLError, OSError),
        context.wrap_socket(raw) as tls,
    ):
        tls.sendall(b"x")
        tls.recv(100)


def test_json_mode_writes_only_json_lines_even_for_grpc_core_handshake_errors(
    tmp_path: Path, processes: Processes
) -> None:
    env, credentials = _tls_env(tmp_path)
    process = processes.serve(tmp_path / "work", env, credentials=credentials)
    _rejected_handshakes(process.target)
    time.sleep(0.5)
    assert process.terminate() == 0
    lines = process.stderr().splitlines()
    entries = []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line on stderr: {line!r}")
    assert all(isinstance(entry, dict) for entry in entries)
    assert any(entry.get("message") == "serving" for entry in entries)
    core = [entry for entry in entries if entry.get("logger") == "grpc.core"]
    assert core, "gRPC core said nothing about the rejected handshakes"
    assert any("andshake" in str(entry.get("message")) for entry in core), core
    assert entries[-1].get("message") == "stopped", entries[-3:]


def test_json_mode_output_written_just_before_exit_is_flushed_as_json() -> None:
    """What the service's logger does not write, written to fd 2 just before exit (a last print, say)."""
    script = (
        "import sys\n"
        "from integrations_service import logs\n"
        "logs.configure(json_lines=True)\n"
        "print('the very last plain words', file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    entries = [json.loads(line) for line in result.stderr.splitlines()]
    assert [(entry["logger"], entry["message"]) for entry in entries] == [("stderr", "the very last plain words")]


def test_json_mode_serve_check_says_the_configuration_is_valid_at_info_level(tmp_path: Path) -> None:
    env, _credentials = _tls_env(tmp_path)
    result = run_cli(["serve", "--check"], tmp_path, env)
    assert result.returncode == 0, result.stderr
    entries = [json.loads(line) for line in result.stderr.splitlines()]
    assert entries[-1]["message"] == "configuration is valid"
    assert entries[-1]["level"] == "info"  # not an error a log pipeline would alert on
    assert entries[-1]["event"] == "configuration_valid"


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"INTEGRATIONS_MODE": "production"}, "DATABASE_URL"),  # JSON is production's default
        ({"INTEGRATIONS_LOG_FORMAT": "json", "INTEGRATIONS_DB_TIMEOUT": "soon"}, "INTEGRATIONS_DB_TIMEOUT"),
    ],
)
def test_json_mode_reports_invalid_settings_as_one_json_line(
    tmp_path: Path, settings: dict[str, str], named: str
) -> None:
    """docs/operations.md: in JSON mode every line on stderr is a JSON object; the settings' errors too."""
    result = run_cli(["serve"], tmp_path, clean_env(settings))
    assert result.returncode == 2, result.stderr
    entries = [json.loads(line) for line in result.stderr.splitlines()]
    assert len(entries) == 1, entries
    assert entries[0]["level"] == "error"
    assert entries[0]["event"] == "invalid_configuration"
    assert entries[0]["message"].startswith("invalid configuration:\n")
    assert named in entries[0]["message"]


def test_text_mode_reports_invalid_settings_as_plain_lines(tmp_path: Path) -> None:
    result = run_cli(["serve"], tmp_path, clean_env({"INTEGRATIONS_DB_TIMEOUT": "soon"}))
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "integrations-service: invalid configuration:",
        "  INTEGRATIONS_DB_TIMEOUT must be a number, got 'soon'",
    ]


def test_json_mode_logs_one_line_per_rpc_with_its_audit_record_on_it(tmp_path: Path, processes: Processes) -> None:
    """A call that leaves an audit record (a save, a decrypted read) still writes one line, which carries
    the record; the record in the store is the same as ever."""
    process = processes.serve(tmp_path / "work", clean_env({"INTEGRATIONS_LOG_FORMAT": "json"}))
    org, secret = new_org(), "sk_test_one_line_per_call_0123456789"
    values = {"secretKey": secret, "webhookSecret": "whsec_one_line", "publishableKey": "pk_test_one_line"}
    channel, stub = _insecure_stub(process)
    calls: dict[str, tuple[str, object]] = {
        "req-save": (
            "SaveIntegration",
            pb.SaveIntegrationRequest(organization_id=org, provider="stripe", values=values),
        ),
        "req-decrypted": (
            "GetProviderConfig",
            pb.GetProviderConfigRequest(organization_id=org, provider="stripe", view=pb.CONFIG_VIEW_DECRYPTED),
        ),
        "req-masked": ("GetProviderConfig", pb.GetProviderConfigRequest(organization_id=org, provider="stripe")),
        "req-list": ("ListProviders", pb.ListProvidersRequest(organization_id=org)),
    }
    with channel:
        for request_id, (method, request) in calls.items():
            getattr(stub, method)(request, timeout=10, metadata=((("x-request-id", request_id),)))
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetProviderConfig(
                pb.GetProviderConfigRequest(organization_id=org, provider="nope", view=pb.CONFIG_VIEW_DECRYPTED),
                timeout=10,
                metadata=(("x-request-id", "req-refused"),),
            )
        assert refused.value.code() is grpc.StatusCode.NOT_FOUND
        # The trail itself is unchanged: one record per audited call, with its request id (reads within a flush).
        expected = {
            ("req-save", "SaveIntegration", "OK"),
            ("req-decrypted", "GetProviderConfig", "OK"),
            ("req-refused", "GetProviderConfig", "NotFound"),
        }
        deadline, stored = time.monotonic() + 10, set[tuple[str, str, str]]()
        while not expected <= stored and time.monotonic() < deadline:
            time.sleep(0.1)
            events = stub.ListAuditEvents(pb.ListAuditEventsRequest(organization_id=org), timeout=10).events
            stored = {(e.request_id, e.action, e.outcome) for e in events}
        assert expected <= stored, stored
    assert process.terminate() == 0
    log = process.stderr()
    assert secret not in log
    entries = [json.loads(line) for line in log.splitlines()]
    by_request = {rid: [e for e in entries if e.get("request_id") == rid] for rid in [*calls, "req-refused"]}
    assert {rid: len(lines) for rid, lines in by_request.items()} == dict.fromkeys(by_request, 1), by_request
    service = "/integrations.v1.IntegrationService/"
    for request_id, (method, _request) in calls.items():
        (line,) = by_request[request_id]
        assert line["message"] == "rpc finished", line
        assert (line["rpc"], line["code"], line["caller"], line["organization_id"]) == (
            service + method,
            "OK",
            "development-plaintext",
            org,
        ), line
        assert isinstance(line["duration_ms"], float | int), line
    audited = {"req-save": "SaveIntegration", "req-decrypted": "GetProviderConfig"}
    for request_id in calls:
        (line,) = by_request[request_id]
        if request_id in audited:
            assert (line["event"], line["outcome"], line["provider"]) == ("audit", "OK", "stripe"), line
            assert line["fields"] == "publishableKey,secretKey,webhookSecret", line
        else:
            assert not {"event", "outcome", "fields"} & set(line), line
    (refused_line,) = by_request["req-refused"]
    assert (refused_line["code"], refused_line["event"], refused_line["outcome"]) == (
        "NOT_FOUND",
        "audit",
        "NotFound",
    ), refused_line
