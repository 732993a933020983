"""A background task that runs a flush every few seconds, and once more when closed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("integrations.periodic")


class PeriodicFlush:
    def __init__(self, flush: Callable[[], Awaitable[None]], interval: float, name: str) -> None:
        self._flush = flush
        self._interval = interval
        self._name = name
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self._name)

    async def close(self) -> None:
        """Stop the task, then flush what is left."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self._flush()
            except Exception:
                # A bug must not stop every later flush: log it and try again next time.
                log.exception("periodic flush failed", extra={"event": "flush_failed", "store": self._name})
