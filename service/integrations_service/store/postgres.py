"""The PostgreSQL store: the production backend, over an asyncpg pool.

Connection failures of any kind surface as `errors.Unavailable` with a fixed
message (never the DSN, never row content). The pool replaces dead connections
by itself, so the store recovers once PostgreSQL is back without being rebuilt.

Every call runs within one budget (`store.budget`): the wait for its turn
behind other saves of the same row, for a pooled connection, for locks and for
its statements together end within INTEGRATIONS_DB_TIMEOUT (or the RPC's nearer
deadline). Inside a transaction PostgreSQL's own lock_timeout and
statement_timeout are set to what is left, so the server gives up on its side too.
Saves and deletes of one (organization, provider) queue in the process, so a
row locked from outside holds at most one pooled connection, however many
saves of it wait.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from asyncpg.transaction import Transaction

from integrations_service import errors
from integrations_service.store import rowmap
from integrations_service.store.base import (
    AuditEntry,
    AuditRecord,
    IntegrationStore,
    KeyRecord,
    Mutation,
    PoolStats,
    Precondition,
    Rewrite,
    StoredIntegration,
)
from integrations_service.store.budget import Budget, KeyedLocks, bounded
from integrations_service.store.changes import ChangeFeed, ChangeHub
from integrations_service.store.migrate import migrate_postgres
from integrations_service.store.postgres_listener import PostgresChangeListener

log = logging.getLogger("integrations.store.postgres")

T = TypeVar("T")

UNAVAILABLE_MESSAGE = "the credential store (PostgreSQL) is unreachable"

# First key of the per-row transaction advisory lock, pg_advisory_xact_lock(int4, int4):
# the ASCII bytes "intg" (0x696E7467). The second key is hashtext(org || '/' || provider).
# A hash collision only makes two unrelated rows' writers wait for each other.
ROW_LOCK_NAMESPACE = int.from_bytes(b"intg", "big")

# SQLSTATE classes that mean "the database cannot serve us right now" (an outage,
# retryable once it is over), as opposed to a bug in our SQL or bad data:
# 08 connection exception; 28 invalid authorization (the login was revoked or its
#    password changed while running; at the first connect it is a ConfigurationError);
# 3D invalid catalog name (the database was renamed or dropped while running; idem);
# 53 insufficient resources (too many connections, disk full, out of memory);
# 55 object not in prerequisite state (55000: the database does not allow
#    connections; 55P03: a lock wait hit lock_timeout);
# 57 operator intervention (shutdown, restart in progress, 57014: statement_timeout);
# 58 system error (I/O error on the server).
_UNAVAILABLE_SQLSTATE_CLASSES = ("08", "28", "3D", "53", "55", "57", "58")
# Single codes of other classes that mean the same: 25006, a read-only transaction
# (connected to a standby, e.g. during a failover).
_UNAVAILABLE_SQLSTATES = ("25006",)
# The server gave up waiting because this call's budget ran out: lock_timeout, statement_timeout.
_TIMEOUT_SQLSTATES = ("55P03", "57014")
# Margin between the server-side timeouts and the call's own end, so the server
# answers first and the connection stays usable.
_SERVER_TIMEOUT_MARGIN = 0.1
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,  # asyncio.TimeoutError is the same class since Python 3.11
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.exceptions.AdminShutdownError,
    # A pooled connection that received the server's "terminating connection"
    # message while idle, but not yet the end of the stream, refuses the next
    # query with "cannot switch to state N; another operation (2) is in
    # progress" (MagicStack/asyncpg#1069). It is as dead as a closed one.
    asyncpg.exceptions.InternalClientError,
)
# Failures that mean "this pooled connection was dead", which a read can retry
# once on a fresh connection. Timeouts are not among them: retrying doubles the wait.
_DEAD_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.ConnectionFailureError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    ConnectionResetError,
    BrokenPipeError,
)
# Failures of a pooled connection that asyncpg raises before sending anything: the statement did
# not run, so even a write may be sent again on a fresh connection.
_UNSENT_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
)
# Login or database errors at connect time: waiting will not fix them.
_CONFIGURATION_SQLSTATE_CLASSES = ("28", "3D")
# A second insert of the same (organization, provider) by a writer that bypassed
# the advisory lock (e.g. a legacy dashboard) makes the upsert start over this many times.
_UPSERT_ATTEMPTS = 3
# Conditional writes a save of an existing row tries (each from the row as stored when the previous
# one found it changed) before it locks the row and writes under the lock.
_OPTIMISTIC_ATTEMPTS = 3
# The rows this process last read or wrote for a save, which the next save of the row tries first
# (one round trip instead of two). Only a guess: the write checks it, so a stale one costs one
# retry. Bounded in number, and in age well below the 2^31 transactions after which an xmin repeats.
_REMEMBERED_ROWS = 10_000
_REMEMBERED_FOR = 60.0

# Plain literals (no string building): every value travels as a bind parameter.
_SELECT_ONE = (
    "SELECT id, organization_id, provider, config, version, created_at, updated_at "
    "FROM integration_config WHERE organization_id = $1 AND provider = $2"
)
_SELECT_ONE_FOR_UPDATE = _SELECT_ONE + " FOR UPDATE"
# COLLATE "C": byte order, the same as the SQLite store and Python's sorted().
_SELECT_ORGANIZATION = (
    "SELECT id, organization_id, provider, config, version, created_at, updated_at "
    'FROM integration_config WHERE organization_id = $1 ORDER BY provider COLLATE "C"'
)
_LOCK_KEY = "SELECT pg_advisory_xact_lock($1::int4, hashtext($2 || '/' || $3))"
# One clock reading for both timestamps of a new row.
_INSERT = (
    "INSERT INTO integration_config "
    "(id, organization_id, provider, config, version, created_at, updated_at) "
    "SELECT $1, $2, $3, $4::jsonb, 1, ts, ts FROM clock_timestamp() AS ts "
    "RETURNING id, organization_id, provider, config, version, created_at, updated_at, xmin AS row_xmin"
)
# GREATEST: updated_at grows with every write even if the clock stalls or steps back.
_UPDATE = (
    "UPDATE integration_config SET config = $2::jsonb, version = version + 1, "
    "updated_at = GREATEST(clock_timestamp(), updated_at + interval '1 microsecond') "
    "WHERE id = $1 "
    "RETURNING id, organization_id, provider, config, version, created_at, updated_at, xmin AS row_xmin"
)
_DELETE = "DELETE FROM integration_config WHERE id = $1"
# The optimistic save (migration 0005): the row as a save reads it, with the transaction that wrote it
# (xmin); then one statement that writes the row and its audit record only if it is still that row.
_SELECT_FOR_SAVE = (
    "SELECT id, organization_id, provider, config, version, created_at, updated_at, xmin AS row_xmin "
    "FROM integration_config WHERE organization_id = $1 AND provider = $2"
)
_SAVE_IF_UNCHANGED = (
    "SELECT written, id, organization_id, provider, config, version, created_at, updated_at, row_xmin "
    "FROM integrations_save_if_unchanged($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)"
)
# What the optimistic save passes for the audit columns when it records nothing.
_NO_AUDIT = (None,) * len(rowmap.AUDIT_COLUMNS)
# Readiness: the database answers a query.
_PING = "SELECT 1"

# Rotation. Byte order of id (COLLATE "C", served by the integration_config_id_bytes index):
# the same order as the SQLite store and Python's sorted().
_SCAN = (
    "SELECT id, organization_id, provider, config, version, created_at, updated_at "
    'FROM integration_config WHERE id > $1 COLLATE "C" ORDER BY id COLLATE "C" LIMIT $2'
)
# The locking clause runs after the sort, so rows are locked in id order: two
# batches sharing rows cannot deadlock. Rows deleted meanwhile are not returned,
# and a row updated meanwhile is returned as committed by that update.
_SELECT_FOR_REWRAP = (
    "SELECT id, organization_id, provider, config, version, created_at, updated_at "
    'FROM integration_config WHERE id = ANY($1::text[]) ORDER BY id COLLATE "C" FOR UPDATE'
)
# Only the ciphertext: version and updated_at stay, since the values are the same.
_REWRAP = "UPDATE integration_config SET config = $2::jsonb WHERE id = $1"
# Marks this transaction's updates as rewraps (migration 0004): without it, the table's trigger
# moves the version of an update that changes `config` and keeps `version`, as a foreign writer's.
_MARK_REWRAP = "SELECT set_config('integrations.rewrap', 'on', true)"

# Keys.
_REGISTER_KEY = "INSERT INTO encryption_keys (key_id, check_value) VALUES ($1, $2) ON CONFLICT (key_id) DO NOTHING"
_SELECT_KEYS = (
    "SELECT key_id, check_value, encryptions, retired_at IS NOT NULL AS retired "
    'FROM encryption_keys ORDER BY key_id COLLATE "C"'
)
_ADD_ENCRYPTIONS = "UPDATE encryption_keys SET encryptions = encryptions + $2 WHERE key_id = $1"
# COALESCE: retiring again keeps the first retirement time.
_RETIRE_KEY = "UPDATE encryption_keys SET retired_at = COALESCE(retired_at, now()) WHERE key_id = $1"

# Audit. Each column with the cast of its parameter (JSON travels as text), in the order of
# rowmap.audit_values: the one list both the statements and their parameters follow.
_AUDIT_CASTS = tuple(
    (column, "::jsonb" if column in rowmap.AUDIT_JSON_COLUMNS else "") for column in rowmap.AUDIT_COLUMNS
)


def _audit_insert(first_parameter: int) -> str:
    """The insert of one audit row whose parameters are numbered from `first_parameter`."""
    columns = ", ".join(column for column, _ in _AUDIT_CASTS)
    values = ", ".join(f"${first_parameter + offset}{cast}" for offset, (_, cast) in enumerate(_AUDIT_CASTS))
    # Built from this module's constants only; every value travels as a parameter.
    return f"INSERT INTO audit_events ({columns}) VALUES ({values})"  # noqa: S608


def _with_audit(statement: str) -> str:
    """`statement` and the audit row it records, in one round trip while the row lock is held.

    The audit parameters follow the statement's own. A data-modifying WITH
    clause always runs to completion, in the same transaction.
    """
    first_parameter = max(int(number) for number in re.findall(r"\$(\d+)", statement)) + 1
    return f"WITH audited AS ({_audit_insert(first_parameter)}) {statement}"


def _audit_batch_insert() -> str:
    """The insert of every audit row of a batch from one JSON array of records, ids given in its order.

    One statement instead of one execution per record: a flush of a busy second's decrypted reads is
    thousands of records, and PostgreSQL shares the cores with the service.
    """
    columns = ", ".join(rowmap.AUDIT_COLUMNS)
    selected = ", ".join(f"r.{column}" for column in rowmap.AUDIT_COLUMNS)
    # Built from this module's constants only; the records travel as the one parameter.
    return (
        f"INSERT INTO audit_events ({columns}) SELECT {selected} "  # noqa: S608
        "FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS e(record, n), "
        "jsonb_populate_record(NULL::audit_events, e.record) AS r ORDER BY e.n"
    )


_INSERT_AUDIT = _audit_batch_insert()
_INSERT_AUDITED = _with_audit(_INSERT)
_UPDATE_AUDITED = _with_audit(_UPDATE)
_SELECT_AUDIT = (
    "SELECT id, time, caller, rpc, outcome, organization_id, provider, fields, request_id, details "
    "FROM audit_events WHERE id < $1 ORDER BY id DESC LIMIT $2"
)
# Served by the (organization_id, id) index, read backwards.
_SELECT_AUDIT_ORGANIZATION = (
    "SELECT id, time, caller, rpc, outcome, organization_id, provider, fields, request_id, details "
    "FROM audit_events WHERE organization_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3"
)
# list_audit's before_id 0 ("from the newest"): above every BIGINT id.
_NEWEST = 2**63 - 1


def is_connection_error(exc: BaseException) -> bool:
    if isinstance(exc, asyncpg.exceptions.ClientConfigurationError):
        return False
    if isinstance(exc, _CONNECTION_ERRORS):
        return True
    if not isinstance(exc, asyncpg.PostgresError):
        return False
    return _sqlstate_class(exc) in _UNAVAILABLE_SQLSTATE_CLASSES or exc.sqlstate in _UNAVAILABLE_SQLSTATES


def _is_timeout(exc: BaseException | None) -> bool:
    """The wait ran out: asyncpg's command timeout, or the server's lock or statement timeout."""
    return isinstance(exc, TimeoutError) or _server_gave_up(exc)


def _sqlstate_class(exc: BaseException) -> str:
    sqlstate = getattr(exc, "sqlstate", None)
    return sqlstate[:2] if isinstance(sqlstate, str) else ""


@contextlib.contextmanager
def _unavailable_on_connection_error() -> Iterator[None]:
    """Wraps database calls only, so exceptions of caller callbacks pass through untouched."""
    try:
        yield
    except Exception as exc:
        if is_connection_error(exc):
            raise errors.Unavailable(UNAVAILABLE_MESSAGE) from exc
        raise


async def _init_connection(conn: asyncpg.Connection) -> None:
    # Every pooled connection (including replacements after a restart) decodes
    # JSONB to Python objects and encodes dicts, so config round-trips as a dict.
    await conn.set_type_codec("jsonb", encoder=rowmap.json_text, decoder=json.loads, schema="pg_catalog")


class PostgresStore(IntegrationStore):
    """Rows in PostgreSQL's `integration_config` table. Create with `PostgresStore.connect`."""

    def __init__(self, pool: asyncpg.Pool, *, close_timeout: float, timeout: float = 5.0) -> None:
        self._pool = pool
        self._close_timeout = close_timeout
        self._timeout = timeout
        self._writers = KeyedLocks()
        # (organization, provider) -> the row as this process last read or wrote it for a save.
        self._remembered: collections.OrderedDict[tuple[str, str], _Seen] = collections.OrderedDict()
        # Disconnected until a listener feeds it: connect(listen=True).
        self._changes = ChangeHub(connected=False)
        self._listener: PostgresChangeListener | None = None

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        connect_timeout: float = 5.0,
        command_timeout: float = 5.0,
        migrate: bool = True,
        listen: bool = False,
    ) -> PostgresStore:
        """Open the pool, retrying for up to `connect_timeout` seconds, then apply migrations.

        Raises `errors.Unavailable` when PostgreSQL cannot be reached in time, and
        `errors.ConfigurationError` when the DSN is malformed or the login or
        database is refused. `listen`: feed `changes()` from a LISTEN connection
        of its own (a serving process; one-shot commands need none).
        """
        pool = await _create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            connect_timeout=connect_timeout,
            command_timeout=command_timeout,
        )
        # In-flight calls end within command_timeout; give close a little more.
        store = cls(pool, close_timeout=command_timeout + 1.0, timeout=command_timeout)
        if migrate:
            try:
                await store.migrate()
            except BaseException:
                await store.close()
                raise
        if listen:  # after the migrations: the trigger exists
            store._listener = await PostgresChangeListener.start(dsn, store._changes, timeout=connect_timeout)
        return store

    async def migrate(self) -> list[int]:
        """Apply pending migrations; the versions applied (empty when up to date)."""
        async with self._connection() as conn:
            with _unavailable_on_connection_error():
                applied = await migrate_postgres(conn)
        if applied:
            log.info("applied migrations", extra={"event": "migrated", "versions": applied})
        return applied

    async def get(self, organization_id: str, provider: str) -> StoredIntegration | None:
        async def query(conn: PoolConnectionProxy) -> StoredIntegration | None:
            record = await conn.fetchrow(_SELECT_ONE, organization_id, provider)
            return _to_stored(record) if record is not None else None

        return await self._read(query)

    async def list_for_organization(self, organization_id: str) -> list[StoredIntegration]:
        async def query(conn: PoolConnectionProxy) -> list[StoredIntegration]:
            records = await conn.fetch(_SELECT_ORGANIZATION, organization_id)
            return [_to_stored(record) for record in records]

        return await self._read(query)

    async def upsert(
        self, organization_id: str, provider: str, mutate: Mutation, audit: AuditRecord | None = None
    ) -> StoredIntegration:
        """An existing row: optimistically, in one statement; a new row, or after conflicts: under the row lock.

        The optimistic save runs `mutate` on the row as it was read (remembered from this process's last
        save of it, or read now), then writes the result and its audit record in one statement that
        changes the row only if it is still exactly that row (migration 0005). Writers of one row queue
        in this process, so only writers elsewhere (other replicas, `rotate`, the dashboard, SQL) can make
        it find the row changed: it then tries again from the row as it found it, and after
        _OPTIMISTIC_ATTEMPTS locks the row as every first save does. `mutate` decides (etag, cross-field
        rules) on a row that was current when read, or that the write then proves current: a refusal
        on a remembered row, which may be stale, is asked again of the row as stored.
        """
        key = (organization_id, provider)
        async with self._bounded() as budget, self._writers.hold(key):
            seen = self._remembered_row(key)
            guessed = seen is not None
            if seen is None:
                seen = await self._read_for_save(organization_id, provider)
            for _ in range(_OPTIMISTIC_ATTEMPTS):
                if seen is None:
                    break  # no row: the first save inserts it under the row lock
                try:
                    config = dict(mutate(seen.row))
                except Exception:
                    if not guessed:
                        raise  # refused on the row as stored: nothing was written
                    guessed = False
                    seen = await self._read_for_save(organization_id, provider)
                    continue
                written, seen = await self._save_if_unchanged(seen, config, audit, budget)
                guessed = False
                if written:
                    assert seen is not None  # a written row comes back
                    self._remember(key, seen)
                    return seen.row
            self._forget(key)
            for attempt in range(1, _UPSERT_ATTEMPTS + 1):
                try:
                    saved = await self._upsert_once(organization_id, provider, mutate, audit)
                except asyncpg.UniqueViolationError:
                    if attempt == _UPSERT_ATTEMPTS:
                        break
                    continue
                self._remember(key, saved)
                return saved.row
        raise errors.Conflict(
            f"the credentials of organization {organization_id!r} for provider {provider!r} "
            "keep being created concurrently; retry"
        )

    async def delete(
        self, organization_id: str, provider: str, check: Precondition, audit: AuditRecord | None = None
    ) -> bool:
        self._forget((organization_id, provider))
        async with self._bounded(), self._writers.hold((organization_id, provider)), self._transaction() as conn:
            current = await self._lock_row(conn, organization_id, provider)
            if current is None:
                return False
            check(current)  # raising rolls back: the row stays
            with _unavailable_on_connection_error():
                await conn.execute(_DELETE, current.id)
                if audit is not None:
                    await _insert_audit(conn, [audit])
        return True

    # --- rotation -------------------------------------------------------------------------------

    async def scan(self, after_id: str, limit: int) -> list[StoredIntegration]:
        if limit < 1:
            return []

        async def query(conn: PoolConnectionProxy) -> list[StoredIntegration]:
            records = await conn.fetch(_SCAN, after_id, limit)
            return [_to_stored(record) for record in records]

        return await self._read(query)

    async def rewrap(self, ids: Sequence[str], rewrite: Rewrite, audit: AuditRecord | None = None) -> int:
        wanted = sorted(set(ids))
        if not wanted and audit is None:
            return 0
        async with self._transaction() as conn:
            with _unavailable_on_connection_error():
                records = await conn.fetch(_SELECT_FOR_REWRAP, wanted)
            changes: list[tuple[str, dict[str, str]]] = []
            for record in records:
                row = _to_stored(record)
                config = rewrite(row)  # raising rolls back: nothing changes
                if config is not None:
                    changes.append((row.id, dict(config)))
            with _unavailable_on_connection_error():
                if changes:
                    await conn.execute(_MARK_REWRAP)
                    await conn.executemany(_REWRAP, changes)
                if audit is not None:
                    await _insert_audit(conn, [audit])
        return len(changes)

    # --- keys -----------------------------------------------------------------------------------

    async def list_keys(self) -> list[KeyRecord]:
        return await self._read(_fetch_keys)

    async def register_keys(self, check_values: Mapping[str, str]) -> list[KeyRecord]:
        if not check_values:
            return await self.list_keys()
        # Sorted: two replicas registering the same new keys take their locks in the same order.
        parameters = [(key_id, check_values[key_id]) for key_id in sorted(check_values)]
        async with self._transaction() as conn:
            with _unavailable_on_connection_error():
                await conn.executemany(_REGISTER_KEY, parameters)
                return await _fetch_keys(conn)

    async def add_encryptions(self, counts: Mapping[str, int]) -> None:
        parameters = rowmap.encryption_counts(counts)
        if not parameters:
            return
        async with self._transaction() as conn:
            with _unavailable_on_connection_error():
                await conn.executemany(_ADD_ENCRYPTIONS, parameters)

    async def retire_key(self, key_id: str) -> None:
        async with self._transaction() as conn:
            with _unavailable_on_connection_error():
                await conn.execute(_RETIRE_KEY, key_id)

    # --- audit ----------------------------------------------------------------------------------

    async def append_audit(self, records: Sequence[AuditRecord]) -> None:
        """Raises `errors.StoreRejected` when PostgreSQL refuses the records themselves (retrying cannot help)."""
        if not records:
            return
        try:
            # A transaction even for one record: an INSERT left waiting on a lock after its call timed out must
            # not commit later by itself (a strict read answered UNAVAILABLE would then be recorded as OK).
            async with self._transaction() as conn:
                with _unavailable_on_connection_error():
                    await _insert_audit(conn, records)
        except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError, asyncpg.ProgramLimitExceededError) as exc:
            # Class 22 (NUL in text, a lone surrogate the client cannot encode), 23, 54 (an index row too
            # large). The text of these errors may quote the value: only the SQLSTATE travels on.
            raise errors.StoreRejected(
                f"PostgreSQL refused the audit records (SQLSTATE {getattr(exc, 'sqlstate', None) or 'unknown'})"
            ) from None

    async def list_audit(self, organization_id: str, before_id: int, limit: int) -> list[AuditEntry]:
        if limit < 1:
            return []
        before = before_id if before_id > 0 else _NEWEST

        async def query(conn: PoolConnectionProxy) -> list[AuditEntry]:
            if organization_id:
                records = await conn.fetch(_SELECT_AUDIT_ORGANIZATION, organization_id, before, limit)
            else:
                records = await conn.fetch(_SELECT_AUDIT, before, limit)
            return [_to_audit_entry(record) for record in records]

        return await self._read(query)

    async def ping(self) -> None:
        async def query(conn: PoolConnectionProxy) -> None:
            await conn.execute(_PING)

        await self._read(query)

    def pool_stats(self) -> PoolStats:
        return PoolStats(self._pool.get_size(), self._pool.get_idle_size(), self._pool.get_max_size())

    def changes(self) -> ChangeFeed:
        return self._changes

    async def close(self) -> None:
        if self._listener is not None:
            await self._listener.close()
        self._changes.close()
        try:
            await asyncio.wait_for(self._pool.close(), timeout=self._close_timeout)
        except Exception:  # a timeout, or a connection that fails while closing
            log.warning(
                "closing the PostgreSQL pool did not finish; terminating its connections",
                extra={"event": "pool_terminated"},
            )
            self._pool.terminate()

    # --- internals ------------------------------------------------------------------------------

    async def _read(self, query: Callable[[PoolConnectionProxy], Awaitable[T]]) -> T:
        """Run a read-only query; once more on a fresh connection if the pooled one was dead."""
        async with self._bounded():
            try:
                return await self._read_once(query)
            except errors.Unavailable as exc:
                if not _dead_connection(exc):
                    raise
                log.info("retrying a read on a fresh connection", extra={"event": "read_retried"})
            return await self._read_once(query)

    async def _read_once(self, query: Callable[[PoolConnectionProxy], Awaitable[T]]) -> T:
        conn = await self._acquire()
        try:
            with _unavailable_on_connection_error():
                result = await query(conn)
        except BaseException as exc:
            await self._give_back(conn, exc)
            raise
        await self._give_back(conn, None)
        return result

    async def _upsert_once(
        self, organization_id: str, provider: str, mutate: Mutation, audit: AuditRecord | None
    ) -> _Seen:
        async with self._transaction() as conn:
            current = await self._lock_row(conn, organization_id, provider)
            config = dict(mutate(current))  # raising rolls back: nothing changes, no audit
            logged = rowmap.audit_values(audit) if audit is not None else ()
            with _unavailable_on_connection_error():
                if current is None:
                    insert = _INSERT_AUDITED if logged else _INSERT
                    record = await conn.fetchrow(insert, uuid.uuid4().hex, organization_id, provider, config, *logged)
                else:
                    update = _UPDATE_AUDITED if logged else _UPDATE
                    record = await conn.fetchrow(update, current.id, config, *logged)
        if record is None:  # pragma: no cover (RETURNING of an insert, or of an update of the locked row)
            raise RuntimeError("the write of the integration row returned no row")
        return _seen(record)

    # --- the optimistic save --------------------------------------------------------------------

    def _remembered_row(self, key: tuple[str, str]) -> _Seen | None:
        seen = self._remembered.get(key)
        if seen is None:
            return None
        if asyncio.get_running_loop().time() - seen.at > _REMEMBERED_FOR:
            del self._remembered[key]
            return None
        return seen

    def _remember(self, key: tuple[str, str], seen: _Seen | None) -> None:
        if seen is None:
            self._remembered.pop(key, None)
            return
        self._remembered[key] = seen
        self._remembered.move_to_end(key)
        while len(self._remembered) > _REMEMBERED_ROWS:
            self._remembered.popitem(last=False)

    def _forget(self, key: tuple[str, str]) -> None:
        self._remembered.pop(key, None)

    async def _read_for_save(self, organization_id: str, provider: str) -> _Seen | None:
        async def query(conn: PoolConnectionProxy) -> _Seen | None:
            record = await conn.fetchrow(_SELECT_FOR_SAVE, organization_id, provider)
            return _seen(record) if record is not None else None

        return await self._read(query)

    async def _save_if_unchanged(
        self, seen: _Seen, config: Mapping[str, str], audit: AuditRecord | None, budget: Budget
    ) -> tuple[bool, _Seen | None]:
        """Write `config` and `audit` if the row is still `seen`: (True, the written row), else
        (False, the row as stored now, or None when there is none). One statement, its own transaction.

        Once more on a fresh connection only when the pooled one refused the statement before sending
        it: a connection lost while the statement ran leaves unknown whether it committed.
        """
        row = seen.row
        logged = rowmap.audit_values(audit) if audit is not None else _NO_AUDIT
        arguments = (
            row.organization_id,
            row.provider,
            row.id,
            row.version,
            seen.xmin,
            config,
            _server_timeout_ms(budget),
            audit is not None,
            *logged,
        )

        async def statement(conn: PoolConnectionProxy) -> tuple[bool, _Seen | None]:
            record = await conn.fetchrow(_SAVE_IF_UNCHANGED, *arguments)
            if record is None:
                return False, None
            return bool(record["written"]), _seen(record)

        try:
            return await self._read_once(statement)
        except errors.Unavailable as exc:
            if not isinstance(exc.__cause__, _UNSENT_ERRORS):
                raise
            log.info("retrying a save on a fresh connection", extra={"event": "save_retried"})
        return await self._read_once(statement)

    async def _lock_row(
        self, conn: PoolConnectionProxy, organization_id: str, provider: str
    ) -> StoredIntegration | None:
        """Serialize writers of one (organization, provider), even before its row exists."""
        with _unavailable_on_connection_error():
            # The advisory lock covers the first insert, which FOR UPDATE cannot
            # (there is no row to lock yet). Separate statements: the SELECT takes
            # its snapshot after the lock is granted, so it sees the previous
            # holder's committed write.
            await conn.execute(_LOCK_KEY, ROW_LOCK_NAMESPACE, organization_id, provider)
            # FOR UPDATE also holds off writers that do not take the advisory lock.
            record = await conn.fetchrow(_SELECT_ONE_FOR_UPDATE, organization_id, provider)
        return _to_stored(record) if record is not None else None

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[PoolConnectionProxy]:
        """A pooled connection for the block; exceptions leave the block unchanged."""
        conn = await self._acquire()
        try:
            yield conn
        except BaseException as exc:
            await self._give_back(conn, exc)
            raise
        await self._give_back(conn, None)

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[PoolConnectionProxy]:
        """A transaction that commits when the block ends, else rolls back and re-raises unchanged.

        Within the call's budget, which also bounds the server's lock and statement waits.
        """
        async with self._bounded() as budget:
            conn, transaction = await self._begin(budget)
            try:
                try:
                    yield conn
                except BaseException as exc:
                    if _worth_rolling_back(exc):
                        await _rollback_quietly(transaction)
                    raise
                with _unavailable_on_connection_error():
                    await transaction.commit()
            except BaseException as exc:
                await self._give_back(conn, exc)
                raise
            await self._give_back(conn, None)

    @contextlib.asynccontextmanager
    async def _bounded(self) -> AsyncIterator[Budget]:
        """The call's budget; the server's and the driver's timeouts answer as running out of it."""
        async with bounded(self._timeout) as budget:
            try:
                yield budget
            except errors.Unavailable as exc:
                if _is_timeout(exc.__cause__):
                    raise budget.exceeded() from exc.__cause__
                raise

    async def _begin(self, budget: Budget) -> tuple[PoolConnectionProxy, Transaction]:
        """BEGIN on a pooled connection; once more on a fresh one if the pooled one was dead.

        Repeating is safe: nothing has run in the transaction yet, and the
        caller's callback runs only after this returns.
        """
        try:
            return await self._begin_once(budget)
        except errors.Unavailable as exc:
            if not _dead_connection(exc):
                raise
            log.info("retrying a transaction on a fresh connection", extra={"event": "begin_retried"})
        return await self._begin_once(budget)

    async def _begin_once(self, budget: Budget) -> tuple[PoolConnectionProxy, Transaction]:
        conn = await self._acquire()
        transaction = conn.transaction()
        try:
            with _unavailable_on_connection_error():
                await transaction.start()
                # Computed integers only (milliseconds); SET LOCAL ends with the transaction.
                await conn.execute(_server_timeouts(budget))
        except BaseException as exc:
            await self._give_back(conn, exc)
            raise
        return conn, transaction

    async def _acquire(self) -> PoolConnectionProxy:
        with _unavailable_on_connection_error():
            return await self._pool.acquire()

    async def _give_back(self, conn: PoolConnectionProxy, failure: BaseException | None) -> None:
        """Return a connection to the pool, or drop it if `failure` says it may be broken."""
        if failure is not None and _may_be_broken(failure):
            # Never hand a connection that just failed back to the pool: it may
            # look open yet be unusable. The pool opens a new one when needed.
            with contextlib.suppress(asyncpg.InterfaceError):  # already detached by the pool
                conn.terminate()
            if isinstance(failure, errors.Unavailable) and _dead_connection(failure):
                # One dead connection means the server restarted or failed over,
                # so its idle siblings are dead too: have the pool replace them
                # all, rather than fail the next few calls one by one.
                await self._pool.expire_connections()
        # A connection that fails its reset is terminated by the pool and
        # replaced on the next acquire; the call's outcome is already decided.
        try:
            await self._pool.release(conn)
        except Exception as exc:
            if not is_connection_error(exc):
                raise


