"""The blocking client (`IntegrationsClientSync`) from plain threads, against real servers on real sockets.

The in-process servers run on the test's event loop, so every blocking call
is made from worker threads (as a WSGI server would), never from the loop.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from integrations_client import (
    Category,
    ClientClosed,
    Conflict,
    DeadlineExceeded,
    IntegrationsClientSync,
    InvalidArgument,
    NotFound,
    ProviderCredentials,
    ProviderNotFound,
    Unavailable,
    ValueSource,
)
from tests.client_fixtures import (
    ENV_DEFAULTS,
    PK,
    SECRETS,
    SK,
    SK_2,
    WEBHOOK_DEFAULT,
    FakeClock,
    FakeServer,
    rpc_log,
    until,
)
from tests.harness import Running, new_org, start_service
from tests.integration.client_service import client_fake, client_service_env, client_svc  # noqa: F401 (fixtures)

# The organization's own secret key; the publishable key and webhook secret are the environment's defaults
# (a stored publishableKey would withhold the environment's webhook secret: see docs/api.md).
STRIPE = {"secretKey": SK}
T = TypeVar("T")


async def in_thread(work: Callable[[], T]) -> T:
    return await asyncio.to_thread(work)


def in_threads(count: int, work: Callable[[], T]) -> list[T | BaseException]:
    """`work` in `count` plain threads released together; each one's result or exception."""
    barrier = threading.Barrier(count)
    results: list[T | BaseException] = [RuntimeError("did not run")] * count

    def run(index: int) -> None:
        barrier.wait()
        try:
            results[index] = work()
        except BaseException as error:
            results[index] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


async def test_every_method_from_a_thread(svc_any_store: Running) -> None:
    org = new_org()

    def flow() -> None:
        with IntegrationsClientSync(svc_any_store.target) as client:
            saved = client.save(org, "stripe", values=STRIPE)
            assert saved.values["secretKey"].value == "••••••••4242"
            creds = client.get_config(org, "stripe")
            assert dict(creds.values) == {"secretKey": SK, "publishableKey": PK, "webhookSecret": WEBHOOK_DEFAULT}
            assert creds.source("webhookSecret") is ValueSource.ENVIRONMENT
            assert creds.etag == saved.etag
            assert not any(secret in repr(creds) for secret in SECRETS)

            assert [p.id for p in client.list_providers(category=Category.ANALYTICS)] == ["google_analytics"]
            status = {p.id: p.ready for p in client.list_providers(org)}
            assert status["stripe"] is True
            assert client.get_masked_config(org, "stripe").etag == saved.etag

            updated = client.save(org, "stripe", values={"secretKey": SK_2}, etag=saved.etag)
            assert client.get_config(org, "stripe")["secretKey"] == SK_2  # save invalidated the cache
            with pytest.raises(Conflict):
                client.delete(org, "stripe", etag=saved.etag)
            client.delete(org, "stripe", etag=updated.etag)
            assert client.get_config(org, "stripe").source("secretKey") is ValueSource.UNSET
            with pytest.raises(NotFound):
                client.delete(org, "stripe")
            client.delete(org, "stripe", allow_missing=True)

            with pytest.raises(InvalidArgument) as caught:
                client.save(org, "stripe", values={"secretKey": "nope"})
            assert caught.value.fields == ["values.secretKey"]
            assert caught.value.request_id
            with pytest.raises(ProviderNotFound):
                client.get_config(org, "paypal")

    await in_thread(flow)


async def test_single_flight_from_100_plain_threads(svc: Running) -> None:
    org = new_org()
    with rpc_log() as served:
        client = IntegrationsClientSync(svc.target)
        try:
            await in_thread(lambda: client.save(org, "stripe", values=STRIPE))
            # The cache's watch live first (another organization's read starts it): its subscription invalidates
            # reads in flight, and a first read waits for it only briefly, which a loaded machine can outlast.
            await in_thread(lambda: client.get_config(new_org(), "stripe"))
            await until(lambda: client.cache_stats.watching, "the cache's watch to be live")
            before = client.cache_stats
            results = await in_thread(lambda: in_threads(100, lambda: client.get_config(org, "stripe")))
            stats = client.cache_stats
        finally:
            client.close()
    assert all(isinstance(r, ProviderCredentials) for r in results)
    assert all(r is results[0] for r in results)
    assert stats.rpc_count - before.rpc_count == 1
    misses = stats.misses - before.misses
    assert misses + stats.hits - before.hits == 100
    assert stats.coalesced - before.coalesced == misses - 1
    assert served.count("GetProviderConfig", org) == 1


async def test_single_flight_shares_a_slow_read_and_its_errors(fake: FakeServer) -> None:
    fake.script.delays["GetProviderConfig"] = 0.3
    with IntegrationsClientSync(fake.target) as client:
        results = await in_thread(lambda: in_threads(50, lambda: client.get_config("org_1", "stripe")))
        assert all(isinstance(r, ProviderCredentials) and r["secretKey"] == SK for r in results)
        assert fake.script.calls["GetProviderConfig"] == 1
        assert (client.cache_stats.misses, client.cache_stats.coalesced) == (50, 49)

        fake.script.fail("GetProviderConfig", grpc.StatusCode.NOT_FOUND)
        failures = await in_thread(lambda: in_threads(20, lambda: client.get_config("org_2", "paypal")))
        assert all(isinstance(f, ProviderNotFound) for f in failures)
        assert len({id(f) for f in failures}) == 20  # each thread raises its own exception object
        assert fake.script.calls["GetProviderConfig"] == 2


