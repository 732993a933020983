"""Wiring: builds the whole service from `Settings`, and takes it down again.

The only module that knows every layer; the layers themselves only know the
ones below them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1._async import HealthServicer

from integrations_service.api.auth import Authorizer, Policy
from integrations_service.api.readiness import Readiness
from integrations_service.api.server import SERVICE_NAME, Keepalive, build_server, listen, mark_serving
from integrations_service.api.tls import ReloadingCredentials
from integrations_service.config import ENCRYPTION_KEY_FILE_ENV, KEY_MATERIAL_ENVS, Mode, Settings
from integrations_service.crypto import Keyring, ValueCipher
from integrations_service.devkey import load_or_create_dev_key
from integrations_service.domain.audit import AuditTrail
from integrations_service.domain.audit_pages import AuditPages
from integrations_service.domain.key_ledger import EncryptionCounter, KeyUsage
from integrations_service.domain.service import CredentialService
from integrations_service.domain.watch import ChangeWatches
from integrations_service.errors import ConfigurationError
from integrations_service.metrics import Metrics
from integrations_service.sealing import LegacyPolicy, Sealer, holds_no_clear_text
from integrations_service.store import IntegrationStore
from integrations_service.store.cached import CachingStore
from integrations_service.store.factory import backend_name, open_store
from integrations_service.store.instrumented import instrumented

log = logging.getLogger("integrations.app")


@dataclass
class RunningService:
    server: grpc.aio.Server
    health: HealthServicer
    store: IntegrationStore
    audit: AuditTrail
    key_usage: KeyUsage
    port: int
    metrics: Metrics
    metrics_port: int | None
    readiness: Readiness
    watches: ChangeWatches

    async def stop(self, grace: float) -> None:
        """Health goes NOT_SERVING, new calls are refused, in-flight ones get `grace` seconds.

        Watch streams end at once with UNAVAILABLE (reconnect elsewhere): they would hold the grace period
        until its end, and their consumers are better off on a replica that stays.
        """
        await self.readiness.close()
        await self.health.enter_graceful_shutdown()
        self.watches.shutdown()
        await self.server.stop(grace)
        await _close_in_order(self.audit, self.key_usage, self.store, self.metrics)
        log.info("stopped", extra={"event": "stopped"})
        await self.metrics.close()


async def _close_in_order(
    audit: AuditTrail, key_usage: KeyUsage, store: IntegrationStore, metrics: Metrics | None = None
) -> None:
    """The store last (the others write to it), and each whatever the others did: a failed audit flush must not
    keep the encryption counts, which the nonce budget depends on, from being saved.

    A worker's metrics are copied to the supervisor's files one last time just before the store closes: after the
    last counts (the audit flush counts the records it gives up), while what is read at scrape time can still read
    the store.
    """

    async def copy_metrics() -> None:
        if metrics is not None:
            metrics.last_copy()

    steps: Sequence[tuple[str, Callable[[], Awaitable[None]]]] = (
        ("audit", audit.close),
        ("key_usage", key_usage.close),
        ("metrics", copy_metrics),
        ("store", store.close),
    )
    for step, close in steps:
        try:
            await close()
        except Exception:
            log.exception(
                "a shutdown step failed; going on with the others", extra={"event": "stop_failed", "store": step}
            )


@dataclass(frozen=True)
class Maintenance:
    """What the `rotate` and `retire-key` commands work with: the checked store, the cipher, and the audit trail."""

    store: IntegrationStore
    cipher: ValueCipher
    audit: AuditTrail


@contextlib.asynccontextmanager
async def maintenance(settings: Settings, pool_size: int) -> AsyncIterator[Maintenance]:
    """The collaborators of a one-off command, closed afterwards as `RunningService.stop` closes the service's."""
    cipher, counter = _cipher(settings)
    store, key_usage = await open_checked_store(settings, cipher, counter, pool_size)
    audit = AuditTrail(store)
    try:
        yield Maintenance(store, cipher, audit)
    finally:
        await _close_in_order(audit, key_usage, store)


async def migrate(settings: Settings) -> None:
    """Apply the migrations (opening the store does) without needing the encryption keys."""
    store = await open_store(settings.database_url, settings.data_dir, timeout=settings.db_timeout, pool_size=1)
    await store.close()


def _cipher(settings: Settings) -> tuple[ValueCipher, EncryptionCounter]:
    """The cipher, and the counter it reports its encryptions to (for the nonce budget)."""
    counter = EncryptionCounter()
    return ValueCipher(resolve_keyring(settings), monitor=counter), counter


def resolve_keyring(settings: Settings) -> Keyring:
    if settings.keyring is not None:
        return settings.keyring
    if settings.mode is Mode.PRODUCTION:  # load_settings already refuses this; belt and braces
        raise ConfigurationError("a dedicated encryption key is required in production mode")
    return load_or_create_dev_key(settings.dev_key_path)


def check_security_files(settings: Settings) -> None:
    """Load the policy and TLS files as `start` would, without opening the store or a port (`serve --check`)."""
    _security(settings)


def _security(settings: Settings) -> tuple[grpc.ServerCredentials | None, Authorizer]:
    """Mutual TLS with the policy, or plaintext that trusts every caller (development, loopback)."""
    policy = Policy.load(settings.authz_policy) if settings.authz_policy else None
    if settings.tls is None:
        log.warning(
            "serving plaintext without client authentication: every caller is trusted (development only)",
            extra={"event": "plaintext", "address": settings.listen_address},
        )
        return None, Authorizer(None)
    return ReloadingCredentials(settings.tls).server_credentials(), Authorizer(policy)


