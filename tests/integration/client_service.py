"""The client tests' fixtures: a test module imports them to run its clients against the real service on an
SQLite file with the clients' environment defaults, as a process (`processes`, `serve_env`), and against a
scriptable fake server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.client_fixtures import ENV_DEFAULTS, FakeServer, start_fake_server
from tests.harness import TEST_KEY, Running
from tests.processes import Processes, clean_env


@pytest.fixture(name="service_env")
def client_service_env() -> dict[str, str]:
    return ENV_DEFAULTS


@pytest.fixture(name="svc")
def client_svc(sqlite_svc: Running) -> Running:
    return sqlite_svc


@pytest.fixture(name="fake")
async def client_fake() -> AsyncIterator[FakeServer]:
    server = await start_fake_server()
    yield server
    await server.stop()


@pytest.fixture(name="processes")
def client_processes(tmp_path: Path) -> Iterator[Processes]:
    with Processes(tmp_path) as started:
        yield started


def serve_env(tmp_path: Path, target: str) -> dict[str, str]:
    """The environment of `integrations-service serve` on `target`, with an SQLite file in `tmp_path`."""
    return clean_env(
        {
            "INTEGRATIONS_LISTEN_ADDRESS": target,
            "INTEGRATION_ENCRYPTION_KEY": TEST_KEY,
            "DATABASE_URL": f"sqlite:///{tmp_path / 'process.sqlite3'}",
            "INTEGRATIONS_DATA_DIR": str(tmp_path / "data"),
            "INTEGRATIONS_SHUTDOWN_GRACE": "1",
            **ENV_DEFAULTS,
        }
    )
