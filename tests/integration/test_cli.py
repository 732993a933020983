"""The `integrations-service` entry point as a real process: serve, migrate, gen-key.

Each test runs the console script (next to this interpreter) in its own
working directory, with a clean environment: none of the service's settings
or provider fallbacks are inherited from the shell running the tests.
"""

from __future__ import annotations

import base64
import datetime
import json
import re
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from integrations.v1 import integrations_pb2 as pb
from integrations.v1 import integrations_pb2_grpc as pb_grpc
from integrations_service.crypto import EncryptionKey
from integrations_service.devcerts import make_dev_certs
from tests.harness import TEST_KEY
from tests.processes import Processes, ServeProcess, clean_env, free_port, health_status, run_cli
from tests.tls_fixtures import CertificateAuthority

SK = "sk_test_51CliRestartSecret00009876"
PRODUCTION_URL = "postgresql://integrations@db.internal:5432/integrations"
# For runs that must fail at start-up: should one start anyway, it takes no fixed port.
ANY_PORT = {"INTEGRATIONS_LISTEN_ADDRESS": "127.0.0.1:0", "INTEGRATIONS_METRICS_ADDRESS": ""}
MYSQL_URL = "mysql://u:hunter2@h/db"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    with Processes(tmp_path) as started:
        yield started


def stub_for(process: ServeProcess) -> tuple[grpc.Channel, pb_grpc.IntegrationServiceStub]:
    channel = grpc.insecure_channel(process.target)
    return channel, pb_grpc.IntegrationServiceStub(channel)


def listing(directory: Path) -> list[str]:
    return sorted(str(path.relative_to(directory)) for path in directory.rglob("*"))


def production_env(workdir: Path) -> dict[str, str]:
    """Valid production settings: development certificates and policy from `dev-certs`, a key, a database URL."""
    certs = workdir / "certs"
    result = run_cli(["dev-certs", "--out", str(certs)], workdir, clean_env())
    assert result.returncode == 0, result.stderr
    return {
        "INTEGRATIONS_MODE": "production",
        "INTEGRATION_ENCRYPTION_KEY": TEST_KEY,
        "DATABASE_URL": PRODUCTION_URL,
        "INTEGRATIONS_TLS_CERT": str(certs / "server.crt"),
        "INTEGRATIONS_TLS_KEY": str(certs / "server.key"),
        "INTEGRATIONS_TLS_CLIENT_CA": str(certs / "ca.crt"),
        "INTEGRATIONS_AUTHZ_POLICY": str(certs / "policy.toml"),
        "INTEGRATIONS_METRICS_ADDRESS": "",
    }


# --- gen-key -------------------------------------------------------------------------------------------


def test_gen_key_prints_a_usable_key_and_a_new_one_each_time(workdir: Path) -> None:
    keys = []
    for _ in range(2):
        result = run_cli(["gen-key"], workdir, clean_env())
        assert result.returncode == 0, result.stderr
        text = result.stdout.strip()
        assert text
        assert "\n" not in text
        EncryptionKey.from_text(text)  # raises InvalidKey if it is not one
        assert len(base64.b64decode(text)) == 32
        keys.append(text)
    assert keys[0] != keys[1]
    assert listing(workdir) == []  # printed, never written anywhere


# --- serve in development --------------------------------------------------------------------------------


def test_development_serve_generates_a_private_key_file_and_reuses_it(workdir: Path, processes: Processes) -> None:
    first = processes.serve(workdir, clean_env())
    key_file = workdir / ".data" / "dev-encryption.key"
    assert key_file.is_file()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key_text = key_file.read_text().strip()
    EncryptionKey.from_text(key_text)
    log = first.stderr()
    assert "development key" in log
    assert "generated" in log
    assert key_text not in first.output()

    org = "org_cli_restart"
    channel, stub = stub_for(first)
    with channel:
        stub.SaveIntegration(
            pb.SaveIntegrationRequest(organization_id=org, provider="stripe", values={"secretKey": SK}), timeout=10
        )
    assert first.terminate() == 0

    second = processes.serve(workdir, clean_env())
    assert key_file.read_text().strip() == key_text
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert "generated" not in second.stderr()
    channel, stub = stub_for(second)
    with channel:
        reply = stub.GetProviderConfig(
            pb.GetProviderConfigRequest(organization_id=org, provider="stripe", view=pb.CONFIG_VIEW_DECRYPTED),
            timeout=10,
        )
    assert reply.config.values["secretKey"].value == SK
    assert reply.config.values["secretKey"].source == pb.VALUE_SOURCE_ORGANIZATION
    assert second.terminate() == 0
    assert key_text not in second.output()


