"""The asyncio client (`integrations_client.IntegrationsClient`) against real servers on real sockets.

The main flows run against both stores (SQLite and PostgreSQL through
`store_location`); cache, single-flight and error-mapping tests use SQLite
or a scripted fake server; outage and restart tests run the service as a
process (`integrations-service serve`) that is killed and started again on
the same port, with the same key and database.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import sys
import time
from contextlib import closing
from datetime import datetime
from pathlib import Path

import grpc
import pytest

from integrations_client import (
    Category,
    ClientClosed,
    ConfigurationError,
    Conflict,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    IntegrationsClient,
    IntegrationsError,
    InternalError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ProviderCredentials,
    ProviderNotFound,
    TlsConfig,
    Unauthenticated,
    Unavailable,
    ValueSource,
)
from integrations_client.config import SERVICE_CONFIG, channel_options
from integrations_service.api import server as service_server
from tests.client_fixtures import (
    ENV_DEFAULTS,
    PK,
    SECRETS,
    SK,
    SK_2,
    WEBHOOK_DEFAULT,
    FakeClock,
    FakeServer,
    make_pki,
    rpc_log,
    served_rpcs,
    server_credentials,
    start_fake_server,
)
from tests.harness import Running, new_org, start_service
from tests.integration.client_service import (  # noqa: F401 (fixtures)
    client_fake,
    client_processes,
    client_service_env,
    client_svc,
    serve_env,
)
from tests.processes import Processes, clean_env, free_port

# The organization's own secret key; the publishable key and webhook secret are the environment's defaults
# (a stored publishableKey would withhold the environment's webhook secret: see docs/api.md).
STRIPE = {"secretKey": SK}


# --- every method, on both stores ---------------------------------------------------------------------


async def test_save_then_get_config_is_decrypted_with_sources(svc_any_store: Running) -> None:
    org = new_org()
    async with IntegrationsClient(svc_any_store.target) as client:
        saved = await client.save(org, "stripe", values=STRIPE)
        assert saved.values["secretKey"].value == "••••••••4242"  # save answers masked
        assert saved.values["secretKey"].source is ValueSource.ORGANIZATION
        assert saved.values["publishableKey"].value == PK
        assert saved.values["webhookSecret"].source is ValueSource.ENVIRONMENT
        assert saved.etag
        creds = await client.get_config(org, "stripe")

    assert isinstance(creds, ProviderCredentials)
    assert (creds.organization_id, creds.provider) == (org, "stripe")
    assert creds["secretKey"] == SK
    assert dict(creds.values) == {"secretKey": SK, "publishableKey": PK, "webhookSecret": WEBHOOK_DEFAULT}
    assert creds.source("secretKey") is ValueSource.ORGANIZATION
    assert creds.source("webhookSecret") is ValueSource.ENVIRONMENT
    assert creds.etag == saved.etag
    assert isinstance(creds.update_time, datetime)
    assert creds.update_time == saved.update_time
    assert creds.update_time.tzinfo is not None
    with pytest.raises(AttributeError):
        creds.etag = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        creds.values["secretKey"] = "x"  # type: ignore[index]


async def test_unset_fields_have_a_source_but_no_value(svc_any_store: Running) -> None:
    async with IntegrationsClient(svc_any_store.target) as client:
        creds = await client.get_config(new_org(), "easypay")
    assert dict(creds.values) == {}
    assert creds.source("apiKey") is ValueSource.UNSET
    assert "apiKey" not in creds
    assert creds.get("apiKey") is None
    with pytest.raises(KeyError):
        creds["apiKey"]
    assert creds.etag == ""
    assert creds.update_time is None


async def test_list_providers(svc_any_store: Running) -> None:
    org = new_org()
    async with IntegrationsClient(svc_any_store.target) as client:
        catalog = await client.list_providers()
        assert [p.id for p in catalog] == ["stripe", "easypay", "ifthenpay", "resend", "smtp", "google_analytics"]
        stripe = catalog[0]
        assert (stripe.display_name, stripe.category, stripe.runtime_supported) == ("Stripe", Category.PAYMENTS, True)
        secret_key = stripe.fields[0]
        assert (secret_key.key, secret_key.env_var, secret_key.secret, secret_key.required) == (
            "secretKey",
            "STRIPE_SECRET_KEY",
            True,
            True,
        )
        assert [f.key for f in stripe.fields if f.binds_secrets] == ["webhookSecret", "publishableKey"]
        payments = await client.list_providers(category=Category.PAYMENTS)
        assert [p.id for p in payments] == ["stripe", "easypay", "ifthenpay"]
        assert [p.id for p in await client.list_providers(category="notifications")] == ["resend", "smtp"]

        await client.save(org, "stripe", values=STRIPE)
        status = {p.id: (p.configured, p.ready) for p in await client.list_providers(org)}
        assert status["stripe"] == (True, True)
        assert status["resend"] == (False, False)


async def test_save_clear_fields_and_etags(svc_any_store: Running) -> None:
    org = new_org()
    async with IntegrationsClient(svc_any_store.target) as client:
        first = await client.save(org, "stripe", values={**STRIPE, "publishableKey": "pk_test_51ClientOwnKey0002"})
        second = await client.save(org, "stripe", clear_fields=["publishableKey"], etag=first.etag)
        assert second.values["publishableKey"].source is ValueSource.ENVIRONMENT
        assert second.etag != first.etag
        masked = await client.get_masked_config(org, "stripe")
        assert masked.etag == second.etag
        assert masked.values["secretKey"].value == "••••••••4242"

        with pytest.raises(Conflict) as stale:
            await client.save(org, "stripe", values={"publishableKey": PK}, etag=first.etag)
        assert stale.value.code is grpc.StatusCode.ABORTED
        assert stale.value.request_id
        assert isinstance(stale.value, IntegrationsError)


async def test_delete(svc_any_store: Running) -> None:
    org = new_org()
    async with IntegrationsClient(svc_any_store.target) as client:
        saved = await client.save(org, "stripe", values=STRIPE)
        await client.save(org, "stripe", values={"secretKey": SK_2})
        with pytest.raises(Conflict):
            await client.delete(org, "stripe", etag=saved.etag)
        await client.delete(org, "stripe")
        with pytest.raises(NotFound) as missing:
            await client.delete(org, "stripe")
        assert type(missing.value) is NotFound  # not ProviderNotFound: the provider exists
        assert missing.value.code is grpc.StatusCode.NOT_FOUND
        await client.delete(org, "stripe", allow_missing=True)
        creds = await client.get_config(org, "stripe")
        assert creds.source("secretKey") is ValueSource.UNSET


# --- errors the real service produces ---------------------------------------------------------------


async def test_invalid_argument_carries_the_field_violations(svc: Running) -> None:
    async with IntegrationsClient(svc.target) as client:
        with pytest.raises(InvalidArgument) as caught:
            await client.save(new_org(), "stripe", values={"secretKey": "pk_test_oops", "nope": "x"})
        error = caught.value
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert dict(error.field_violations).keys() == {"values.secretKey", "values.nope"}
        assert all(description for _, description in error.field_violations)
        assert error.fields == [field for field, _ in error.field_violations]
        assert error.request_id
        assert "pk_test_oops" not in str(error)

        with pytest.raises(InvalidArgument) as caught:
            await client.get_config("has space", "stripe")
        assert caught.value.fields == ["organization_id"]
        with pytest.raises(InvalidArgument) as caught:
            await client.list_providers("has space")
        assert caught.value.fields == ["organization_id"]
        with pytest.raises(InvalidArgument) as caught:
            await client.save(new_org(), "stripe")  # nothing to set or clear
        assert caught.value.fields == ["values"]


async def test_unknown_provider_is_provider_not_found(svc: Running) -> None:
    org = new_org()
    async with IntegrationsClient(svc.target) as client:
        for call in (
            client.get_config(org, "paypal"),
            client.get_masked_config(org, "paypal"),
            client.save(org, "paypal", values={"k": "v"}),
            client.delete(org, "paypal"),
        ):
            with pytest.raises(ProviderNotFound) as caught:
                await call
            assert isinstance(caught.value, NotFound)
            assert "paypal" in caught.value.message
            assert caught.value.request_id


async def test_undecryptable_value_is_data_loss(svc: Running, tmp_path: Path) -> None:
    org = new_org()
    async with IntegrationsClient(svc.target) as client:
        await client.save(org, "stripe", values=STRIPE)
        # Tamper with the stored ciphertext behind the service's back.
        with closing(sqlite3.connect(tmp_path / "store.sqlite3")) as db, db:
            (text,) = db.execute(
                "SELECT config FROM integration_config WHERE organization_id = ? AND provider = 'stripe'", (org,)
            ).fetchone()
            config = json.loads(text)
            stored = config["secretKey"]
            middle = len(stored) // 2
            config["secretKey"] = stored[:middle] + ("A" if stored[middle] != "A" else "B") + stored[middle + 1 :]
            db.execute(
                "UPDATE integration_config SET config = ? WHERE organization_id = ? AND provider = 'stripe'",
                (json.dumps(config), org),
            )
        with pytest.raises(DataLoss) as caught:
            await client.get_config(org, "stripe")
    assert caught.value.code is grpc.StatusCode.DATA_LOSS
    assert "secretKey" in caught.value.message
    assert SK not in str(caught.value)


@pytest.mark.parametrize(
    ("code", "error_type"),
    [
        (grpc.StatusCode.PERMISSION_DENIED, PermissionDenied),
        (grpc.StatusCode.UNAUTHENTICATED, Unauthenticated),
        (grpc.StatusCode.FAILED_PRECONDITION, FailedPrecondition),
        (grpc.StatusCode.DATA_LOSS, DataLoss),
        (grpc.StatusCode.ABORTED, Conflict),
        (grpc.StatusCode.NOT_FOUND, NotFound),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded),
        (grpc.StatusCode.INTERNAL, InternalError),
        (grpc.StatusCode.UNKNOWN, InternalError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, InternalError),
    ],
)
async def test_every_status_maps_to_its_error_type(
    fake: FakeServer, code: grpc.StatusCode, error_type: type[IntegrationsError]
) -> None:
    fake.script.fail("DeleteIntegration", code)
    async with IntegrationsClient(fake.target) as client:
        with pytest.raises(error_type) as caught:
            await client.delete("org_1", "stripe")
    assert type(caught.value) is error_type
    assert caught.value.code is code
    assert caught.value.message.startswith(f"injected {code.name}")  # DEADLINE_EXCEEDED adds the target
    assert isinstance(caught.value.__cause__, grpc.aio.AioRpcError)


async def test_nothing_listening_is_unavailable(tmp_path: Path) -> None:
    target = f"127.0.0.1:{free_port()}"
    async with IntegrationsClient(target, wait_for_ready=False) as fail_fast:
        started = time.monotonic()
        with pytest.raises(Unavailable) as caught:
            await fail_fast.get_config(new_org(), "stripe")
        assert caught.value.code is grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 1.5  # retries on UNAVAILABLE are quick and bounded
    # The default waits for the service, up to the deadline: still an Unavailable, as DeadlineExceeded.
    async with IntegrationsClient(target, timeout=0.3) as waiting:
        with pytest.raises(Unavailable) as caught:
            await waiting.list_providers()
        assert isinstance(caught.value, DeadlineExceeded)


async def test_every_call_has_the_deadline(fake: FakeServer) -> None:
    fake.script.delays["ListProviders"] = 1.0
    async with IntegrationsClient(fake.target, timeout=0.2) as client:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await client.list_providers()
        assert time.monotonic() - started < 0.9
        assert (await client.list_providers(timeout=3.0))[0].id == "stripe"  # a per-call timeout wins


# --- retries: reads on UNAVAILABLE, writes never ----------------------------------------------------------


async def test_reads_are_retried_on_unavailable_writes_are_not(fake: FakeServer) -> None:
    async with IntegrationsClient(fake.target, cache_ttl=0) as client:
        fake.script.fail("GetProviderConfig", grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE)
        creds = await client.get_config("org_1", "stripe")
        assert creds["secretKey"] == SK
        assert fake.script.calls["GetProviderConfig"] == 3

        fake.script.fail("ListProviders", grpc.StatusCode.UNAVAILABLE)
        assert len(await client.list_providers()) == 1
        assert fake.script.calls["ListProviders"] == 2

        fake.script.fail("SaveIntegration", grpc.StatusCode.UNAVAILABLE)
        with pytest.raises(Unavailable):
            await client.save("org_1", "stripe", values={"secretKey": SK})
        assert fake.script.calls["SaveIntegration"] == 1
        fake.script.fail("DeleteIntegration", grpc.StatusCode.UNAVAILABLE)
        with pytest.raises(Unavailable):
            await client.delete("org_1", "stripe")
        assert fake.script.calls["DeleteIntegration"] == 1

        # Only UNAVAILABLE is retried, and only up to maxAttempts.
        fake.script.fail("GetProviderConfig", grpc.StatusCode.INTERNAL)
        with pytest.raises(InternalError):
            await client.get_config("org_1", "stripe")
        assert fake.script.calls["GetProviderConfig"] == 4
        attempts = SERVICE_CONFIG["methodConfig"][0]["retryPolicy"]["maxAttempts"]
        fake.script.fail("GetProviderConfig", *[grpc.StatusCode.UNAVAILABLE] * attempts)
        with pytest.raises(Unavailable):
            await client.get_config("org_1", "stripe")
        assert fake.script.calls["GetProviderConfig"] == 4 + attempts


def test_channel_options_meet_the_server_keepalive_policy() -> None:
    options = dict(channel_options(None))
    server = dict(service_server.Keepalive().options())
    assert options["grpc.keepalive_time_ms"] >= server["grpc.http2.min_ping_interval_without_data_ms"]
    assert options["grpc.keepalive_time_ms"] >= service_server.MIN_CLIENT_PING_INTERVAL * 1000
    assert options["grpc.keepalive_permit_without_calls"] == 1
    # The ack of a ping is timed out by ping_timeout (gRPC core), so both say 10 s.
    assert options["grpc.http2.ping_timeout_ms"] == options["grpc.keepalive_timeout_ms"] == 10_000
    assert options["grpc.enable_retries"] == 1
    config = json.loads(options["grpc.service_config"])
    methods = {name["method"] for entry in config["methodConfig"] for name in entry["name"]}
    assert methods == {"ListProviders", "GetProviderConfig"}


# --- the cache ---------------------------------------------------------------------------------------------


async def test_cache_ttl_with_an_injected_clock(svc: Running) -> None:
    org, clock = new_org(), FakeClock()
    with rpc_log() as served:
        async with IntegrationsClient(svc.target, clock=clock, cache_ttl=30) as client:
            await client.save(org, "stripe", values=STRIPE)
            first = await client.get_config(org, "stripe")
            clock.advance(29.9)
            assert await client.get_config(org, "stripe") is first  # within the TTL: no RPC
            assert (client.cache_stats.rpc_count, client.cache_stats.hits) == (1, 1)
            assert served.count("GetProviderConfig", org) == 1
            clock.advance(0.2)
            again = await client.get_config(org, "stripe")  # past it: read again
            assert again == first
            assert client.cache_stats.rpc_count == 2
            assert served.count("GetProviderConfig", org) == 2


async def test_cache_ttl_zero_disables_the_cache(svc: Running) -> None:
    org = new_org()
    async with IntegrationsClient(svc.target, cache_ttl=0) as client:
        for _ in range(3):
            await client.get_config(org, "stripe")
        assert client.cache_stats.rpc_count == 3
        assert client.cache_stats.hits == 0
        assert client.cache_stats.size == 0


async def test_cache_is_bounded_lru(svc: Running) -> None:
    orgs = [new_org() for _ in range(3)]
    async with IntegrationsClient(svc.target, cache_max_entries=2) as client:
        await client.get_config(orgs[0], "stripe")
        await client.get_config(orgs[1], "stripe")
        await client.get_config(orgs[0], "stripe")  # orgs[0] is now the most recently used
        await client.get_config(orgs[2], "stripe")  # evicts orgs[1]
        stats = client.cache_stats
        assert (stats.size, stats.evictions, stats.rpc_count) == (2, 1, 3)
        await client.get_config(orgs[0], "stripe")
        assert client.cache_stats.rpc_count == 3
        await client.get_config(orgs[1], "stripe")
        assert client.cache_stats.rpc_count == 4


async def test_save_delete_and_invalidate_forget_the_cached_value(svc: Running) -> None:
    org = new_org()
    async with IntegrationsClient(svc.target) as client:
        await client.save(org, "stripe", values=STRIPE)
        assert (await client.get_config(org, "stripe"))["secretKey"] == SK
        await client.save(org, "stripe", values={"secretKey": SK_2})
        assert (await client.get_config(org, "stripe"))["secretKey"] == SK_2
        await client.delete(org, "stripe")
        assert "secretKey" not in await client.get_config(org, "stripe")
        assert client.cache_stats.rpc_count == 3

        await client.get_config(org, "resend")
        client.invalidate(org, "stripe")
        await client.get_config(org, "resend")
        assert client.cache_stats.rpc_count == 4  # resend still cached
        await client.get_config(org, "stripe")
        assert client.cache_stats.rpc_count == 5
        client.invalidate()
        await client.get_config(org, "stripe")
        await client.get_config(org, "resend")
        assert client.cache_stats.rpc_count == 7
        assert client.cache_stats.size == 2
        client.invalidate(org)
        assert client.cache_stats.size == 0
        with pytest.raises(ValueError, match="organization_id"):
            client.invalidate(provider="stripe")


async def test_single_flight_one_rpc_for_100_concurrent_cold_callers(svc: Running) -> None:
    org = new_org()
    with rpc_log() as served:
        async with IntegrationsClient(svc.target) as client:
            await client.save(org, "stripe", values=STRIPE)
            results = await asyncio.gather(*(client.get_config(org, "stripe") for _ in range(100)))
            stats = client.cache_stats
    assert all(result is results[0] for result in results)
    assert results[0]["secretKey"] == SK
    assert (stats.rpc_count, stats.misses, stats.coalesced, stats.hits) == (1, 100, 99, 0)
    assert served.count("GetProviderConfig", org) == 1


async def test_single_flight_shares_errors_too(svc: Running) -> None:
    org = new_org()
    with rpc_log() as served:
        async with IntegrationsClient(svc.target) as client:
            results = await asyncio.gather(
                *(client.get_config(org, "paypal") for _ in range(20)), return_exceptions=True
            )
            assert all(isinstance(r, ProviderNotFound) for r in results)
            assert client.cache_stats.rpc_count == 1
        # The server writes its line just after the status has gone out: give it a moment on a busy machine.
        for _ in range(50):
            if served.count("GetProviderConfig", org):
                break
            await asyncio.sleep(0.02)
    assert served.count("GetProviderConfig", org) == 1


async def test_a_cancelled_caller_does_not_cancel_the_shared_read(fake: FakeServer) -> None:
    fake.script.delays["GetProviderConfig"] = 0.3
    async with IntegrationsClient(fake.target) as client:
        impatient = asyncio.ensure_future(client.get_config("org_1", "stripe"))
        patient = asyncio.ensure_future(client.get_config("org_1", "stripe"))
        await asyncio.sleep(0.1)
        impatient.cancel()
        assert (await patient)["secretKey"] == SK
        assert fake.script.calls["GetProviderConfig"] == 1
        await client.get_config("org_1", "stripe")  # cached by the shared read
        assert fake.script.calls["GetProviderConfig"] == 1


async def test_invalidate_during_a_read_in_flight_drops_its_result(fake: FakeServer) -> None:
    fake.script.delays["GetProviderConfig"] = 0.3
    async with IntegrationsClient(fake.target) as client:
        before = asyncio.ensure_future(client.get_config("org_1", "stripe"))
        await asyncio.sleep(0.1)
        client.invalidate("org_1", "stripe")  # e.g. a save landed meanwhile
        after = asyncio.ensure_future(client.get_config("org_1", "stripe"))  # does not join the old read
        await asyncio.gather(before, after)
        assert fake.script.calls["GetProviderConfig"] == 2
        await client.get_config("org_1", "stripe")
        assert fake.script.calls["GetProviderConfig"] == 2  # the newer read was cached


async def test_closing_the_client_fails_its_calls_in_flight_with_client_closed(fake: FakeServer) -> None:
    """close() cancels the calls in flight: each caller gets ClientClosed, not an asyncio.CancelledError its own
    task never asked for (a TaskGroup or a web framework would take that for its own cancellation)."""
    fake.script.delays["GetProviderConfig"] = fake.script.delays["ListProviders"] = 1.0
    client = IntegrationsClient(fake.target, watch=False)
    uncached = IntegrationsClient(fake.target, cache_ttl=0)
    pending = [
        asyncio.ensure_future(client.get_config("org_1", "stripe")),
        asyncio.ensure_future(client.get_config("org_1", "stripe")),  # joins the first one's read
        asyncio.ensure_future(client.list_providers()),
        asyncio.ensure_future(uncached.get_config("org_1", "stripe")),
    ]
    await asyncio.sleep(0.2)
    await client.close()
    await uncached.close()
    for call in pending:
        with pytest.raises(ClientClosed, match="closed") as caught:
            await call
        assert caught.value.code is grpc.StatusCode.CANCELLED
    assert isinstance(caught.value, IntegrationsError)
    assert isinstance(caught.value, RuntimeError)  # what use after close raised before: still caught the same way
    with pytest.raises(ClientClosed, match="is closed"):
        await client.get_config("org_1", "stripe")
    with pytest.raises(ClientClosed, match="is closed"):
        await client.list_providers()


async def test_a_cancelled_caller_of_an_uncached_read_is_still_cancelled(fake: FakeServer) -> None:
    fake.script.delays["GetProviderConfig"] = 1.0
    async with IntegrationsClient(fake.target, cache_ttl=0) as client:
        caller = asyncio.ensure_future(client.get_config("org_1", "stripe"))
        await asyncio.sleep(0.2)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller


async def test_a_caller_joining_a_slower_read_gives_up_at_its_own_deadline(fake: FakeServer) -> None:
    """Single-flight does not stretch a caller's deadline to the one of the read it joined."""
    fake.script.delays["GetProviderConfig"] = 1.0
    async with IntegrationsClient(fake.target, watch=False) as client:
        patient = asyncio.ensure_future(client.get_config("org_1", "stripe", timeout=5))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match=r"within 0.2 s") as caught:
            await client.get_config("org_1", "stripe", timeout=0.2)
        assert time.monotonic() - started < 0.6
        assert caught.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
        assert (await patient)["secretKey"] == SK  # the shared read went on
        assert fake.script.calls["GetProviderConfig"] == 1
        assert client.cache_stats.coalesced == 1


