"""The embedded store: one SQLite file, for development and single-instance use.

Two aiosqlite connections in autocommit mode, the file in WAL mode:
- the write connection, on which the store issues BEGIN IMMEDIATE / COMMIT /
  ROLLBACK itself. An asyncio.Lock serializes the writers of this process on it,
  and BEGIN IMMEDIATE (with busy_timeout) the writers of other processes sharing
  the file;
- the read connection, which reads the last committed state without waiting for
  any writer (WAL), so a writer blocked by another process's lock holds up no
  reader, and a read never sees an uncommitted write.

Every call runs within one budget (`store.budget`): the wait for the write
lock, SQLite's busy wait (busy_timeout is set to what is left of the budget)
and the statements together end within INTEGRATIONS_DB_TIMEOUT.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from integrations_service import errors
from integrations_service.store import rowmap
from integrations_service.store.base import (
    AuditEntry,
    AuditRecord,
    IntegrationStore,
    KeyRecord,
    Mutation,
    Precondition,
    Rewrite,
    StoredIntegration,
    StoredValue,
    UnreadableConfig,
)
from integrations_service.store.budget import Budget, bounded
from integrations_service.store.changes import ChangeFeed, ChangeHub, ConfigChanged
from integrations_service.store.migrate import migrate_sqlite

log = logging.getLogger("integrations.store.sqlite")

T = TypeVar("T")

UNAVAILABLE_MESSAGE = "the credential store (SQLite) is unavailable"

# The part of a writer's budget kept back from SQLite's busy wait, so SQLite gives up first and cleanly.
_BUSY_MARGIN = 0.05

# Primary result codes meaning the file cannot be used right now, as opposed to a bug in our SQL.
_UNAVAILABLE_CODES = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
    }
)

# Plain literals (no string building): every value travels as a bind parameter.
_SELECT_ONE = (
    "SELECT id, organization_id, provider, config, version, created_at, updated_at "
    "FROM integration_config WHERE organization_id = ? AND provider = ?"
)
# BINARY collation (the default): byte order, the same as the PostgreSQL store and Python's sorted().
_SELECT_ORGANIZATION = (
    "SELECT id, organization_id, provider, config, version, created_at, updated_at "
    "FROM integration_config WHERE organization_id = ? ORDER BY provider"
)
_INSERT = (
    "INSERT INTO integration_config "
    "(id, organization_id, provider, config, version, created_at, updated_at) "
    "VALUES (?, ?, ?, ?, 1, ?, ?)"
)
_UPDATE = "UPDATE integration_config SET config = ?, version = ?, updated_at = ? WHERE id = ?"
_DELETE = "DELETE FROM integration_config WHERE id = ?"
# Readiness: the file answers a query on a table of ours.
_PING = "SELECT 1 FROM integration_config LIMIT 1"

# Rotation, in id order (BINARY: byte order, as on PostgreSQL).
_SCAN = (
    "SELECT id, organization_id, provider, config, version, created_at, updated_at "
    "FROM integration_config WHERE id > ? ORDER BY id LIMIT ?"
)
# The ids travel as one JSON array parameter, so the statement stays a literal.
_SELECT_FOR_REWRAP = (
    "SELECT id, organization_id, provider, config, version, created_at, updated_at "
    "FROM integration_config WHERE id IN (SELECT value FROM json_each(?)) ORDER BY id"
)
# Only the ciphertext: version and updated_at stay, since the values are the same.
_REWRAP = "UPDATE integration_config SET config = ? WHERE id = ?"

# Keys.
_REGISTER_KEY = (
    "INSERT INTO encryption_keys (key_id, check_value, encryptions, created_at) VALUES (?, ?, 0, ?) "
    "ON CONFLICT (key_id) DO NOTHING"
)
_SELECT_KEYS = "SELECT key_id, check_value, encryptions, retired_at IS NOT NULL FROM encryption_keys ORDER BY key_id"
_ADD_ENCRYPTIONS = "UPDATE encryption_keys SET encryptions = encryptions + ? WHERE key_id = ?"
# COALESCE: retiring again keeps the first retirement time.
_RETIRE_KEY = "UPDATE encryption_keys SET retired_at = COALESCE(retired_at, ?) WHERE key_id = ?"

# Audit.
# Built from rowmap.AUDIT_COLUMNS only, the order of rowmap.audit_values; every value travels as a parameter.
_INSERT_AUDIT = (
    f"INSERT INTO audit_events ({', '.join(rowmap.AUDIT_COLUMNS)}) "  # noqa: S608
    f"VALUES ({', '.join('?' for _ in rowmap.AUDIT_COLUMNS)})"
)
_SELECT_AUDIT = (
    "SELECT id, time, caller, rpc, outcome, organization_id, provider, fields, request_id, details "
    "FROM audit_events WHERE id < ? ORDER BY id DESC LIMIT ?"
)
# Served by the (organization_id, id) index, read backwards.
_SELECT_AUDIT_ORGANIZATION = (
    "SELECT id, time, caller, rpc, outcome, organization_id, provider, fields, request_id, details "
    "FROM audit_events WHERE organization_id = ? AND id < ? ORDER BY id DESC LIMIT ?"
)
# list_audit's before_id 0 ("from the newest"): above every INTEGER id.
_NEWEST = 2**63 - 1


def is_unavailable_error(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return True
    if not isinstance(exc, sqlite3.Error):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(code, int) and (code & 0xFF) in _UNAVAILABLE_CODES


@contextlib.contextmanager
def _unavailable_on_io_error() -> Iterator[None]:
    """Wraps database calls only, so exceptions of caller callbacks pass through untouched."""
    try:
        yield
    except Exception as exc:
        if is_unavailable_error(exc):
            raise errors.Unavailable(UNAVAILABLE_MESSAGE) from exc
        raise


class SqliteStore(IntegrationStore):
    """Rows in a SQLite file. Create with `SqliteStore.open`."""

    def __init__(self, conn: aiosqlite.Connection, path: Path, timeout: float) -> None:
        self._conn = conn
        self._path = path
        self._reader: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self._timeout = timeout
        self._changes = ChangeHub(connected=True)

    @classmethod
    async def open(
        cls,
        path: str | Path,
        *,
        migrate: bool = True,
        timeout: float = 5.0,  # noqa: ASYNC109 (INTEGRATIONS_DB_TIMEOUT: the bound of every later call)
    ) -> SqliteStore:
        """Open (creating it, mode 0600, and its folder) the database file, then apply migrations."""
        path = Path(path)
        with _unavailable_on_io_error():
            await asyncio.to_thread(_prepare_file, path)
            conn = await aiosqlite.connect(path, isolation_level=None)
        store = cls(conn, path, timeout)
        try:
            with _unavailable_on_io_error():
                await store._configure()
            if migrate:
                await store.migrate()
        except BaseException:
            await store.close()
            raise
        return store

    async def migrate(self) -> list[int]:
        """Apply pending migrations; the versions applied (empty when up to date)."""
        async with self._lock:
            with _unavailable_on_io_error():
                return await migrate_sqlite(self._conn)

    async def ping(self) -> None:
        async with self._reading() as reader:
            await self._fetch_all(_PING, (), reader)

    async def get(self, organization_id: str, provider: str) -> StoredIntegration | None:
        async with self._reading() as reader:
            return await self._fetch_row(organization_id, provider, reader)

    async def list_for_organization(self, organization_id: str) -> list[StoredIntegration]:
        async with self._reading() as reader:
            rows = await self._fetch_all(_SELECT_ORGANIZATION, (organization_id,), reader)
        return [_to_stored(row) for row in rows]

    async def upsert(
        self, organization_id: str, provider: str, mutate: Mutation, audit: AuditRecord | None = None
    ) -> StoredIntegration:
        async with self._write_transaction():
            current = await self._fetch_row(organization_id, provider)
            config = dict(mutate(current))  # raising rolls back: nothing changes, no audit
            row = await self._write(organization_id, provider, current, config)
            if audit is not None:
                await self._insert_audit([audit])
        self._changes.publish(ConfigChanged.saved(row))  # committed
        return row

    async def delete(
        self, organization_id: str, provider: str, check: Precondition, audit: AuditRecord | None = None
    ) -> bool:
        async with self._write_transaction():
            current = await self._fetch_row(organization_id, provider)
            if current is not None:
                check(current)  # raising rolls back: the row stays
                with _unavailable_on_io_error():
                    await self._execute(_DELETE, (current.id,))
                if audit is not None:
                    await self._insert_audit([audit])
        if current is not None:  # committed
            self._changes.publish(ConfigChanged.deleted(current, datetime.now(UTC)))
        return current is not None

    # --- rotation -------------------------------------------------------------------------------

    async def scan(self, after_id: str, limit: int) -> list[StoredIntegration]:
        if limit < 1:
            return []
        async with self._reading() as reader:
            rows = await self._fetch_all(_SCAN, (after_id, limit), reader)
        return [_to_stored(row) for row in rows]

    async def rewrap(self, ids: Sequence[str], rewrite: Rewrite, audit: AuditRecord | None = None) -> int:
        wanted = sorted(set(ids))
        if not wanted and audit is None:
            return 0
        async with self._write_transaction():
            # BEGIN IMMEDIATE holds the write lock: no row read here changes before the commit.
            rows = await self._fetch_all(_SELECT_FOR_REWRAP, (json.dumps(wanted),))
            changes: list[tuple[str, str]] = []
            rewrapped: list[StoredIntegration] = []
            for raw in rows:
                row = _to_stored(raw)
                config = rewrite(row)  # raising rolls back: nothing changes
                if config is not None:
                    changes.append((_encode(config), row.id))
                    rewrapped.append(row)
            if changes:
                await self._execute_many(_REWRAP, changes)
            if audit is not None:
                await self._insert_audit([audit])
        for row in rewrapped:  # committed
            self._changes.publish(ConfigChanged.rewrapped(row))
        return len(changes)

    # --- keys -----------------------------------------------------------------------------------

    async def list_keys(self) -> list[KeyRecord]:
        async with self._reading() as reader:
            rows = await self._fetch_all(_SELECT_KEYS, (), reader)
        return [_to_key(row) for row in rows]

    async def register_keys(self, check_values: Mapping[str, str]) -> list[KeyRecord]:
        if not check_values:
            return await self.list_keys()
        created = _text(datetime.now(UTC))
        parameters = [(key_id, check_values[key_id], created) for key_id in sorted(check_values)]
        async with self._write_transaction():
            await self._execute_many(_REGISTER_KEY, parameters)
            rows = await self._fetch_all(_SELECT_KEYS)
        return [_to_key(row) for row in rows]

    async def add_encryptions(self, counts: Mapping[str, int]) -> None:
        parameters = [(count, key_id) for key_id, count in rowmap.encryption_counts(counts)]
        if not parameters:
            return
        async with self._write_transaction():
            await self._execute_many(_ADD_ENCRYPTIONS, parameters)

    async def retire_key(self, key_id: str) -> None:
        async with self._write_transaction():
            with _unavailable_on_io_error():
                await self._execute(_RETIRE_KEY, (_text(datetime.now(UTC)), key_id))

    # --- audit ----------------------------------------------------------------------------------

    async def append_audit(self, records: Sequence[AuditRecord]) -> None:
        """Raises `errors.StoreRejected` when SQLite refuses the records themselves (retrying cannot help)."""
        if not records:
            return
        try:
            async with self._write_transaction():
                await self._insert_audit(records)
        except (sqlite3.Error, UnicodeError) as exc:
            # I/O and lock errors became Unavailable on the way out; what is left is about the data, such as
            # text Python cannot encode (a lone surrogate). The message may quote the value: only the class travels.
            raise errors.StoreRejected(f"SQLite refused the audit records ({type(exc).__name__})") from None

    async def list_audit(self, organization_id: str, before_id: int, limit: int) -> list[AuditEntry]:
        if limit < 1:
            return []
        before = before_id if before_id > 0 else _NEWEST
        async with self._reading() as reader:
            if organization_id:
                rows = await self._fetch_all(_SELECT_AUDIT_ORGANIZATION, (organization_id, before, limit), reader)
            else:
                rows = await self._fetch_all(_SELECT_AUDIT, (before, limit), reader)
        return [_to_audit_entry(row) for row in rows]

    def changes(self) -> ChangeFeed:
        """This store's own writes, published after they commit.

        SQLite has no notifications: writes by another process (or another
        store) on the same file are not seen here.
        """
        return self._changes

    async def close(self) -> None:
        self._changes.close()
        # Safe to call twice; a failure to close is not worth failing shutdown over.
        for conn in (self._reader, self._conn):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()

    # --- internals ------------------------------------------------------------------------------

    async def _configure(self) -> None:
        # WAL: readers (ours and other processes') and the writer do not block each other.
        # busy_timeout: wait for another process's write lock instead of failing at
        # once; each write transaction sets it again from what is left of its budget.
        await self._execute("PRAGMA journal_mode = WAL")
        await self._execute(_busy_timeout(self._timeout))
        self._reader = await aiosqlite.connect(self._path, isolation_level=None)
        # A reader waits only in rare cases (a WAL being recovered), never beyond the timeout.
        async with self._reader.execute(_busy_timeout(self._timeout)):
            pass  # closes the cursor right away

    @contextlib.asynccontextmanager
    async def _reading(self) -> AsyncIterator[aiosqlite.Connection]:
        """The read connection, within the call's budget; it waits for no writer (WAL)."""
        async with bounded(self._timeout):
            if self._reader is None:  # pragma: no cover (open() sets it before returning the store)
                raise errors.Unavailable(UNAVAILABLE_MESSAGE)
            yield self._reader

    async def _execute(self, sql: str, parameters: tuple[object, ...] = ()) -> None:
        async with self._conn.execute(sql, parameters):
            pass  # closes the cursor right away

    async def _execute_many(self, sql: str, parameters: Iterable[tuple[object, ...]]) -> None:
        with _unavailable_on_io_error():
            async with self._conn.executemany(sql, parameters):
                pass  # closes the cursor right away

    async def _fetch_all(
        self, sql: str, parameters: tuple[object, ...] = (), conn: aiosqlite.Connection | None = None
    ) -> list[Any]:
        """On `conn`, else on the write connection (inside a write transaction)."""
        with _unavailable_on_io_error():
            async with (conn or self._conn).execute(sql, parameters) as cursor:
                return list(await cursor.fetchall())

    async def _insert_audit(self, records: Sequence[AuditRecord]) -> None:
        """In the caller's transaction: one statement, executed for every record."""
        await self._execute_many(_INSERT_AUDIT, [_audit_parameters(record) for record in records])

    @contextlib.asynccontextmanager
    async def _write_transaction(self) -> AsyncIterator[None]:
        """Under the lock, BEGIN IMMEDIATE; commit when the block ends, else roll back and re-raise unchanged.

        The wait for the lock, for another process's write lock and the block
        together stay within the call's budget. A caller cancelled anywhere in
        it (its client went away, its budget ran out) leaves its change
        committed whole or not at all, and the connection outside any
        transaction: BEGIN, COMMIT and ROLLBACK each run to their end, and the
        lock is released only after them.
        """
        async with bounded(self._timeout) as budget, self._lock:
            await self._begin(budget)
            try:
                yield
            except BaseException:
                await self._rollback_quietly()
                raise
            await self._commit()

    async def _begin(self, budget: Budget) -> None:
        if self._conn.in_transaction:
            # Never expected: every holder of the lock ends its transaction before releasing it.
            log.error(
                "the SQLite write connection was left inside a transaction; rolling it back",
                extra={"event": "sqlite_transaction_left_open"},
            )
            await self._rollback_quietly()
        try:
            with _unavailable_on_io_error():
                await _to_the_end(self._begin_immediate(budget))
        except BaseException as exc:
            if self._conn.in_transaction:  # BEGIN ran, then the caller was cancelled
                await self._rollback_quietly()
            if isinstance(exc, errors.Unavailable) and _is_busy(exc.__cause__):
                # Another process held the write lock for all of the budget.
                raise budget.exceeded() from exc.__cause__
            raise

    async def _begin_immediate(self, budget: Budget) -> None:
        # IMMEDIATE takes the write lock now, so the row read next cannot change before our write.
        # busy_timeout bounds its wait for another process's lock by what is left of the budget.
        await self._execute(_busy_timeout(budget.remaining() - _BUSY_MARGIN))
        await self._execute("BEGIN IMMEDIATE")

    async def _commit(self) -> None:
        try:
            with _unavailable_on_io_error():
                await _to_the_end(self._execute("COMMIT"))
        except BaseException:
            # A COMMIT that failed (the file busy, full or gone) leaves the transaction open;
            # one that ran before a cancellation arrived leaves nothing to roll back.
            if self._conn.in_transaction:
                await self._rollback_quietly()
            raise

    async def _rollback_quietly(self) -> None:
        # The caller must see the original exception; a failed rollback of a
        # broken file leaves nothing committed anyway. Always sent, even when no
        # transaction seems open: a statement of a cut-off block may still be
        # queued on the connection's thread, and the ROLLBACK runs after it.
        with contextlib.suppress(Exception):
            await _to_the_end(self._execute("ROLLBACK"))
        if self._conn.in_transaction:
            log.error(
                "the SQLite write connection could not roll back its transaction",
                extra={"event": "sqlite_rollback_failed"},
            )

    async def _fetch_row(
        self, organization_id: str, provider: str, conn: aiosqlite.Connection | None = None
    ) -> StoredIntegration | None:
        with _unavailable_on_io_error():
            async with (conn or self._conn).execute(_SELECT_ONE, (organization_id, provider)) as cursor:
                row = await cursor.fetchone()
        return _to_stored(row) if row is not None else None

    async def _write(
        self,
        organization_id: str,
        provider: str,
        current: StoredIntegration | None,
        config: dict[str, StoredValue],
    ) -> StoredIntegration:
        now = datetime.now(UTC)
        if current is None:
            row = StoredIntegration(uuid.uuid4().hex, organization_id, provider, config, 1, now, now)
            parameters: tuple[object, ...] = (
                row.id,
                organization_id,
                provider,
                _encode(config),
                _text(now),
                _text(now),
            )
        else:
            # updated_at grows with every write even if the clock stalls or steps back.
            updated = max(now, current.updated_at + timedelta(microseconds=1))
            row = StoredIntegration(
                current.id, organization_id, provider, config, current.version + 1, current.created_at, updated
            )
            parameters = (_encode(config), row.version, _text(updated), current.id)
        with _unavailable_on_io_error():
            await self._execute(_INSERT if current is None else _UPDATE, parameters)
        return row


