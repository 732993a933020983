"""The readiness probe: checks at its interval, and at once after a store call found the database unreachable."""

from __future__ import annotations

import asyncio

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from integrations_service import errors
from integrations_service.api.readiness import Readiness

SERVICE = "integrations.v1.IntegrationService"


async def status(health: HealthServicer) -> int:
    reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE), None)
    return int(reply.status)


async def test_a_probe_that_itself_reports_the_outage_does_not_probe_again_at_once() -> None:
    # The probe's own ping counts as a store call that found the database unreachable, which wakes the probe:
    # that wake must not start the next probe at once, or a database that refuses connections gets hammered.
    health = HealthServicer()
    await health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    checks = 0
    readiness: Readiness

    async def check() -> None:
        nonlocal checks
        checks += 1
        readiness.store_unavailable()  # what Metrics.unavailable does for the probe's ping
        raise errors.Unavailable("the database is unreachable")

    readiness = Readiness(health, SERVICE, check, interval=0.2)
    readiness.start()
    try:
        readiness.store_unavailable()  # a call found the database unreachable: check at once
        await asyncio.sleep(0.5)
        assert await status(health) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert 2 <= checks <= 4  # at once, then at the interval: not thousands
    finally:
        await readiness.close()


async def test_a_call_that_finds_the_database_unreachable_makes_the_probe_check_at_once() -> None:
    health = HealthServicer()
    await health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    down = asyncio.Event()

    async def check() -> None:
        if down.is_set():
            raise errors.Unavailable("the database is unreachable")

    readiness = Readiness(health, SERVICE, check, interval=60.0)
    readiness.start()
    try:
        await asyncio.sleep(0.05)
        down.set()
        readiness.store_unavailable()
        for _ in range(100):
            if await status(health) == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            await asyncio.sleep(0.01)
        assert await status(health) == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await readiness.close()