def _dead_connection(exc: errors.Unavailable) -> bool:
    return isinstance(exc.__cause__, _DEAD_CONNECTION_ERRORS)


def _may_be_broken(failure: BaseException) -> bool:
    """After this failure the connection's state is unknown: never hand it back to the pool.

    A cancelled call (its budget ran out, or the client went away) may have left a
    statement running, or a lock wait queued, on the server.
    """
    if isinstance(failure, errors.Unavailable) and _server_gave_up(failure.__cause__):
        return False  # the server ended the wait itself: the connection is fine once rolled back
    return isinstance(failure, errors.Unavailable) or is_connection_error(failure) or not isinstance(failure, Exception)


def _server_gave_up(exc: BaseException | None) -> bool:
    return getattr(exc, "sqlstate", None) in _TIMEOUT_SQLSTATES


def _worth_rolling_back(failure: BaseException) -> bool:
    """A rollback on a broken or abandoned connection would only wait; dropping it rolls back."""
    return not _may_be_broken(failure)


def _server_timeout_ms(budget: Budget) -> int:
    """What is left of the budget, less a margin, in milliseconds: what the server may wait."""
    remaining = budget.remaining()
    return max(1, int((remaining - min(_SERVER_TIMEOUT_MARGIN, remaining / 4)) * 1000))


