"""The README's grpcurl sessions, command for command, against a real `integrations-service serve`.

The commands are read from README.md (the ```sh blocks under "## A grpcurl
session"), pointed at the test server and run without a shell; the outputs
are checked for what a reader of the README would look for. The README's JSON
example of the masked read must match what the server really answers.

As `make run` and `make run-mtls` do: development mode, no key (one is
generated into `.data`), certificates from `integrations-service dev-certs`
in `.data/dev-certs`; only the store comes from the `store_location` fixture.
"""

from __future__ import annotations

import contextlib
import json
import queue
import re
import shlex
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from integrations.v1 import integrations_pb2 as pb
from tests.processes import GRPCURL, Processes, clean_env, own_store_location, run_cli

README = Path(__file__).resolve().parents[2] / "README.md"
PROTO = Path(__file__).resolve().parents[2] / "protos" / "integrations" / "v1" / "integrations.proto"
SESSION_HEADING = "## A grpcurl session"
README_ADDRESS = "127.0.0.1:50051"
README_GRPCURL = ".venv/bin/grpcurl"
SERVICE = "integrations.v1.IntegrationService"
RPCS = [method.name for method in pb.DESCRIPTOR.services_by_name["IntegrationService"].methods]
DEMO_SECRET = "sk_test_51DemoSecretKey000000004242"


def proto_comment_above(declaration: str) -> list[str]:
    """The `//` lines right above `declaration` in the proto, as grpcurl prints them."""
    lines = PROTO.read_text(encoding="utf-8").splitlines()
    index = next(i for i, line in enumerate(lines) if line.strip().startswith(declaration))
    comment: list[str] = []
    while lines[index - 1 - len(comment)].strip().startswith("//"):
        comment.insert(0, lines[index - 1 - len(comment)].strip())
    return comment


def readme_section() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(SESSION_HEADING)
    following = text.find("\n## ", start + len(SESSION_HEADING))
    return text[start : following if following != -1 else len(text)]


def fenced_blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", section, re.S | re.M)


def split_commands(block: str) -> list[list[str]]:
    """Shell commands of a block: comments dropped, backslash continuations and multi-line quotes joined."""
    commands: list[list[str]] = []
    pending = ""
    for line in block.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line + "\n"
        if pending.endswith("\\\n"):
            continue
        try:
            tokens = shlex.split(pending.replace("\\\n", " "), comments=True, posix=True)
        except ValueError:  # a quote is still open: the command goes on on the next line
            continue
        commands.append(tokens)
        pending = ""
    assert not pending, f"unterminated command in README: {pending!r}"
    return commands


def runnable(tokens: list[str], target: str) -> list[str]:
    """A README command pointed at the test server and this environment's grpcurl."""
    assert tokens[0] == README_GRPCURL, tokens
    assert README_ADDRESS in tokens, tokens
    return [str(GRPCURL), *(target if token == README_ADDRESS else token for token in tokens[1:])]


def data_of(command: list[str]) -> dict[str, Any]:
    return json.loads(command[command.index("-d") + 1])  # type: ignore[no-any-return]


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=30, check=False, stdin=subprocess.DEVNULL
    )


def plaintext_session() -> list[list[str]]:
    return split_commands(fenced_blocks(readme_section(), "sh")[0])


def mtls_session() -> list[list[str]]:
    blocks = fenced_blocks(readme_section(), "sh")
    assert len(blocks) >= 2, "README: no mutual TLS grpcurl block"
    return split_commands(blocks[1])


def watch_session() -> list[list[str]]:
    blocks = fenced_blocks(readme_section(), "sh")
    assert len(blocks) >= 3, "README: no grpcurl block that watches"
    return split_commands(blocks[2])


def test_readme_commands_are_parsed_as_a_reader_would_run_them() -> None:
    commands = plaintext_session()
    assert [c[-1] for c in commands] == [
        "list",
        SERVICE,
        "grpc.health.v1.Health/Check",
        f"{SERVICE}/ListProviders",
        f"{SERVICE}/SaveIntegration",
        f"{SERVICE}/GetProviderConfig",
        f"{SERVICE}/GetProviderConfig",
        f"{SERVICE}/SaveIntegration",
    ]
    assert all(c[:2] == [README_GRPCURL, "-plaintext"] for c in commands)
    assert data_of(commands[4])["values"]["secretKey"] == DEMO_SECRET
    assert [c[-1] for c in mtls_session()] == [
        f"{SERVICE}/SaveIntegration",
        f"{SERVICE}/GetProviderConfig",
        f"{SERVICE}/ListAuditEvents",
    ]
    assert [c[-1] for c in watch_session()] == [f"{SERVICE}/WatchConfigChanges"]