async def test_a_caller_joining_a_slow_refresh_gets_the_stale_value_at_its_deadline(fake: FakeServer) -> None:
    clock = FakeClock()
    async with IntegrationsClient(fake.target, watch=False, clock=clock, cache_ttl=30, stale_if_error=300) as client:
        cached = await client.get_config("org_1", "stripe")
        clock.advance(31)
        fake.script.delays["GetProviderConfig"] = 1.0
        patient = asyncio.ensure_future(client.get_config("org_1", "stripe", timeout=5))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        assert await client.get_config("org_1", "stripe", timeout=0.2) is cached
        assert time.monotonic() - started < 0.6
        assert client.cache_stats.stale_served == 1
        await patient


# --- outages: stale-if-error, recovery, restarts ------------------------------------------------------------


async def test_stale_if_error_then_unavailable_then_recovery(
    tmp_path: Path, processes: Processes, caplog: pytest.LogCaptureFixture
) -> None:
    target = f"127.0.0.1:{free_port()}"
    env = serve_env(tmp_path, target)
    process = await asyncio.to_thread(processes.serve, tmp_path, env, target=target)
    org, clock = new_org(), FakeClock()
    # The stale-if-error rules alone: a watch would evict the value the other client changes (test_client_watch.py).
    client = IntegrationsClient(target, clock=clock, cache_ttl=30, stale_if_error=300, timeout=0.5, watch=False)
    writer = IntegrationsClient(target, cache_ttl=0)
    async with client, writer:
        await writer.save(org, "stripe", values=STRIPE)
        cached = await client.get_config(org, "stripe")
        assert cached["secretKey"] == SK
        await writer.save(org, "stripe", values={"secretKey": SK_2})  # the client's cache still holds SK
        assert served_rpcs(process.stderr, "GetProviderConfig", org) == 1

        process.kill()  # SIGKILL: no goodbye to the clients
        clock.advance(31)  # past the TTL
        with caplog.at_level(logging.WARNING, logger="integrations_client"):
            stale = await client.get_config(org, "stripe")
        assert stale is cached
        assert (client.cache_stats.stale_served, client.cache_stats.rpc_count) == (1, 2)
        warnings = [r.getMessage() for r in caplog.records if r.name == "integrations_client"]
        assert len(warnings) == 1
        assert all(word in warnings[0] for word in (org, "stripe", "TTL"))
        assert not any(secret in warnings[0] for secret in SECRETS)

        clock.advance(1)  # within the retry interval: served stale without trying the service
        assert await client.get_config(org, "stripe") is cached
        assert (client.cache_stats.stale_served, client.cache_stats.rpc_count) == (2, 2)

        clock.advance(300)  # past the stale-if-error window: the outage shows
        with pytest.raises(Unavailable):
            await client.get_config(org, "stripe")

        await asyncio.to_thread(processes.serve, tmp_path, env, target=target)  # same port, key, database
        fresh = await client.get_config(org, "stripe", timeout=10)
        assert fresh["secretKey"] == SK_2
        assert client.cache_stats.stale_served == 2


