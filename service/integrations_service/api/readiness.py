"""Readiness: the health status of the service name follows the store.

`""` (the whole server) stays SERVING while the process serves: liveness, a
restart would not help. `integrations.v1.IntegrationService` turns NOT_SERVING
while the store cannot be reached and SERVING again once it can, so a load
balancer or Kubernetes sends calls elsewhere meanwhile. A background probe
checks the store every PROBE_INTERVAL seconds, and at once after any store
call answered UNAVAILABLE; each check waits at most the store's timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from integrations_service import errors

log = logging.getLogger("integrations.readiness")

PROBE_INTERVAL = 2.0
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Readiness:
    def __init__(
        self,
        health: HealthServicer,
        service_name: str,
        check: Callable[[], Awaitable[None]],
        interval: float = PROBE_INTERVAL,
    ) -> None:
        self._health = health
        self._service_name = service_name
        self._check = check
        self.interval = interval  # seconds between periodic checks; read before each wait
        self._wake = asyncio.Event()
        self._ready = True  # the store answered at start-up, or start() would have failed
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="readiness-probe")

    def store_unavailable(self) -> None:
        """A store call found the database unreachable: check now rather than at the next interval."""
        self._wake.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
            self._wake.clear()
            await self._probe()
            # A wake during the probe is answered by it, the probe's own failed ping included (it counts as a
            # store call that found the database unreachable): waking again for it would probe in a loop.
            self._wake.clear()

    async def _probe(self) -> None:
        try:
            await self._check()
            ready = True
        except errors.Unavailable:
            ready = False
        except Exception:
            # Not a known outage, yet the store did not answer: not ready, and worth a look.
            log.exception("the readiness check failed unexpectedly", extra={"event": "readiness_check_failed"})
            ready = False
        if ready == self._ready:
            return
        self._ready = ready
        if ready:
            log.info("the credential store answers again: ready", extra={"event": "ready"})
        else:
            log.warning("the credential store is unreachable: not ready", extra={"event": "not_ready"})
        await self._health.set(self._service_name, _SERVING if ready else _NOT_SERVING)