def _server_timeouts(budget: Budget) -> str:
    milliseconds = _server_timeout_ms(budget)
    return f"SET LOCAL lock_timeout = {milliseconds}; SET LOCAL statement_timeout = {milliseconds}"


async def _rollback_quietly(transaction: Transaction) -> None:
    # The block's own exception is what the caller must see. If the rollback
    # fails the connection is broken: the server drops the transaction with it.
    try:
        await transaction.rollback()
    except Exception as exc:
        if not is_connection_error(exc):
            raise


async def _keep_session(connection: asyncpg.Connection) -> None:
    """Replaces asyncpg's reset query on release (an extra round trip on every call).

    asyncpg still rolls back an open transaction first. Nothing else needs
    resetting: this store sets no session settings, opens no cursors, listens
    to nothing, and takes only transaction-scoped advisory locks (migrations
    release their session lock explicitly, or drop the connection if they cannot).
    """


async def _create_pool(
    dsn: str, *, min_size: int, max_size: int, connect_timeout: float, command_timeout: float
) -> asyncpg.Pool:
    """The pool, retrying while PostgreSQL is not reachable yet (starting, failing over) for up to connect_timeout."""
    last_error: Exception | None = None
    delay = 0.1
    try:
        async with asyncio.timeout(connect_timeout):
            while True:
                try:
                    return await asyncpg.create_pool(
                        dsn,
                        min_size=min_size,
                        max_size=max_size,
                        # Each new connection's own limit, now and whenever the pool reconnects.
                        timeout=connect_timeout,
                        command_timeout=command_timeout,
                        init=_init_connection,
                        reset=_keep_session,
                    )
                except Exception as exc:
                    _raise_if_permanent(exc)
                    last_error = exc
                log.info("PostgreSQL not reachable yet; retrying", extra={"event": "connect_retry"})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
    except TimeoutError as exc:
        raise errors.Unavailable(UNAVAILABLE_MESSAGE) from last_error or exc


