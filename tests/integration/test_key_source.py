"""Where production keys come from: a key in the environment stays in /proc/PID/environ, so start-up warns.

Real `integrations-service serve` processes in production mode (mutual TLS with
the `dev-certs` certificates, this run's PostgreSQL).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.harness import TEST_KEY
from tests.integration.test_cli import production_env
from tests.processes import Processes, clean_env

pytestmark = pytest.mark.postgres


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    with Processes(tmp_path) as started:
        yield started


def health_credentials(workdir: Path) -> grpc.ChannelCredentials:
    certs = workdir / "certs"
    return grpc.ssl_channel_credentials(
        (certs / "ca.crt").read_bytes(), (certs / "dashboard.key").read_bytes(), (certs / "dashboard.crt").read_bytes()
    )


@pytest.mark.parametrize("variable", ["INTEGRATION_ENCRYPTION_KEY", "INTEGRATION_ENCRYPTION_KEYS"])
def test_production_warns_when_the_key_comes_from_the_environment(
    tmp_path: Path, processes: Processes, postgres_database_url: str, variable: str
) -> None:
    env = production_env(tmp_path)
    del env["INTEGRATION_ENCRYPTION_KEY"]
    env[variable] = TEST_KEY if variable == "INTEGRATION_ENCRYPTION_KEY" else f"default:{TEST_KEY}"
    env["DATABASE_URL"] = postgres_database_url

    server = processes.serve(tmp_path, clean_env(env), credentials=health_credentials(tmp_path))

    log = server.stderr()
    assert "key_in_environment" in log
    assert variable in log
    assert "/proc" in log
    assert "INTEGRATION_ENCRYPTION_KEY_FILE" in log
    assert TEST_KEY not in server.output()
    # And the text is true: the variable is still in the process's initial environment.
    environ = Path(f"/proc/{server.popen.pid}/environ").read_bytes()
    assert f"{variable}=".encode() in environ


def test_production_with_a_key_file_does_not_warn(
    tmp_path: Path, processes: Processes, postgres_database_url: str
) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(TEST_KEY + "\n")
    os.chmod(key_file, 0o600)
    env = production_env(tmp_path)
    del env["INTEGRATION_ENCRYPTION_KEY"]
    env.update({"INTEGRATION_ENCRYPTION_KEY_FILE": str(key_file), "DATABASE_URL": postgres_database_url})

    server = processes.serve(tmp_path, clean_env(env), credentials=health_credentials(tmp_path))

    assert "key_in_environment" not in server.stderr()