def test_development_key_file_readable_by_others_is_refused(workdir: Path) -> None:
    key_file = workdir / ".data" / "dev-encryption.key"
    key_file.parent.mkdir()
    key_text = EncryptionKey.generate().to_text()
    key_file.write_text(key_text + "\n")
    key_file.chmod(0o644)
    result = run_cli(["serve"], workdir, clean_env(ANY_PORT), timeout=15)
    assert result.returncode != 0
    assert "dev-encryption.key" in result.stderr
    assert "chmod 600" in result.stderr
    assert key_text not in result.stderr + result.stdout


def test_sigterm_stops_serving_cleanly_with_a_shutdown_line(workdir: Path, processes: Processes) -> None:
    process = processes.serve(workdir, clean_env())
    channel, stub = stub_for(process)
    with channel:
        stub.ListProviders(pb.ListProvidersRequest(), timeout=10)
    started = time.monotonic()
    assert process.terminate(timeout=5) == 0
    assert time.monotonic() - started < 5
    log = process.stderr()
    assert "shutting down" in log
    assert log.index("shutting down") < log.index("stopped")
    assert health_status(process.target, timeout=0.5) != "SERVING"


# --- start-up errors --------------------------------------------------------------------------------------


def test_production_without_key_and_database_names_both_at_once(workdir: Path) -> None:
    started = time.monotonic()
    result = run_cli(["serve"], workdir, clean_env({**ANY_PORT, "INTEGRATIONS_MODE": "production"}), timeout=15)
    assert time.monotonic() - started < 10
    assert result.returncode != 0
    assert "INTEGRATION_ENCRYPTION_KEY" in result.stderr
    assert "DATABASE_URL" in result.stderr
    assert listing(workdir) == []  # refused before touching anything


@pytest.mark.parametrize(
    ("variable", "bad_key"),
    [
        ("INTEGRATION_ENCRYPTION_KEY", "abc"),
        ("INTEGRATION_ENCRYPTION_KEY", "PLANTED0not0a0key0value0ZZZ"),
        ("INTEGRATION_ENCRYPTION_KEY", base64.b64encode(b"sixteen byte key").decode()),  # valid base64, 16 bytes
        ("INTEGRATION_ENCRYPTION_KEY", "ab" * 31),  # 62 hex characters
        ("INTEGRATION_ENCRYPTION_KEYS", "k1:PLANTED0bad0keyring0entry0YYY"),
    ],
)
def test_invalid_key_is_a_start_up_error_that_does_not_echo_it(workdir: Path, variable: str, bad_key: str) -> None:
    result = run_cli(["serve"], workdir, clean_env({**ANY_PORT, variable: bad_key}), timeout=15)
    assert result.returncode != 0
    assert variable in result.stderr
    assert bad_key not in result.stderr + result.stdout
    assert bad_key.rpartition(":")[2] not in result.stderr + result.stdout
    assert not (workdir / ".data" / "dev-encryption.key").exists()  # no silent fallback to a generated key


def test_keyring_entry_with_id_and_key_swapped_is_refused_without_echoing_the_key(workdir: Path) -> None:
    key_text = EncryptionKey.generate().to_text()
    env = {**ANY_PORT, "INTEGRATION_ENCRYPTION_KEYS": f"{key_text}:k1"}
    result = run_cli(["serve", "--check"], workdir, clean_env(env), timeout=15)
    assert result.returncode != 0
    assert "INTEGRATION_ENCRYPTION_KEYS" in result.stderr
    assert key_text.rstrip("=")[:16] not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("env", "args"),
    [
        ({"INTEGRATIONS_LISTEN_ADDRESS": "0.0.0.0:0"}, []),
        ({}, ["--listen-address", "0.0.0.0:0"]),
        ({"INTEGRATIONS_LISTEN_ADDRESS": "[::]:0"}, []),
    ],
)
def test_non_loopback_listen_address_is_refused(workdir: Path, env: dict[str, str], args: list[str]) -> None:
    result = run_cli(["serve", *args], workdir, clean_env({"INTEGRATION_ENCRYPTION_KEY": TEST_KEY, **ANY_PORT, **env}))
    assert result.returncode != 0
    assert "INTEGRATIONS_LISTEN_ADDRESS" in result.stderr


