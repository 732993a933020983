"""`IntegrationsClient`: the asyncio client (grpc.aio)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

import grpc

from integrations.v1 import integrations_pb2 as pb
from integrations.v1 import integrations_pb2_grpc as pb_grpc
from integrations_client._cache import Key
from integrations_client._core import (
    DEFAULT_CACHE_MAX_ENTRIES,
    DEFAULT_CACHE_TTL,
    DEFAULT_STALE_IF_ERROR,
    DEFAULT_TIMEOUT,
    ClientCore,
    invalidation_matches,
)
from integrations_client.config import RETIRED_CHANNEL_GRACE, TlsConfig, env_settings
from integrations_client.errors import IntegrationsError
from integrations_client.models import (
    Category,
    Provider,
    ProviderConfig,
    ProviderCredentials,
    config_from_pb,
    credentials_from_pb,
    provider_from_pb,
)

if TYPE_CHECKING:
    from integrations.v1.integrations_pb2_grpc import IntegrationServiceAsyncStub

__all__ = ["IntegrationsClient"]

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")
_Flight = asyncio.Task[tuple[ProviderCredentials, bool]]


class IntegrationsClient(ClientCore):
    """Asyncio client of the integrations service.

    ```python
    async with IntegrationsClient.from_env() as client:
        creds = await client.get_config(org_id, "stripe")
        stripe.api_key = creds["secretKey"]
    ```

    Every call has a deadline (`timeout`, 2 s by default, or the call's own
    `timeout=`). Reads are retried by gRPC on UNAVAILABLE; writes never are.
    With `wait_for_ready` (the default) a call made while the service is
    restarting waits for it, up to its deadline, instead of failing at once.
    `get_config` answers from a cache (see the package README). Build the
    client anywhere; its channel opens on the first call, in the running loop.
    """

    def __init__(
        self,
        target: str,
        *,
        tls: TlsConfig | None = None,
        cache_ttl: float = DEFAULT_CACHE_TTL,
        cache_max_entries: int = DEFAULT_CACHE_MAX_ENTRIES,
        stale_if_error: float = DEFAULT_STALE_IF_ERROR,
        timeout: float = DEFAULT_TIMEOUT,
        wait_for_ready: bool = True,
        clock: Callable[[], float] = time.monotonic,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        super().__init__(
            target,
            tls=tls,
            cache_ttl=cache_ttl,
            cache_max_entries=cache_max_entries,
            stale_if_error=stale_if_error,
            timeout=timeout,
            wait_for_ready=wait_for_ready,
            clock=clock,
            extra_channel_options=channel_options,
        )
        self._channel: grpc.aio.Channel | None = None
        self._stub: IntegrationServiceAsyncStub | None = None
        self._inflight: dict[Key, _Flight] = {}
        self._closed = False
        # Channels replaced after a certificate change, closing once their calls finish.
        self._retired: dict[grpc.aio.Channel, asyncio.Task[None]] = {}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **kwargs: Any) -> Self:
        """A client for INTEGRATIONS_SERVICE_TARGET; mutual TLS when INTEGRATIONS_CLIENT_CA, _CERT and _KEY are set.

        `kwargs` are the constructor's other arguments (cache_ttl=..., timeout=...).
        """
        target, tls = env_settings(environ)
        return cls(target, tls=tls, **kwargs)

    # --- lifecycle -------------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel (cancelling calls in flight) and forgets the cache. Idempotent."""
        self._closed = True
        channel, self._channel, self._stub = self._channel, None, None
        self._cache.invalidate(lambda _key: True)
        self._inflight.clear()
        retired, self._retired = self._retired, {}
        for task in retired.values():
            task.cancel()
        for old in [*retired, *([channel] if channel is not None else [])]:
            await old.close(grace=None)

    def _service(self) -> IntegrationServiceAsyncStub:
        if self._closed:
            raise RuntimeError("the IntegrationsClient is closed")
        if self._tls_changed() and self._channel is not None:
            self._retire(self._channel)
            self._channel = self._stub = None
        if self._stub is None:
            credentials = self._credentials()
            if credentials is None:
                self._channel = grpc.aio.insecure_channel(self._target, options=self._options)
            else:
                self._channel = grpc.aio.secure_channel(self._target, credentials, options=self._options)
            self._stub = pb_grpc.IntegrationServiceStub(self._channel)
        return self._stub

    def _retire(self, channel: grpc.aio.Channel) -> None:
        """New calls go to a new channel; this one closes when its calls are done (or after the grace period)."""

        async def close_when_idle() -> None:
            await channel.close(grace=RETIRED_CHANNEL_GRACE)
            self._retired.pop(channel, None)

        self._retired[channel] = asyncio.get_running_loop().create_task(close_when_idle())

    async def _call(
        self,
        method: str,
        callable_: grpc.aio.UnaryUnaryMultiCallable[_Request, _Response],
        request: _Request,
        deadline: float | None,
        wait_for_ready: bool,
    ) -> _Response:
        try:
            return await callable_(request, timeout=self._deadline(deadline), wait_for_ready=wait_for_ready)
        except grpc.aio.AioRpcError as error:
            raise self._error(error, method, deadline) from error

    # --- the commerce path -----------------------------------------------------------------------------

    async def get_config(
        self, organization_id: str, provider: str, *, timeout: float | None = None  # noqa: ASYNC109 - gRPC deadline
    ) -> ProviderCredentials:
        """The organization's effective, decrypted configuration of `provider`, from the cache when fresh.

        Concurrent calls for the same key share one read. When the service cannot
        be reached, a value read less than cache_ttl + stale_if_error ago is
        served instead of raising (logged as a warning on "integrations_client").
        """
        key = (organization_id, provider)
        if not self._cache.enabled:
            return await self._read_credentials(key, timeout, self._wait_for_ready)
        cached = self._cache.lookup(key)
        if cached is not None:
            return cached
        self._cache.misses += 1
        flight = self._inflight.get(key)
        if flight is None or flight.done():
            flight = asyncio.get_running_loop().create_task(self._refresh(key, timeout))
            self._inflight[key] = flight
            flight.add_done_callback(lambda done: self._landed(key, done))
        else:
            self._cache.coalesced += 1
        # shield: a caller that gives up (cancelled) does not cancel the read the others wait for.
        value, stale = await asyncio.shield(flight)
        if stale:
            self._cache.stale_served += 1
        return value

    async def _refresh(self, key: Key, deadline: float | None) -> tuple[ProviderCredentials, bool]:
        # With a stale value to fall back on, fail fast rather than wait for a service that is down.
        wait_for_ready = self._wait_for_ready and not self._cache.has_fallback(key)
        started = self._cache.clock()
        try:
            value = await self._read_credentials(key, deadline, wait_for_ready)
        except IntegrationsError as error:
            stale = self._cache.fallback(key, error.code)
            if stale is None:
                raise
            return stale, True
        if self._inflight.get(key) is asyncio.current_task():  # not invalidated while in flight
            self._cache.put(key, value, started)
        return value, False

    def _landed(self, key: Key, flight: _Flight) -> None:
        if self._inflight.get(key) is flight:
            del self._inflight[key]
        if not flight.cancelled():
            flight.exception()  # retrieved: no "exception never retrieved" when every caller gave up

    async def _read_credentials(self, key: Key, deadline: float | None, wait_for_ready: bool) -> ProviderCredentials:
        self._cache.rpc_count += 1
        service = self._service()
        request = self._get_request(key[0], key[1], pb.CONFIG_VIEW_DECRYPTED)
        reply = await self._call("GetProviderConfig", service.GetProviderConfig, request, deadline, wait_for_ready)
        return credentials_from_pb(reply.config)

    def invalidate(self, organization_id: str | None = None, provider: str | None = None) -> None:
        """Forgets cached configs: one (organization, provider), one organization's, or all.

        A read in flight for a forgotten key is not stored, and later callers do not join it.
        """
        if provider is not None and organization_id is None:
            raise ValueError("invalidate(provider=...) needs the organization_id too")

        def matches(key: Key) -> bool:
            return invalidation_matches(key, organization_id, provider)

        self._cache.invalidate(matches)
        for key in [key for key in self._inflight if matches(key)]:
            del self._inflight[key]

    # --- the dashboard side ----------------------------------------------------------------------------

    async def list_providers(
        self, organization_id: str | None = None, category: Category | str | None = None, *,
        timeout: float | None = None,  # noqa: ASYNC109 - the gRPC deadline
    ) -> list[Provider]:
        """The provider catalog, in the service's stable order; with an organization, its configured/ready status."""
        service = self._service()
        request = self._list_request(organization_id, category)
        reply = await self._call("ListProviders", service.ListProviders, request, timeout, self._wait_for_ready)
        return [provider_from_pb(p) for p in reply.providers]

    async def get_masked_config(
        self, organization_id: str, provider: str, *, timeout: float | None = None  # noqa: ASYNC109 - gRPC deadline
    ) -> ProviderConfig:
        """The effective configuration with secrets masked, and its etag (for the dashboard form). Not cached."""
        service = self._service()
        request = self._get_request(organization_id, provider, pb.CONFIG_VIEW_MASKED)
        reply = await self._call("GetProviderConfig", service.GetProviderConfig, request, timeout,
                                 self._wait_for_ready)
        return config_from_pb(reply.config)

    async def save(
        self,
        organization_id: str,
        provider: str,
        values: Mapping[str, str] | None = None,
        clear_fields: Iterable[str] = (),
        etag: str = "",
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the gRPC deadline
    ) -> ProviderConfig:
        """Sets `values` and clears `clear_fields` (other stored fields are kept); returns the masked result.

        With `etag`, raises Conflict if the credentials changed since that read. Never retried.
        """
        service = self._service()
        request = self._save_request(organization_id, provider, values, clear_fields, etag)
        try:
            reply = await self._call("SaveIntegration", service.SaveIntegration, request, timeout,
                                     self._wait_for_ready)
        finally:
            self.invalidate(organization_id, provider)
        return config_from_pb(reply.config)

    async def delete(
        self, organization_id: str, provider: str, allow_missing: bool = False, etag: str = "", *,
        timeout: float | None = None,  # noqa: ASYNC109 - the gRPC deadline
    ) -> None:
        """Removes the organization's stored credentials for `provider` (fields fall back to the environment).

        NotFound when there are none, unless `allow_missing`. Never retried.
        """
        service = self._service()
        request = self._delete_request(organization_id, provider, allow_missing, etag)
        try:
            await self._call("DeleteIntegration", service.DeleteIntegration, request, timeout, self._wait_for_ready)
        finally:
            self.invalidate(organization_id, provider)