async def test_stale_value_recovers_within_the_window(tmp_path: Path, processes: Processes) -> None:
    target = f"127.0.0.1:{free_port()}"
    env = serve_env(tmp_path, target)
    process = await asyncio.to_thread(processes.serve, tmp_path, env, target=target)
    org, clock = new_org(), FakeClock()
    # Without the watch, whose resubscription after the restart would invalidate the fresh value (by design).
    async with IntegrationsClient(target, clock=clock, cache_ttl=30, timeout=0.5, watch=False) as client:
        await client.save(org, "stripe", values=STRIPE)
        await client.get_config(org, "stripe")
        await asyncio.to_thread(process.terminate)  # SIGTERM: a graceful stop
        clock.advance(31)
        assert (await client.get_config(org, "stripe"))["secretKey"] == SK
        assert client.cache_stats.stale_served == 1

        await asyncio.to_thread(processes.serve, tmp_path, env, target=target)
        # Every retry interval (5 s here) one call tries the service again; until the channel has
        # reconnected (it may still be backing off from the outage) the stale value is served.
        for _ in range(50):
            clock.advance(5)
            stale_before = client.cache_stats.stale_served
            assert (await client.get_config(org, "stripe"))["secretKey"] == SK
            if client.cache_stats.stale_served == stale_before:
                break
            await asyncio.sleep(0.2)
        else:
            pytest.fail("the client never read from the restarted service")
        # Fresh again: served from the service, so the value is cached for a full TTL.
        stats = client.cache_stats
        clock.advance(29)
        await client.get_config(org, "stripe")
        assert client.cache_stats.rpc_count == stats.rpc_count
        assert client.cache_stats.hits == stats.hits + 1


