"""Fixtures shared by every test: the PostgreSQL server and per-run databases.

PostgreSQL comes from INTEGRATIONS_TEST_POSTGRES_URL (an admin URL that may
CREATE DATABASE). Each run creates its own databases, named
integrations_test_<pid>_<hex>, and drops them at the end.

When the server cannot be reached, tests that need it fail under CI (env CI
set) and are skipped elsewhere, with a banner at the end of the run, so a green
local run never hides that the PostgreSQL half did not run.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import urlsplit, urlunsplit

import asyncpg  # type: ignore[import-untyped]
import pytest

from tests.leakwatch import leak_watch, no_secret_in_logs  # noqa: F401 (fixtures: the suite-wide leak check)

POSTGRES_URL_ENV = "INTEGRATIONS_TEST_POSTGRES_URL"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"

_SKIPPED_KEY = pytest.StashKey[str]()
_SKIP_PREFIX = "SKIPPING POSTGRESQL TESTS: "

CreateDatabase = Callable[[], Awaitable[str]]


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    """URL of a PostgreSQL role that may create and drop databases."""
    return os.environ.get(POSTGRES_URL_ENV) or DEFAULT_POSTGRES_URL


@pytest.fixture(scope="session")
async def postgres_server(postgres_admin_url: str, request: pytest.FixtureRequest) -> str:
    """The admin URL, once the server answers; else fail (CI) or skip loudly."""
    try:
        conn = await asyncpg.connect(postgres_admin_url, timeout=5)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        reason = (
            f"PostgreSQL is not reachable at {_redacted(postgres_admin_url)} ({type(error).__name__}); "
            f"start it or set {POSTGRES_URL_ENV}"
        )
        if os.environ.get("CI"):
            pytest.fail(f"CI is set, so PostgreSQL tests must run: {reason}", pytrace=False)
        request.config.stash[_SKIPPED_KEY] = reason
        pytest.skip(f"{_SKIP_PREFIX}{reason}")
    await conn.close()
    return postgres_admin_url


@pytest.fixture(scope="session")
async def postgres_database_factory(postgres_server: str) -> AsyncIterator[CreateDatabase]:
    """Creates fresh, empty databases on demand (returns their URL); drops them all at the end."""
    created: list[str] = []

    async def create() -> str:
        name = f"integrations_test_{os.getpid()}_{secrets.token_hex(4)}"
        await _admin_execute(postgres_server, f'CREATE DATABASE "{name}"')
        created.append(name)
        return _with_database(postgres_server, name)

    yield create
    # FORCE: a store a failed test left open must not keep the database alive. All at once: each
    # DROP DATABASE waits for a checkpoint, and concurrent ones share it (one after another, a run's
    # few dozen databases took 20 s to drop).
    room = asyncio.Semaphore(8)

    async def drop(name: str) -> None:
        async with room:
            await _admin_execute(postgres_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    failures = [
        outcome
        for outcome in await asyncio.gather(*(drop(name) for name in created), return_exceptions=True)
        if isinstance(outcome, BaseException)
    ]
    if failures:
        raise failures[0]


@pytest.fixture(scope="session")
async def postgres_database_url(postgres_database_factory: CreateDatabase) -> str:
    """URL of a database created for this test run (dropped at its end)."""
    return await postgres_database_factory()


# `make test` runs the suite on two processes (pytest-xdist, `-n 2 --dist loadfile`): each one has its own
# databases (named by its pid, above), temporary folders, ports and module fixtures. A file's tests stay
# on one process; files that build from the checkout itself (setuptools writes its build/ and *.egg-info
# there) also stay together, so that two builds never write those folders at once.
SAME_PROCESS = {
    "tests/integration/test_container.py": "builds from the checkout",
    "tests/integration/test_packaging.py": "builds from the checkout",
}


# Handed out first, so that no process is left with one of them at the end while the other is done.
LONGEST_FILES = (
    "tests/integration/test_typescript_client.py",
    "tests/integration/test_packaging.py",
    "tests/integration/test_container.py",
    "tests/integration/test_workers.py",
    "tests/integration/test_keys.py",
    "tests/integration/test_cli.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not hasattr(config, "workerinput"):  # only in a pytest-xdist worker; each one sorts alike
        return
    first = {path: rank for rank, path in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: first.get(item.nodeid.split("::", 1)[0], len(first)))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class ByFile(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return SAME_PROCESS.get(path, path)

    return ByFile(config, log)


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(_SkipBanner(config), "postgres-skip-banner")


class _SkipBanner:
    """Under pytest-xdist the skip happens in a worker: the controller learns of it from the test reports."""

    def __init__(self, config: pytest.Config) -> None:
        self._config = config

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.skipped and isinstance(report.longrepr, tuple) and _SKIP_PREFIX in str(report.longrepr[2]):
            reason = str(report.longrepr[2]).split(_SKIP_PREFIX, 1)[1]
            self._config.stash.setdefault(_SKIPPED_KEY, reason)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    reason = config.stash.get(_SKIPPED_KEY, None)
    if reason is None:
        return
    for _ in range(2):
        terminalreporter.write_sep("!", "POSTGRESQL TESTS WERE SKIPPED", red=True, bold=True)
    terminalreporter.write_line(reason, red=True, bold=True)
    terminalreporter.write_line(
        "This run did NOT test the production store. (Under CI this is a failure.)", red=True, bold=True
    )
    terminalreporter.write_sep("!", red=True, bold=True)


async def _admin_execute(admin_url: str, sql: str) -> None:
    conn = await asyncpg.connect(admin_url, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