def test_serve_check_with_valid_development_settings_exits_0_and_starts_nothing(workdir: Path) -> None:
    for env in ({}, {"INTEGRATION_ENCRYPTION_KEY": "00" * 32, "DATABASE_URL": "sqlite:///data/x.sqlite3"}):
        result = run_cli(["serve", "--check"], workdir, clean_env(env), timeout=15)
        assert result.returncode == 0, result.stderr
        assert "valid" in result.stderr
        assert listing(workdir) == []  # no key file, no database


def test_serve_check_with_valid_production_settings_exits_0(workdir: Path) -> None:
    env = production_env(workdir)
    before = listing(workdir)
    result = run_cli(["serve", "--check"], workdir, clean_env(env), timeout=15)
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stderr
    assert listing(workdir) == before
    assert TEST_KEY not in result.stderr + result.stdout


def test_serve_check_reports_every_bad_setting(workdir: Path) -> None:
    env = {
        "INTEGRATIONS_MODE": "production",
        "INTEGRATIONS_LISTEN_ADDRESS": "0.0.0.0:50051",
        "INTEGRATIONS_LOG_FORMAT": "xml",
        "INTEGRATIONS_SHUTDOWN_GRACE": "-1",
    }
    result = run_cli(["serve", "--check"], workdir, clean_env(env), timeout=15)
    assert result.returncode != 0
    for name in (
        "INTEGRATION_ENCRYPTION_KEY",
        "DATABASE_URL",
        "INTEGRATIONS_LOG_FORMAT",
        "INTEGRATIONS_SHUTDOWN_GRACE",
    ):
        assert name in result.stderr


@pytest.mark.parametrize("command", [["serve"], ["migrate"]])
def test_bad_database_url_scheme_is_refused_without_echoing_the_password(workdir: Path, command: list[str]) -> None:
    env = {**ANY_PORT, "INTEGRATION_ENCRYPTION_KEY": TEST_KEY, "DATABASE_URL": MYSQL_URL}
    result = run_cli(command, workdir, clean_env(env), timeout=15)
    assert result.returncode != 0
    assert "DATABASE_URL" in result.stderr
    assert "hunter2" not in result.stderr + result.stdout


def test_serve_check_refuses_a_bad_database_url_scheme_with_the_other_problems(workdir: Path) -> None:
    env = {"INTEGRATION_ENCRYPTION_KEY": "abc", "DATABASE_URL": MYSQL_URL}
    result = run_cli(["serve", "--check"], workdir, clean_env(env), timeout=15)
    assert "hunter2" not in result.stderr + result.stdout
    assert result.returncode != 0
    assert "INTEGRATION_ENCRYPTION_KEY" in result.stderr
    assert "DATABASE_URL" in result.stderr


# --- migrate ---------------------------------------------------------------------------------------------


@pytest.mark.postgres
def test_migrate_against_postgres_twice(workdir: Path, postgres_database_url: str) -> None:
    env = clean_env({"DATABASE_URL": postgres_database_url, "INTEGRATIONS_LOG_FORMAT": "json"})
    for _ in range(2):
        result = run_cli(["migrate"], workdir, env, timeout=30)
        assert result.returncode == 0, result.stderr
        events = [json.loads(line).get("event") for line in result.stderr.splitlines()]
        assert "migrated" in events
    assert listing(workdir) == []  # PostgreSQL, not the embedded store