async def test_a_thread_joining_a_slower_read_gives_up_at_its_own_deadline(fake: FakeServer) -> None:
    fake.script.delays["GetProviderConfig"] = 1.0
    with IntegrationsClientSync(fake.target, watch=False) as client:
        patient = asyncio.ensure_future(in_thread(lambda: client.get_config("org_1", "stripe", timeout=5)))
        await asyncio.sleep(0.1)

        def impatient() -> tuple[BaseException | None, float]:
            started = time.monotonic()
            try:
                client.get_config("org_1", "stripe", timeout=0.2)
            except BaseException as error:
                return error, time.monotonic() - started
            return None, time.monotonic() - started

        error, waited = await in_thread(impatient)
        assert isinstance(error, DeadlineExceeded), error
        assert waited < 0.6
        assert (await patient)["secretKey"] == SK
        assert fake.script.calls["GetProviderConfig"] == 1


async def test_ttl_with_an_injected_clock(svc: Running) -> None:
    org, clock = new_org(), FakeClock()
    with IntegrationsClientSync(svc.target, clock=clock, cache_ttl=10) as client:
        first = await in_thread(lambda: client.get_config(org, "stripe"))
        clock.advance(9)
        assert await in_thread(lambda: client.get_config(org, "stripe")) is first
        assert client.cache_stats.rpc_count == 1
        clock.advance(2)
        await in_thread(lambda: client.get_config(org, "stripe"))
        assert client.cache_stats.rpc_count == 2
        client.invalidate(org, "stripe")
        await in_thread(lambda: client.get_config(org, "stripe"))
        assert client.cache_stats.rpc_count == 3


async def test_stale_if_error_when_the_service_stops(tmp_path: Path) -> None:
    running = await start_service(f"sqlite:///{tmp_path / 'store.sqlite3'}", tmp_path, ENV_DEFAULTS)
    org, clock = new_org(), FakeClock()
    client = IntegrationsClientSync(running.target, clock=clock, cache_ttl=30, stale_if_error=60, timeout=0.5)
    try:
        await in_thread(lambda: client.save(org, "stripe", values=STRIPE))
        cached = await in_thread(lambda: client.get_config(org, "stripe"))
    finally:
        await running.close()  # the service is gone
    try:
        clock.advance(31)
        results = await in_thread(lambda: in_threads(10, lambda: client.get_config(org, "stripe")))
        assert all(r is cached for r in results)
        assert client.cache_stats.stale_served == 10
        assert client.cache_stats.rpc_count == 2  # one failed read for the ten callers
        clock.advance(60)
        with pytest.raises(Unavailable):
            await in_thread(lambda: client.get_config(org, "stripe"))
    finally:
        client.close()


async def test_reads_retried_writes_not(fake: FakeServer) -> None:
    with IntegrationsClientSync(fake.target, cache_ttl=0) as client:
        fake.script.fail("GetProviderConfig", grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE)
        assert (await in_thread(lambda: client.get_config("org_1", "stripe")))["secretKey"] == SK
        assert fake.script.calls["GetProviderConfig"] == 3
        fake.script.fail("SaveIntegration", grpc.StatusCode.UNAVAILABLE)
        with pytest.raises(Unavailable):
            await in_thread(lambda: client.save("org_1", "stripe", values={"secretKey": SK}))
        assert fake.script.calls["SaveIntegration"] == 1


def test_closed_client_refuses_calls() -> None:
    client = IntegrationsClientSync("127.0.0.1:1")
    client.close()
    client.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        client.list_providers()
    with pytest.raises(ClientClosed, match="is closed"):
        client.get_config("org_1", "stripe")


def test_close_racing_a_call_between_its_channel_and_its_send_is_client_closed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """grpc raises a bare ValueError for a call on a closed channel: the window between a thread taking its
    channel and sending is where another thread's close() lands."""
    client = IntegrationsClientSync("127.0.0.1:1")
    checkout = client._checkout

    def checkout_then_close() -> Any:
        channel = checkout()
        client.close()  # another thread's
        return channel

    monkeypatch.setattr(client, "_checkout", checkout_then_close)
    with pytest.raises(ClientClosed, match="closed"):
        client.list_providers()
    with pytest.raises(ClientClosed, match="closed"):
        client.watch_changes()


async def test_close_while_threads_are_in_calls_fails_them_with_client_closed(fake: FakeServer) -> None:
    """Not InternalError ("a bug"): the calls were cut by close(), from another thread, and none of them hangs."""
    fake.script.delays["GetProviderConfig"] = fake.script.delays["ListProviders"] = 1.0
    client = IntegrationsClientSync(fake.target)
    started = threading.Barrier(6)

    def call(index: int) -> BaseException | None:
        started.wait()
        try:
            if index == 4:
                client.list_providers()
            else:
                client.get_config("org_1", "stripe")  # one read, three threads waiting on it
        except BaseException as error:
            return error
        return None

    def close_soon() -> None:
        started.wait()
        time.sleep(0.3)
        client.close()
        client.close()  # twice, while the calls end

    calls = [asyncio.to_thread(call, index) for index in range(5)] + [asyncio.to_thread(close_soon)]
    outcome = await asyncio.wait_for(asyncio.gather(*calls), 10)
    errors = outcome[:5]
    assert all(isinstance(error, ClientClosed) for error in errors), errors
    assert all(error.code is grpc.StatusCode.CANCELLED for error in errors if isinstance(error, ClientClosed))