@pytest.fixture
def own_store(store_location: tuple[str, str], request: pytest.FixtureRequest) -> tuple[str, str]:
    # A generated development key: PostgreSQL needs a database of its own (the service checks its keys).
    return own_store_location(store_location, request)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    with Processes(tmp_path) as started:
        yield started


def test_readme_grpcurl_sessions(own_store: tuple[str, str], tmp_path: Path, processes: Processes) -> None:
    kind, where = own_store
    workdir = tmp_path / "work"
    env = clean_env({"DATABASE_URL": f"sqlite:///{where}" if kind == "sqlite" else where})

    # --- `make run` and the plaintext session ---
    server = processes.serve(workdir, env)
    commands = [runnable(tokens, server.target) for tokens in plaintext_session()]
    results = [run(command, workdir) for command in commands]
    for command, result in zip(commands[:-1], results[:-1], strict=True):
        assert result.returncode == 0, f"{shlex.join(command)}\n{result.stdout}{result.stderr}"
    listed, described, health, providers, saved, masked, decrypted, refused = results

    services = listed.stdout.split()
    assert SERVICE in services
    assert "grpc.health.v1.Health" in services
    assert any(name.startswith("grpc.reflection.") and name.endswith(".ServerReflection") for name in services)

    described_rpcs = re.findall(r"\brpc (\w+)", described.stdout)
    assert {"ListProviders", "GetProviderConfig", "SaveIntegration", "DeleteIntegration"} <= set(described_rpcs)
    assert sorted(described_rpcs) == sorted(RPCS)
    # The proto's documentation comes through reflection, for the service and each of its RPCs.
    described_lines = [line.strip() for line in described.stdout.splitlines()]
    for declaration in ("service IntegrationService", "rpc GetProviderConfig(", "rpc SaveIntegration("):
        comment = proto_comment_above(declaration)
        assert comment, declaration
        assert all(line in described_lines for line in comment), (declaration, described.stdout)

    assert json.loads(health.stdout) == {"status": "SERVING"}

    assert [p["id"] for p in json.loads(providers.stdout)["providers"]] == ["stripe", "easypay", "ifthenpay"]

    saved_values = data_of(commands[4])["values"]
    saved_config = json.loads(saved.stdout)["config"]
    assert saved_config["values"]["secretKey"]["value"] == "••••••••4242"
    assert saved_config["values"]["secretKey"]["secret"] is True
    assert saved_config["values"]["publishableKey"]["value"] == saved_values["publishableKey"]
    assert saved_values["secretKey"] not in saved.stdout

    masked_config = json.loads(masked.stdout)["config"]
    assert masked_config["values"] == saved_config["values"]
    assert masked_config["etag"] == saved_config["etag"]
    assert saved_values["secretKey"] not in masked.stdout

    decrypted_values = json.loads(decrypted.stdout)["config"]["values"]
    assert decrypted_values["secretKey"] == {
        "value": saved_values["secretKey"],
        "source": "VALUE_SOURCE_ORGANIZATION",
        "secret": True,
    }

    assert refused.returncode != 0
    assert "InvalidArgument" in refused.stdout + refused.stderr
    assert "values.secretKey" in refused.stdout + refused.stderr

    # The README's example of the masked read is what the server answers, etag and time aside.
    example = json.loads(fenced_blocks(readme_section(), "json")[0])["config"]
    assert {"etag", "update_time"} <= example.keys() & masked_config.keys()
    volatile = ("etag", "update_time")
    assert {k: v for k, v in masked_config.items() if k not in volatile} == {
        k: v for k, v in example.items() if k not in volatile
    }
    assert masked_config["values"] == example["values"]
    assert server.terminate() == 0

    # --- `make run-mtls` and the mutual TLS session, on the same data ---
    certs = workdir / ".data" / "dev-certs"
    made = run_cli(["dev-certs"], workdir, clean_env())
    assert made.returncode == 0, made.stderr
    tls_env = {
        **env,
        "INTEGRATIONS_TLS_CERT": ".data/dev-certs/server.crt",
        "INTEGRATIONS_TLS_KEY": ".data/dev-certs/server.key",
        "INTEGRATIONS_TLS_CLIENT_CA": ".data/dev-certs/ca.crt",
        "INTEGRATIONS_AUTHZ_POLICY": ".data/dev-certs/policy.toml",
    }
    health_credentials = grpc.ssl_channel_credentials(
        (certs / "ca.crt").read_bytes(), (certs / "dashboard.key").read_bytes(), (certs / "dashboard.crt").read_bytes()
    )
    tls_server = processes.serve(workdir, tls_env, credentials=health_credentials)
    commands = [runnable(tokens, tls_server.target) for tokens in mtls_session()]
    results = [run(command, workdir) for command in commands]
    for command, result in zip(commands, results, strict=True):
        assert result.returncode == 0, f"{shlex.join(command)}\n{result.stdout}{result.stderr}"
    dashboard_save, commerce_read, admin_audit = results

    webhook = data_of(commands[0])["values"]["webhookSecret"]
    saved_config = json.loads(dashboard_save.stdout)["config"]
    assert saved_config["values"]["webhookSecret"]["value"] == "••••••••" + webhook[-4:]
    assert webhook not in dashboard_save.stdout

    clear = json.loads(commerce_read.stdout)["config"]["values"]
    assert clear["webhookSecret"]["value"] == webhook
    assert clear["secretKey"]["value"] == DEMO_SECRET  # saved in the plaintext session, same data and key

    events = json.loads(admin_audit.stdout)["events"]
    assert events
    assert all(event["organization_id"] == "org_demo" for event in events)
    assert webhook not in admin_audit.stdout
    assert DEMO_SECRET not in admin_audit.stdout

    # What the first comment of the block says: the dashboard may not read the clear text.
    dashboard = commands[0][: commands[0].index("-d")]
    denied = run(
        [
            *dashboard,
            "-d",
            json.dumps({"organization_id": "org_demo", "provider": "stripe", "view": "CONFIG_VIEW_DECRYPTED"}),
            tls_server.target,
            f"{SERVICE}/GetProviderConfig",
        ],
        workdir,
    )
    assert denied.returncode != 0
    assert "PermissionDenied" in denied.stdout + denied.stderr
    assert tls_server.terminate() == 0


