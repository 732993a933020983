"""Versioned schema migrations for both stores.

Migrations are the `NNNN_name.sql` files under `store/migrations/<dialect>/`,
read through importlib.resources so they are found in an installed wheel too.
Each is applied once, in version order, in its own transaction, and recorded in
`schema_migrations`. Running again applies nothing.

Several replicas may start at once against one database: on PostgreSQL the
whole run holds a session advisory lock, so the second replica waits and then
finds everything applied; on SQLite every migration runs under BEGIN IMMEDIATE
and re-checks what is applied once it holds the write lock.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Literal

import aiosqlite
from asyncpg.pool import PoolConnectionProxy

Dialect = Literal["postgres", "sqlite"]

# Key of the PostgreSQL session advisory lock held while migrating: the ASCII
# bytes "intgmigr" as a big-endian bigint (0x696E74676D696772). Advisory keys
# are database-wide, so it is fixed and documented to avoid clashing with other
# applications sharing the database. (Single-bigint keys never clash with the
# two-int4 keys the store uses for row locks: PostgreSQL keeps them apart.)
MIGRATION_LOCK_KEY = int.from_bytes(b"intgmigr", "big")

# Seconds a migration run may wait for another replica's run (the advisory
# lock) and a migration statement may take. Far above the store's per-query
# command timeout: waiting at start-up is the point, and an ALTER TABLE on a
# large table is slow.
MIGRATION_TIMEOUT = 300.0

_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations(dialect: Dialect) -> list[Migration]:
    """The dialect's migrations in version order; a duplicate version is a packaging bug."""
    folder = resources.files("integrations_service.store").joinpath("migrations", dialect)
    found: dict[int, Migration] = {}
    for entry in folder.iterdir():
        match = _FILE_NAME.match(entry.name)
        if not match:
            continue
        version = int(match.group(1))
        if version in found:
            raise RuntimeError(f"two {dialect} migrations have version {version}")
        found[version] = Migration(version, match.group(2), entry.read_text(encoding="utf-8"))
    return [found[version] for version in sorted(found)]


# --- PostgreSQL ---------------------------------------------------------------------------------

_PG_CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)
"""


async def migrate_postgres(conn: PoolConnectionProxy) -> list[int]:
    """Apply pending migrations on an asyncpg connection (not in a transaction); return their versions.

    Database errors propagate as asyncpg raised them; the store maps them.
    """
    # Session-level lock: it outlives the per-migration transactions, and
    # PostgreSQL drops it by itself if this connection dies mid-way.
    await conn.execute("SELECT pg_advisory_lock($1::bigint)", MIGRATION_LOCK_KEY, timeout=MIGRATION_TIMEOUT)
    try:
        await conn.execute(_PG_CREATE_LEDGER)
        applied = {int(row["version"]) for row in await conn.fetch("SELECT version FROM schema_migrations")}
        done: list[int] = []
        for migration in load_migrations("postgres"):
            if migration.version in applied:
                continue
            async with conn.transaction():
                # No arguments: asyncpg sends it as a simple query, which may hold several statements.
                await conn.execute(migration.sql, timeout=MIGRATION_TIMEOUT)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
            done.append(migration.version)
        return done
    finally:
        try:
            await conn.execute("SELECT pg_advisory_unlock($1::bigint)", MIGRATION_LOCK_KEY)
        except Exception:
            # The lock must not outlive this run on a pooled connection (the pool does not reset sessions):
            # the connection goes, and the lock with it. Not raised: it would hide the real error.
            conn.terminate()


# --- SQLite -------------------------------------------------------------------------------------

_SQLITE_CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at TEXT NOT NULL
)
"""


async def migrate_sqlite(conn: aiosqlite.Connection) -> list[int]:
    """Apply pending migrations on an autocommit (isolation_level=None) connection; return their versions."""
    await _sqlite_run(conn, _SQLITE_CREATE_LEDGER)
    done: list[int] = []
    for migration in load_migrations("sqlite"):
        if await _apply_sqlite(conn, migration):
            done.append(migration.version)
    return done


async def _apply_sqlite(conn: aiosqlite.Connection, migration: Migration) -> bool:
    # executescript() would COMMIT first, so the statements run one by one inside our transaction.
    await _sqlite_run(conn, "BEGIN IMMEDIATE")
    try:
        # Checked under the write lock: another process may have applied it meanwhile.
        query = "SELECT 1 FROM schema_migrations WHERE version = ?"
        async with conn.execute(query, (migration.version,)) as cursor:
            if await cursor.fetchone() is not None:
                await _sqlite_run(conn, "ROLLBACK")
                return False
        for statement in split_sqlite_script(migration.sql):
            await _sqlite_run(conn, statement)
        await _sqlite_run(
            conn,
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
            (migration.version, migration.name, datetime.now(UTC).isoformat(timespec="microseconds")),
        )
        await _sqlite_run(conn, "COMMIT")
    except BaseException:
        if conn.in_transaction:
            await _sqlite_run(conn, "ROLLBACK")
        raise
    return True


async def _sqlite_run(conn: aiosqlite.Connection, sql: str, parameters: tuple[object, ...] = ()) -> None:
    async with conn.execute(sql, parameters):
        pass  # closes the cursor right away


def split_sqlite_script(script: str) -> list[str]:
    """Split a script into statements; semicolons in strings, comments and triggers stay put."""
    statements: list[str] = []
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip())
            pending = ""
    if pending.strip(";").strip():
        raise RuntimeError("a SQLite migration ends with an incomplete statement")
    # Drops the empty statement after the last semicolon.
    return [s for s in statements if s.strip(";").strip()]
