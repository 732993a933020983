"""The client tests' fixtures: a test module imports them to run its clients against the real service on an
SQLite file with the clients' environment defaults, and against a scriptable fake server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.client_fixtures import ENV_DEFAULTS, FakeServer, start_fake_server
from tests.harness import Running


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