def _raise_if_permanent(exc: Exception) -> None:
    """Errors a retry cannot fix become ConfigurationError; connection errors return; others re-raise."""
    # `from None`: a parse error's text may quote part of the DSN, password included.
    if isinstance(exc, asyncpg.exceptions.ClientConfigurationError | ValueError):
        raise errors.ConfigurationError("DATABASE_URL is not a valid PostgreSQL connection URL") from None
    if isinstance(exc, asyncpg.PostgresError) and _sqlstate_class(exc) in _CONFIGURATION_SQLSTATE_CLASSES:
        # The server's text names the user or database, never the password.
        raise errors.ConfigurationError(f"PostgreSQL refused DATABASE_URL: {exc}") from None
    if not is_connection_error(exc):
        raise exc


@dataclass(frozen=True)
class _Seen:
    """A row as a save read or wrote it: the version of it that the optimistic write expects."""

    row: StoredIntegration
    xmin: int  # the transaction that wrote this version of the row: any write to it changes it
    at: float  # loop time when read or written


def _seen(record: asyncpg.Record) -> _Seen:
    return _Seen(_to_stored(record), int(record["row_xmin"]), asyncio.get_running_loop().time())


def _to_stored(record: asyncpg.Record) -> StoredIntegration:
    return rowmap.integration(
        id_=record["id"],
        organization_id=record["organization_id"],
        provider=record["provider"],
        config=record["config"],
        version=record["version"],
        created_at=record["created_at"],
        updated_at=record["updated_at"],
    )


async def _fetch_keys(conn: PoolConnectionProxy) -> list[KeyRecord]:
    records = await conn.fetch(_SELECT_KEYS)
    return [
        rowmap.key_record(
            key_id=record["key_id"],
            check_value=record["check_value"],
            encryptions=record["encryptions"],
            retired=record["retired"],
        )
        for record in records
    ]


async def _insert_audit(conn: PoolConnectionProxy, records: Sequence[AuditRecord]) -> None:
    """In the caller's transaction: one statement for all the records."""
    await conn.execute(_INSERT_AUDIT, [rowmap.audit_json(record) for record in records])


def _to_audit_entry(record: asyncpg.Record) -> AuditEntry:
    return rowmap.audit_entry(
        id_=record["id"],
        time=record["time"],
        caller=record["caller"],
        rpc=record["rpc"],
        outcome=record["outcome"],
        organization_id=record["organization_id"],
        provider=record["provider"],
        fields=record["fields"],
        request_id=record["request_id"],
        details=record["details"],
    )