async def test_a_read_during_a_restart_waits_for_the_service(tmp_path: Path, processes: Processes) -> None:
    """Behaviour chosen: calls wait for the service (wait-for-ready) up to their deadline.

    A read started while the service is down succeeds if the service is back
    before the read's deadline; gRPC retries (UNAVAILABLE, up to 4 attempts)
    cover a connection that breaks during the call.
    """
    target = f"127.0.0.1:{free_port()}"
    env = serve_env(tmp_path, target)
    process = await asyncio.to_thread(processes.serve, tmp_path, env, target=target)
    org = new_org()
    async with IntegrationsClient(target, cache_ttl=0, timeout=15) as client:
        await client.save(org, "stripe", values=STRIPE)
        await asyncio.to_thread(process.terminate)
        pending = asyncio.ensure_future(client.get_config(org, "stripe"))
        listing = asyncio.ensure_future(client.list_providers(org))
        await asyncio.sleep(0.3)
        assert not pending.done()
        await asyncio.to_thread(processes.serve, tmp_path, env, target=target)
        assert (await pending)["secretKey"] == SK
        assert (await listing)[0].configured


# --- ProviderCredentials never shows a secret --------------------------------------------------------------


async def test_repr_of_credentials_shows_keys_and_sources_only(svc: Running) -> None:
    org = new_org()
    async with IntegrationsClient(svc.target) as client:
        await client.save(org, "stripe", values=STRIPE)
        creds = await client.get_config(org, "stripe")
    shown = [repr(creds), str(creds), f"{creds}", repr(creds.values), str(creds.values), repr(creds.sources)]
    for text in shown:
        assert not any(secret in text for secret in SECRETS), text
    assert all(word in repr(creds) for word in ("secretKey", "organization", "environment"))
    assert PK not in repr(creds)  # not even the publishable key