async def _to_the_end(statement: Awaitable[T]) -> T:
    """Await `statement` to its end even if the caller is cancelled meanwhile, then pass the cancellation on.

    aiosqlite runs a queued statement on the connection's thread whether or not
    anyone still awaits it, so a caller that stopped waiting could not know
    whether its BEGIN or COMMIT had run. The wait stays short: a statement on
    the local file, or a BEGIN whose busy wait ends with the call's budget.
    """
    task = asyncio.ensure_future(statement)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError as exc:
        if task.done() and not task.cancelled():
            raise  # the statement ran: the cancellation came after it
        cancelled = exc
    while not task.done():
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError as exc:
            cancelled = exc
    if not task.cancelled():
        task.exception()  # retrieved: the cancellation is what the caller sees
    raise cancelled


def _busy_timeout(seconds: float) -> str:
    # A computed integer only: PRAGMA takes no bind parameters.
    return f"PRAGMA busy_timeout = {max(1, int(seconds * 1000))}"


def _is_busy(exc: BaseException | None) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(code, int) and (code & 0xFF) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _prepare_file(path: Path) -> None:
    """Create the folder and an empty 0600 database file, before SQLite creates one with the umask's mode."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # O_EXCL: an existing file keeps its mode; only a file we create gets 0600.
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _encode(config: Mapping[str, str]) -> str:
    return rowmap.json_text(dict(config))


def _text(moment: datetime) -> str:
    """ISO text in UTC; a naive time is taken to be UTC already (as the PostgreSQL store does)."""
    return rowmap.utc(moment).isoformat(timespec="microseconds")


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _to_stored(row: Iterable[Any]) -> StoredIntegration:
    id_, organization_id, provider, config, version, created_at, updated_at = tuple(row)
    return rowmap.integration(
        id_=id_,
        organization_id=organization_id,
        provider=provider,
        config=_decode(str(config)),
        version=version,
        created_at=_parse_time(str(created_at)),
        updated_at=_parse_time(str(updated_at)),
    )


def _to_key(row: Iterable[Any]) -> KeyRecord:
    key_id, check_value, encryptions, retired = tuple(row)
    return rowmap.key_record(key_id=key_id, check_value=check_value, encryptions=encryptions, retired=retired)


def _audit_parameters(record: AuditRecord) -> tuple[object, ...]:
    return tuple(_as_sqlite(value) for value in rowmap.audit_values(record))


def _as_sqlite(value: object) -> object:
    """A time as ISO text, JSON (a list or an object) as its text, the rest as it is."""
    if isinstance(value, datetime):
        return _text(value)
    if isinstance(value, list | dict):
        return rowmap.json_text(value)
    return value


def _to_audit_entry(row: Iterable[Any]) -> AuditEntry:
    id_, time, caller, rpc, outcome, organization_id, provider, fields, request_id, details = tuple(row)
    return rowmap.audit_entry(
        id_=id_,
        time=_parse_time(str(time)),
        caller=caller,
        rpc=rpc,
        outcome=outcome,
        organization_id=organization_id,
        provider=provider,
        fields=json.loads(str(fields)) if fields is not None else None,
        request_id=request_id,
        details=json.loads(str(details)) if details is not None else None,
    )


def _decode(text: str) -> object:
    """The config column's JSON, decoded; unreadable when it is not JSON at all."""
    try:
        return json.loads(text)
    except ValueError:
        return UnreadableConfig("is not valid JSON")
