"""Picks and opens the store that DATABASE_URL names.

- `postgresql://…` or `postgres://…`: the PostgreSQL store.
- `sqlite:///<path>`: a SQLite file. As in SQLAlchemy, everything after the
  third slash is the path: `sqlite:///data/x.sqlite3` is relative to the
  working directory, `sqlite:////var/lib/x.sqlite3` is absolute.
- unset or empty: the embedded SQLite store, `<data_dir>/integrations.sqlite3`.

Error messages never repeat the URL: it may hold a password.
"""

from __future__ import annotations

from pathlib import Path

from integrations_service import errors
from integrations_service.store.base import IntegrationStore
from integrations_service.store.postgres import PostgresStore
from integrations_service.store.sqlite import SqliteStore

EMBEDDED_FILE_NAME = "integrations.sqlite3"

_POSTGRES_PREFIXES = ("postgresql://", "postgres://")
_SQLITE_PREFIX = "sqlite:///"


async def open_store(
    database_url: str | None,
    data_dir: Path,
    *,
    # The store's database timeout setting (INTEGRATIONS_DB_TIMEOUT), not a deadline for this call.
    timeout: float = 5.0,  # noqa: ASYNC109
    pool_size: int = 10,
    listen: bool = False,
) -> IntegrationStore:
    """Open the store named by `database_url`, migrated and ready.

    `timeout` bounds connecting to PostgreSQL and every later store call (all of its waits together);
    `pool_size` is its largest number of connections. Raises
    `errors.ConfigurationError` for a URL it cannot use and
    `errors.Unavailable` when the database cannot be reached.

    `listen`: on PostgreSQL, feed `changes()` from a LISTEN connection of its own (serving only).
    """
    if not database_url:
        return await SqliteStore.open(data_dir / EMBEDDED_FILE_NAME, timeout=timeout)
    if backend_name(database_url) == "postgres":
        return await PostgresStore.connect(
            database_url,
            min_size=1,
            max_size=pool_size,
            connect_timeout=timeout,
            command_timeout=timeout,
            listen=listen,
        )
    return await SqliteStore.open(sqlite_path(database_url), timeout=timeout)


def backend_name(database_url: str | None) -> str:
    """`postgres` or `sqlite`: which store `database_url` names (the embedded one when it is unset)."""
    return "postgres" if database_url and database_url.lower().startswith(_POSTGRES_PREFIXES) else "sqlite"


def sqlite_path(database_url: str) -> Path:
    """The file path of a `sqlite:///<path>` URL; ConfigurationError for any other URL."""
    if not database_url.lower().startswith(_SQLITE_PREFIX):
        raise errors.ConfigurationError(
            f"DATABASE_URL must start with postgresql://, postgres:// or sqlite:///, got {_scheme(database_url)}"
        )
    path = database_url[len(_SQLITE_PREFIX) :]
    if not path or "?" in path or "#" in path or path.endswith("/"):
        raise errors.ConfigurationError(
            "DATABASE_URL sqlite:///<path> must name a file (no query string), e.g. sqlite:///data/x.sqlite3"
        )
    return Path(path)


def _scheme(url: str) -> str:
    # Only a well-formed scheme before "://" is repeated; never userinfo or password.
    scheme, separator, _ = url.partition("://")
    if separator and scheme and scheme.replace("+", "").replace("-", "").replace(".", "").isalnum():
        return f"scheme {scheme!r}"
    return "a value without a URL scheme"