# --- configuration: from_env, TLS ----------------------------------------------------------------------------


def test_from_env_plaintext_and_tls_and_errors(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    client = IntegrationsClient.from_env({"INTEGRATIONS_SERVICE_TARGET": "127.0.0.1:1"}, cache_ttl=5)
    assert client.target == "127.0.0.1:1"
    assert client.tls is None
    tls_env = {
        "INTEGRATIONS_SERVICE_TARGET": "integrations.internal:443",
        "INTEGRATIONS_CLIENT_CA": str(pki.ca),
        "INTEGRATIONS_CLIENT_CERT": str(pki.commerce_cert),
        "INTEGRATIONS_CLIENT_KEY": str(pki.commerce_key),
    }
    tls_client = IntegrationsClient.from_env(tls_env)
    assert tls_client.tls == TlsConfig(str(pki.ca), str(pki.commerce_cert), str(pki.commerce_key))

    with pytest.raises(ConfigurationError, match="INTEGRATIONS_SERVICE_TARGET"):
        IntegrationsClient.from_env({})
    partial = {k: v for k, v in tls_env.items() if k != "INTEGRATIONS_CLIENT_KEY"}
    with pytest.raises(ConfigurationError, match="INTEGRATIONS_CLIENT_KEY") as caught:
        IntegrationsClient.from_env(partial)
    assert "INTEGRATIONS_CLIENT_CA" not in str(caught.value).split(" is not set")[0]
    with pytest.raises(ConfigurationError, match="cert_file"):
        IntegrationsClient.from_env({**tls_env, "INTEGRATIONS_CLIENT_CERT": str(tmp_path / "missing.pem")})


async def test_mutual_tls_with_the_real_service(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    policy = tmp_path / "policy.toml"
    policy.write_text(
        '[[callers]]\ndns = "commerce.internal"\nrole = "commerce"\n\n'
        '[[callers]]\ndns = "dashboard.internal"\nrole = "dashboard"\n'
    )
    tls_env = {
        "INTEGRATIONS_TLS_CERT": str(pki.server_cert),
        "INTEGRATIONS_TLS_KEY": str(pki.server_key),
        "INTEGRATIONS_TLS_CLIENT_CA": str(pki.ca),
        "INTEGRATIONS_AUTHZ_POLICY": str(policy),
        **ENV_DEFAULTS,
    }
    running = await start_service(f"sqlite:///{tmp_path / 'store.sqlite3'}", tmp_path, tls_env)
    org = new_org()
    commerce_tls = TlsConfig(pki.ca, pki.commerce_cert, pki.commerce_key)
    dashboard_tls = TlsConfig(
        pki.ca, pki.dashboard_cert, pki.dashboard_key, server_name_override="integrations.internal"
    )
    try:
        async with IntegrationsClient(running.target, tls=dashboard_tls) as dashboard:
            await dashboard.save(org, "stripe", values=STRIPE)
            with pytest.raises(PermissionDenied) as denied:
                await dashboard.get_config(org, "stripe")  # the dashboard may not read decrypted values
            assert "dashboard.internal" in denied.value.message
        async with IntegrationsClient(running.target, tls=commerce_tls) as commerce:
            assert (await commerce.get_config(org, "stripe"))["secretKey"] == SK
            with pytest.raises(PermissionDenied):
                await commerce.save(org, "stripe", values=STRIPE)
        rogue_tls = TlsConfig(pki.ca, pki.rogue_cert, pki.rogue_key)
        async with IntegrationsClient(running.target, tls=rogue_tls, timeout=1, wait_for_ready=False) as rogue:
            with pytest.raises(Unavailable):  # the handshake fails: a certificate of another CA
                await rogue.get_config(org, "stripe")
        async with IntegrationsClient(running.target, timeout=1, wait_for_ready=False) as plaintext:
            with pytest.raises(Unavailable):
                await plaintext.list_providers()
    finally:
        await running.close()


async def test_mutual_tls_presents_the_client_certificate(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    server = await start_fake_server(server_credentials(pki))
    try:
        tls = TlsConfig(pki.ca, pki.commerce_cert, pki.commerce_key, server_name_override="integrations.internal")
        async with IntegrationsClient(server.target, tls=tls) as client:
            assert (await client.get_config("org_1", "stripe"))["secretKey"] == SK
        # The cache's watch stream presents it too.
        assert sorted(server.script.peers) == [
            ("GetProviderConfig", "commerce.internal"),
            ("WatchConfigChanges", "commerce.internal"),
        ]
    finally:
        await server.stop()


# --- the README's example runs ------------------------------------------------------------------------------


README = Path(__file__).resolve().parents[2] / "clients" / "python" / "README.md"


def readme_example() -> str:
    quick_start = README.read_text().split("## Quick start", 1)[1]
    return quick_start.split("```python\n", 1)[1].split("```", 1)[0]


async def test_readme_quick_start_runs(svc: Running, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(readme_example())
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        env=clean_env({"INTEGRATIONS_SERVICE_TARGET": svc.target}),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, stderr.decode()
    output = stdout.decode()
    assert "••••••••4242" in output
    assert "values.secretKey" in output
    assert "sk_test_51DemoSecretKey000000004242" not in output
