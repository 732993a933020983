"""The PostgreSQL half of the change feed: one LISTEN connection per process.

The connection is its own, outside the pool (a pooled connection would stop
listening when released), and goes to DATABASE_URL: PostgreSQL delivers
notifications only to sessions on the primary. Losing it is noticed two ways:
asyncpg's termination callback (the server closed it, e.g. pg_terminate_backend
or a restart) and a periodic `SELECT 1` with a timeout (a connection that went
silent, e.g. a network partition). While it is down the hub reports
`connected = False`; the listener reconnects with a bounded, jittered backoff
and, once LISTEN is in place again, publishes a reset (what changed in the gap
is unknown) and reports `connected = True`.

Log lines never carry the DSN or a payload.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from datetime import UTC, datetime
from typing import Any

import asyncpg

from integrations_service.store.changes import (
    CHANGE_CHANNEL,
    ChangeEvent,
    ChangeHub,
    ChangeKind,
    ConfigChanged,
    FeedReset,
    ResetReason,
)

log = logging.getLogger("integrations.store.listener")

# Seconds between liveness checks of an idle listening connection.
CHECK_INTERVAL = 5.0
# How the listening session shows in pg_stat_activity.
APPLICATION_NAME = "integrations-change-feed"
# Reconnect backoff: first wait, and the most it grows to.
FIRST_BACKOFF = 0.1
MAX_BACKOFF = 5.0

_KINDS = {kind.value: kind for kind in ChangeKind}
# The reasons the trigger itself sends (migration 0003). The others are the listener's and the hub's own: read from
# a payload, which anyone who can connect may send, "disconnected" or "connected" would end every watch stream.
_NOTIFIED_RESET_REASONS = {reason.value: reason for reason in (ResetReason.TRUNCATED, ResetReason.UNDESCRIBED)}


class PostgresChangeListener:
    """Keeps one LISTEN connection open and publishes what it hears into `hub`. Create with `start`."""

    def __init__(
        self,
        dsn: str,
        hub: ChangeHub,
        *,
        timeout: float,
        check_interval: float = CHECK_INTERVAL,
        max_backoff: float = MAX_BACKOFF,
    ) -> None:
        self._dsn = dsn
        self._hub = hub
        self._timeout = timeout
        self._check_interval = check_interval
        self._max_backoff = max_backoff
        self._first_attempt = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._connection: asyncpg.Connection | None = None

    @classmethod
    async def start(cls, dsn: str, hub: ChangeHub, **options: Any) -> PostgresChangeListener:
        """Start listening; returns after the first connection attempt, whether it worked or not (then it retries)."""
        listener = cls(dsn, hub, **options)
        listener._task = asyncio.get_running_loop().create_task(listener._run(), name="change-feed-listener")
        try:
            await listener._first_attempt.wait()
        except BaseException:
            await listener.close()
            raise
        return listener

    @property
    def backend_pid(self) -> int | None:
        """The listening session's server process id (for operators and tests), None while disconnected."""
        conn = self._connection
        return None if conn is None or conn.is_closed() else int(conn.get_server_pid())

    async def close(self) -> None:
        """Stop listening and close the connection. Idempotent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._hub.mark_disconnected()

    async def _run(self) -> None:
        delay = FIRST_BACKOFF
        while True:
            conn, lost = await self._connect()
            self._first_attempt.set()
            if conn is None:
                # Jitter: replicas that lost the database together do not all come back at once.
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311 (not for security)
                delay = min(delay * 2, self._max_backoff)
                continue
            self._connection = conn
            self._hub.mark_connected()
            log.info("listening for changes", extra={"event": "change_feed_connected"})
            loop = asyncio.get_running_loop()
            connected_at = loop.time()
            try:
                await self._watch(conn, lost)
            finally:
                self._connection = None
                self._hub.mark_disconnected()
                conn.terminate()
            log.warning("lost the change feed connection; reconnecting", extra={"event": "change_feed_lost"})
            if loop.time() - connected_at >= self._check_interval:
                delay = FIRST_BACKOFF  # it had settled: reconnect at once
            else:  # a server that accepts and drops connections is not hammered
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311 (not for security)
                delay = min(delay * 2, self._max_backoff)

    async def _connect(self) -> tuple[asyncpg.Connection | None, asyncio.Event]:
        """A connection with LISTEN in place, and the event set when it dies; (None, _) when it failed."""
        lost = asyncio.Event()
        conn: asyncpg.Connection | None = None
        try:
            conn = await asyncpg.connect(
                self._dsn, timeout=self._timeout, server_settings={"application_name": APPLICATION_NAME}
            )
            conn.add_termination_listener(lambda _conn: lost.set())
            await conn.add_listener(CHANGE_CHANNEL, self._on_notification)
        except Exception as exc:
            # The type only: the text of a connect error may quote the DSN.
            log.warning(
                "cannot listen for changes; retrying",
                extra={"event": "change_feed_connect_failed", "error": type(exc).__name__},
            )
            if conn is not None:
                conn.terminate()
            return None, lost
        except BaseException:  # cancelled by close(): the connection must not outlive the listener
            if conn is not None:
                conn.terminate()
            raise
        return conn, lost

    async def _watch(self, conn: asyncpg.Connection, lost: asyncio.Event) -> None:
        """Returns when the connection is gone or stops answering."""
        while not lost.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), timeout=self._check_interval)
                return
            try:
                await conn.fetchval("SELECT 1", timeout=self._timeout)
            except Exception:
                return

    def _on_notification(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        self._hub.publish(parse_notification(str(payload)))


def parse_notification(payload: str) -> ChangeEvent:
    """The event of one notification of the trigger (migrations 0003, 0004); a reset for anything unreadable.

    Anyone who may connect can NOTIFY the channel, so the payload is untrusted:
    an unreadable one resynchronizes consumers rather than being ignored or raising
    (a raising callback would lose the notification, with the cache still trusted).
    """
    try:
        message = json.loads(payload)
        operation = message["operation"]
        if operation == "reset":
            return FeedReset(_NOTIFIED_RESET_REASONS.get(message.get("reason"), ResetReason.UNDESCRIBED))
        stamp = datetime.fromisoformat(message["time"])
        fields = (message["organization_id"], message["provider"], message["id"])
        version = message["version"]
        rewrap = message.get("rewrap", False)  # absent before migration 0004: a change like any other
        if (
            operation not in _KINDS
            or type(rewrap) is not bool
            or not all(isinstance(value, str) for value in fields)
            or type(version) is not int
            or stamp.tzinfo is None
        ):
            raise ValueError("not a change")  # noqa: TRY301 (one fallback for every malformed shape)
        # What a watch message can carry, or it would fail every stream the change is in scope of: UTF-8
        # strings (JSON's "\ud800" reads as a lone surrogate, which has none), and a time a protobuf Timestamp
        # holds (datetime's range in UTC: OverflowError past it).
        "".join(fields).encode()
        time = stamp.astimezone(UTC)
    # Every failure alike, RecursionError included (a payload nested deeper than the decoder recurses).
    except Exception:
        return FeedReset(ResetReason.UNDESCRIBED)
    return ConfigChanged(fields[0], fields[1], fields[2], version, _KINDS[operation], time, rewrap)
