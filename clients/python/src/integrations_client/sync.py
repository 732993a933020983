"""`IntegrationsClientSync`: the blocking client, safe to share between threads (WSGI workers)."""

from __future__ import annotations

import copy
import threading
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
from integrations_client.config import TlsConfig, env_settings
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
    from integrations.v1.integrations_pb2_grpc import IntegrationServiceStub

__all__ = ["IntegrationsClientSync"]

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")


class _Flight:
    """One read in progress; the threads that want the same key wait on `done`."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: ProviderCredentials | None = None
        self.stale = False
        self.error: BaseException | None = None


class _Channel:
    """A channel and the number of calls running on it, so that a replaced one closes only once they are done."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.stub: IntegrationServiceStub = pb_grpc.IntegrationServiceStub(channel)
        self.calls = 0
        self.retired = False


class IntegrationsClientSync(ClientCore):
    """Blocking client of the integrations service, with the same methods and options as `IntegrationsClient`.

    One instance is meant to be shared by every thread of the process (its
    channel, cache and single-flight are thread-safe).
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
        self._current = self._open_channel()
        self._retired: set[_Channel] = set()
        self._lock = threading.Lock()
        self._inflight: dict[Key, _Flight] = {}
        self._closed = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **kwargs: Any) -> Self:
        """A client for INTEGRATIONS_SERVICE_TARGET; mutual TLS when INTEGRATIONS_CLIENT_CA, _CERT and _KEY are set."""
        target, tls = env_settings(environ)
        return cls(target, tls=tls, **kwargs)

    # --- lifecycle -------------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel (cancelling calls in flight) and forgets the cache. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._cache.invalidate(lambda _key: True)
            channels, self._retired = [self._current, *self._retired], set()
        for channel in channels:
            channel.channel.close()

    def _open_channel(self) -> _Channel:
        credentials = self._credentials()
        if credentials is None:
            return _Channel(grpc.insecure_channel(self._target, options=self._options))
        return _Channel(grpc.secure_channel(self._target, credentials, options=self._options))

    def _checkout(self) -> _Channel:
        """The channel for one call; after a certificate change, a new one, the old one retired."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the IntegrationsClientSync is closed")
            if self._tls_changed():
                old, self._current = self._current, self._open_channel()
                old.retired = True
                self._retired.add(old)
                idle = old.calls == 0
            else:
                old, idle = None, False
            self._current.calls += 1
            current = self._current
        if old is not None and idle:
            self._close_retired(old)
        return current

    def _checkin(self, channel: _Channel) -> None:
        with self._lock:
            channel.calls -= 1
            idle = channel.retired and channel.calls == 0
        if idle:
            self._close_retired(channel)

    def _close_retired(self, channel: _Channel) -> None:
        with self._lock:
            if channel not in self._retired:
                return
            self._retired.discard(channel)
        channel.channel.close()

    def _call(
        self,
        method: str,
        select: Callable[[IntegrationServiceStub], grpc.UnaryUnaryMultiCallable[_Request, _Response]],
        request: _Request,
        deadline: float | None,
        wait_for_ready: bool,
    ) -> _Response:
        channel = self._checkout()
        try:
            return select(channel.stub)(request, timeout=self._deadline(deadline), wait_for_ready=wait_for_ready)
        except grpc.RpcError as error:
            raise self._error(error, method, deadline) from error
        finally:
            self._checkin(channel)

    # --- the commerce path -----------------------------------------------------------------------------

    def get_config(self, organization_id: str, provider: str, *, timeout: float | None = None) -> ProviderCredentials:
        """The organization's effective, decrypted configuration of `provider`, from the cache when fresh.

        Concurrent calls for the same key (from any thread) share one read. When the
        service cannot be reached, a value read less than cache_ttl + stale_if_error
        ago is served instead of raising (logged as a warning on "integrations_client").
        """
        key = (organization_id, provider)
        if not self._cache.enabled:
            with self._lock:
                self._cache.rpc_count += 1
            return self._read_credentials(key, timeout, self._wait_for_ready)
        with self._lock:
            cached = self._cache.lookup(key)
            if cached is not None:
                return cached
            self._cache.misses += 1
            flight = self._inflight.get(key)
            leading = flight is None
            # With a stale value to fall back on, fail fast rather than wait for a service that is down.
            wait_for_ready = self._wait_for_ready and not self._cache.has_fallback(key)
            started = self._cache.clock()
            if flight is None:
                flight = self._inflight[key] = _Flight()
                self._cache.rpc_count += 1
            else:
                self._cache.coalesced += 1
        if leading:
            self._lead(key, flight, timeout, wait_for_ready, started)
        else:
            flight.done.wait()
        if flight.error is not None:
            # A copy per thread: one exception object raised in several threads would share a traceback.
            raise copy.copy(flight.error) from flight.error.__cause__
        assert flight.value is not None
        if flight.stale:
            with self._lock:
                self._cache.stale_served += 1
        return flight.value

    def _lead(self, key: Key, flight: _Flight, timeout: float | None, wait_for_ready: bool, started: float) -> None:
        try:
            value = self._read_credentials(key, timeout, wait_for_ready)
        except IntegrationsError as error:
            with self._lock:
                stale = self._cache.fallback(key, error.code)
            if stale is None:
                flight.error = error
            else:
                flight.value, flight.stale = stale, True
        except BaseException as error:  # handed to every waiting thread, each re-raises it
            flight.error = error
        else:
            flight.value = value
            with self._lock:
                if self._inflight.get(key) is flight:  # not invalidated while in flight
                    self._cache.put(key, value, started)
        finally:
            with self._lock:
                if self._inflight.get(key) is flight:
                    del self._inflight[key]
            flight.done.set()

    def _read_credentials(self, key: Key, timeout: float | None, wait_for_ready: bool) -> ProviderCredentials:
        request = self._get_request(key[0], key[1], pb.CONFIG_VIEW_DECRYPTED)
        reply = self._call("GetProviderConfig", _get, request, timeout, wait_for_ready)
        return credentials_from_pb(reply.config)

    def invalidate(self, organization_id: str | None = None, provider: str | None = None) -> None:
        """Forgets cached configs: one (organization, provider), one organization's, or all.

        A read in flight for a forgotten key is not stored, and later callers do not join it.
        """
        if provider is not None and organization_id is None:
            raise ValueError("invalidate(provider=...) needs the organization_id too")

        def matches(key: Key) -> bool:
            return invalidation_matches(key, organization_id, provider)

        with self._lock:
            self._cache.invalidate(matches)
            for key in [key for key in self._inflight if matches(key)]:
                del self._inflight[key]

    # --- the dashboard side ----------------------------------------------------------------------------

    def list_providers(
        self, organization_id: str | None = None, category: Category | str | None = None, *,
        timeout: float | None = None,
    ) -> list[Provider]:
        """The provider catalog, in the service's stable order; with an organization, its configured/ready status."""
        request = self._list_request(organization_id, category)
        reply = self._call("ListProviders", _list, request, timeout, self._wait_for_ready)
        return [provider_from_pb(p) for p in reply.providers]

    def get_masked_config(self, organization_id: str, provider: str, *, timeout: float | None = None) -> ProviderConfig:
        """The effective configuration with secrets masked, and its etag (for the dashboard form). Not cached."""
        request = self._get_request(organization_id, provider, pb.CONFIG_VIEW_MASKED)
        reply = self._call("GetProviderConfig", _get, request, timeout, self._wait_for_ready)
        return config_from_pb(reply.config)

    def save(
        self,
        organization_id: str,
        provider: str,
        values: Mapping[str, str] | None = None,
        clear_fields: Iterable[str] = (),
        etag: str = "",
        *,
        timeout: float | None = None,
    ) -> ProviderConfig:
        """Sets `values` and clears `clear_fields` (other stored fields are kept); returns the masked result.

        With `etag`, raises Conflict if the credentials changed since that read. Never retried.
        """
        request = self._save_request(organization_id, provider, values, clear_fields, etag)
        try:
            reply = self._call("SaveIntegration", _save, request, timeout, self._wait_for_ready)
        finally:
            self.invalidate(organization_id, provider)
        return config_from_pb(reply.config)

    def delete(
        self, organization_id: str, provider: str, allow_missing: bool = False, etag: str = "", *,
        timeout: float | None = None,
    ) -> None:
        """Removes the organization's stored credentials for `provider` (fields fall back to the environment).

        NotFound when there are none, unless `allow_missing`. Never retried.
        """
        request = self._delete_request(organization_id, provider, allow_missing, etag)
        try:
            self._call("DeleteIntegration", _delete, request, timeout, self._wait_for_ready)
        finally:
            self.invalidate(organization_id, provider)


# The stub methods `_call` runs, picked from whichever channel the call checks out.
def _list(
    stub: IntegrationServiceStub,
) -> grpc.UnaryUnaryMultiCallable[pb.ListProvidersRequest, pb.ListProvidersResponse]:
    return stub.ListProviders


def _get(
    stub: IntegrationServiceStub,
) -> grpc.UnaryUnaryMultiCallable[pb.GetProviderConfigRequest, pb.GetProviderConfigResponse]:
    return stub.GetProviderConfig


def _save(
    stub: IntegrationServiceStub,
) -> grpc.UnaryUnaryMultiCallable[pb.SaveIntegrationRequest, pb.SaveIntegrationResponse]:
    return stub.SaveIntegration


def _delete(
    stub: IntegrationServiceStub,
) -> grpc.UnaryUnaryMultiCallable[pb.DeleteIntegrationRequest, pb.DeleteIntegrationResponse]:
    return stub.DeleteIntegration