class StreamedJson:
    """The JSON messages a running grpcurl prints, parsed as they arrive (a thread reads its stdout)."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self._messages: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        pending = ""
        decoder = json.JSONDecoder()
        for line in process.stdout:
            pending += line
            with contextlib.suppress(json.JSONDecodeError):
                message, _ = decoder.raw_decode(pending.strip())
                self._messages.put(message)
                pending = ""
        self._messages.put(None)

    def next(self, timeout: float = 20) -> dict[str, Any] | None:
        return self._messages.get(timeout=timeout)


def test_readme_watch_session(own_store: tuple[str, str], tmp_path: Path, processes: Processes) -> None:
    kind, where = own_store
    workdir = tmp_path / "work"
    env = clean_env({"DATABASE_URL": f"sqlite:///{where}" if kind == "sqlite" else where})
    server = processes.serve(workdir, env)
    [watch] = [runnable(tokens, server.target) for tokens in watch_session()]
    watcher = subprocess.Popen(
        watch, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
    )
    try:
        messages = StreamedJson(watcher)
        started = messages.next()
        assert started is not None, watcher.stderr.read() if watcher.stderr else ""
        assert set(started) == {"started"}
        assert "start_time" in started["started"]

        save = runnable(plaintext_session()[4], server.target)
        saved = run(save, workdir)
        assert saved.returncode == 0, saved.stderr
        change = messages.next()
        assert change is not None
        assert change == {
            "change": {
                "organization_id": "org_demo",
                "provider": "stripe",
                "etag": json.loads(saved.stdout)["config"]["etag"],
                "type": "CHANGE_TYPE_SAVED",
                "change_time": json.loads(saved.stdout)["config"]["update_time"],
            }
        }
        assert DEMO_SECRET not in json.dumps(change)

        # The server stops: the stream ends with Unavailable, and grpcurl says so.
        assert server.terminate() == 0
        assert messages.next() is None
        assert watcher.wait(timeout=20) != 0
        stderr = watcher.stderr.read() if watcher.stderr else ""
        assert "Unavailable" in stderr
        assert "server shutting down; reconnect" in stderr
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait(5)