@pytest.mark.postgres
def test_migrate_flags_override_the_environment(workdir: Path, postgres_database_url: str) -> None:
    env = clean_env(
        {
            "INTEGRATIONS_LISTEN_ADDRESS": "0.0.0.0:1",  # invalid: only the flags make this run valid
            "DATABASE_URL": MYSQL_URL,
            "INTEGRATIONS_LOG_FORMAT": "xml",
        }
    )
    args = [
        "migrate",
        "--listen-address",
        "127.0.0.1:0",
        "--database-url",
        postgres_database_url,
        "--log-format",
        "text",
    ]
    result = run_cli(args, workdir, env, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "migrations applied" in result.stderr
    assert listing(workdir) == []


def test_serve_flags_override_the_environment(workdir: Path, processes: Processes) -> None:
    env_port, flag_port = free_port(), free_port()
    env = clean_env(
        {
            "INTEGRATIONS_MODE": "production",  # no key, TLS or database: refused unless the flag wins
            "INTEGRATIONS_LISTEN_ADDRESS": f"127.0.0.1:{env_port}",
            "INTEGRATIONS_LOG_FORMAT": "text",
            "INTEGRATIONS_DATA_DIR": "from-env",
        }
    )
    target = f"127.0.0.1:{flag_port}"
    args = ["--mode", "development", "--listen-address", target, "--log-format", "json", "--data-dir", "state"]
    process = processes.serve(workdir, env, args, target=target)
    assert health_status(f"127.0.0.1:{env_port}", timeout=0.5) != "SERVING"
    assert (workdir / "state" / "dev-encryption.key").is_file()
    assert not (workdir / "from-env").exists()
    assert process.terminate() == 0
    lines = [json.loads(line) for line in process.stderr().splitlines()]
    events = [line.get("event") for line in lines]
    assert {"dev_key_generated", "serving", "shutting_down", "stopped"} <= set(events)
    serving = next(line for line in lines if line.get("event") == "serving")
    assert (serving["address"], serving["mode"]) == (target, "development")


def test_environment_is_used_when_no_flag_is_given(workdir: Path, processes: Processes) -> None:
    # The counterpart of the test above: settings through the environment alone.
    process = processes.serve(workdir, clean_env({"INTEGRATIONS_LOG_FORMAT": "json", "INTEGRATIONS_DATA_DIR": "state"}))
    assert (workdir / "state" / "dev-encryption.key").is_file()
    assert not (workdir / ".data").exists()
    assert process.terminate() == 0
    assert all(isinstance(json.loads(line), dict) for line in process.stderr().splitlines())


def test_dev_certs_if_expiring_keeps_a_good_set_and_renews_an_expiring_one(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    first = run_cli(["dev-certs", "--if-expiring", "--out", str(certs)], tmp_path, clean_env())
    assert first.returncode == 0, first.stderr
    assert "renewing" in first.stdout
    assert "missing" in first.stdout
    written = (certs / "server.crt").read_bytes()

    kept = run_cli(["dev-certs", "--if-expiring", "--out", str(certs)], tmp_path, clean_env())
    assert kept.returncode == 0, kept.stderr
    assert "kept" in kept.stdout
    assert (certs / "server.crt").read_bytes() == written

    # A server certificate that ends in 12 hours (or has ended): the whole set is written anew.
    ca = CertificateAuthority.load(certs / "ca.crt", certs / "ca.key")
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=12)
    ca.issue("localhost", dns=("localhost",), server=True, not_after=soon).write(certs, "server")
    renewed = run_cli(["dev-certs", "--if-expiring", "--out", str(certs)], tmp_path, clean_env())
    assert renewed.returncode == 0, renewed.stderr
    assert "server.crt expires" in renewed.stdout
    cert = x509.load_pem_x509_certificate((certs / "server.crt").read_bytes())
    assert cert.not_valid_after_utc > soon + datetime.timedelta(days=20)
    assert CertificateAuthority.load(certs / "ca.crt", certs / "ca.key").cert != ca.cert  # a new CA: all re-issued


def test_make_run_mtls_renews_expiring_certificates() -> None:
    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    recipe = makefile.split("\nrun-mtls:", 1)[1].split("\n\n", 1)[0]
    assert "$(BIN)/integrations-service dev-certs --if-expiring" in recipe
    assert "test -f" not in recipe


def test_the_readmes_production_block_is_a_complete_production_configuration(tmp_path: Path) -> None:
    """README, "Running in production": its exports pass `serve --check` once the files they name exist."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("Running in production:", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    exported = dict(re.findall(r"\b([A-Z_]+)=(\S+)", block))
    assert exported["INTEGRATIONS_MODE"] == "production"
    issued = make_dev_certs(tmp_path / "certs")
    keyring = tmp_path / "keyring"
    keyring.write_text(f"k1:{EncryptionKey.generate().to_text()}\n")
    keyring.chmod(0o600)
    files = {
        "INTEGRATION_ENCRYPTION_KEY_FILE": keyring,
        "INTEGRATIONS_TLS_CERT": issued["server"].cert,
        "INTEGRATIONS_TLS_KEY": issued["server"].key,
        "INTEGRATIONS_TLS_CLIENT_CA": issued["ca"].cert,
        "INTEGRATIONS_AUTHZ_POLICY": tmp_path / "certs" / "policy.toml",
    }
    assert files.keys() <= exported.keys()
    result = run_cli(["serve", "--check"], tmp_path, clean_env({**exported, **{k: str(v) for k, v in files.items()}}))
    assert result.returncode == 0, result.stderr