async def open_checked_store(
    settings: Settings,
    cipher: ValueCipher,
    counter: EncryptionCounter,
    pool_size: int,
    metrics: Metrics | None = None,
    *,
    listen: bool = False,
) -> tuple[IntegrationStore, KeyUsage]:
    """The store, migrated, with the configured keys proven to be the ones its data was written with."""
    store = await open_store(
        settings.database_url, settings.data_dir, timeout=settings.db_timeout, pool_size=pool_size, listen=listen
    )
    if metrics is not None:
        store = instrumented(store, metrics)
    key_usage = KeyUsage(store, cipher, counter)
    try:
        await key_usage.verify()
    except BaseException:
        await store.close()
        raise
    return store, key_usage


def _warn_if_key_in_environment(settings: Settings) -> None:
    """Popping the variable from os.environ does not clear /proc/PID/environ: the key stays readable there."""
    if settings.mode is Mode.PRODUCTION and settings.key_source in KEY_MATERIAL_ENVS:
        log.warning(
            "the encryption key comes from %s: it stays readable in /proc/<pid>/environ to root and to this "
            "user for the life of the process; use %s (a 0600 file) instead",
            settings.key_source,
            ENCRYPTION_KEY_FILE_ENV,
            extra={"event": "key_in_environment", "variable": settings.key_source},
        )


def _legacy_policy(settings: Settings, metrics: Metrics) -> LegacyPolicy:
    return LegacyPolicy(
        settings.legacy_values,
        count_read=lambda fmt, provider: metrics.legacy_values_read.labels(fmt, provider).inc(),
        count_refused=lambda fmt, provider: metrics.legacy_values_refused.labels(fmt, provider).inc(),
    )


@dataclass
class Domain:
    """The service below its API, as `start` serves it: what a benchmark can also drive without gRPC."""

    store: IntegrationStore  # with its row cache, when one is configured
    key_usage: KeyUsage
    audit: AuditTrail  # not started: `start` starts it once the server is up
    service: CredentialService
    key_id: str  # the active key's id


async def open_domain(settings: Settings, metrics: Metrics) -> Domain:
    """The checked store (listening to its change feed), the row cache, the audit trail and the use cases."""
    cipher, counter = _cipher(settings)
    store, key_usage = await open_checked_store(settings, cipher, counter, settings.db_pool_size, metrics, listen=True)
    store = _with_row_cache(store, settings, metrics)
    audit = AuditTrail(store, reads=settings.audit_reads)
    try:
        sealer = Sealer(cipher, _legacy_policy(settings, metrics))
        service = CredentialService(store, sealer, settings.provider_defaults, audit)
    except BaseException:
        await store.close()
        raise
    return Domain(store, key_usage, audit, service, cipher.active_key_id)


async def start(settings: Settings) -> RunningService:
    _warn_if_key_in_environment(settings)
    credentials, authorizer = _security(settings)  # bad TLS files or policy stop us before the store opens
    metrics = Metrics()
    domain = await open_domain(settings, metrics)
    store, key_usage, audit, service = domain.store, domain.key_usage, domain.audit, domain.service
    try:
        watches = ChangeWatches(store.changes(), queue_size=settings.watch_queue_size)
        metrics.watches.counts = watches.counts
        server, health_servicer = build_server(
            service,
            audit,
            AuditPages(store),
            authorizer,
            metrics,
            watches,
            reflection_enabled=settings.reflection,
            keepalive=Keepalive(settings.keepalive_time, settings.keepalive_timeout),
        )
        port = listen(server, settings.listen_address, credentials)
        metrics_port = _serve_metrics(metrics, settings.metrics_address, store, audit, key_usage)
        await server.start()
    except BaseException:
        await store.close()
        raise
    audit.start()
    key_usage.start()
    await mark_serving(health_servicer)
    readiness = Readiness(health_servicer, SERVICE_NAME, store.ping)
    metrics.store_unavailable_listeners.append(readiness.store_unavailable)
    readiness.start()
    log.info(
        "serving",
        extra={
            "event": "serving",
            "address": settings.listen_address,
            "mode": settings.mode.value,
            # The backend, not the wrappers around it (timing, row cache).
            "store": backend_name(settings.database_url),
            "key_id": domain.key_id,
        },
    )
    return RunningService(
        server, health_servicer, store, audit, key_usage, port, metrics, metrics_port, readiness, watches
    )


def _with_row_cache(store: IntegrationStore, settings: Settings, metrics: Metrics) -> IntegrationStore:
    """Reads from memory while the change feed vouches for them (serving only: the commands read once)."""
    if settings.cache_ttl <= 0:
        return store
    cached = CachingStore(store, cacheable=holds_no_clear_text, ttl=settings.cache_ttl)
    metrics.cache.counts = cached.counts
    return cached


def _serve_metrics(
    metrics: Metrics, address: str | None, store: IntegrationStore, audit: AuditTrail, key_usage: KeyUsage
) -> int | None:
    metrics.watch(store, key_usage.totals)
    metrics.audit_buffered.set_function(lambda: audit.buffered)
    metrics.audit_dropped.set_function(lambda: audit.dropped)
    feed = store.changes()
    metrics.change_feed_connected.set_function(lambda: feed is not None and feed.connected)
    metrics.audit_failed.set_function(lambda: audit.failed)
    if address is None:
        return None
    try:
        return metrics.serve(address)
    except OSError as error:
        raise ConfigurationError(
            f"INTEGRATIONS_METRICS_ADDRESS: cannot listen on {address}: {error.strerror}"
        ) from None
