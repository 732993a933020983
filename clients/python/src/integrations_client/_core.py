"""What the async and the sync client share, written once: everything but the I/O.

`ClientCore` holds the settings, the cache and its policy (what counts as a
hit, when a refresh may wait for the service, when a stale value is served,
when a read may be stored, what `invalidate` forgets), builds every request as
a `Call` (request, deadline, wait-for-ready, reply conversion, the cache key a
write invalidates), maps gRPC errors, decides when new TLS files mean a new
channel, and applies the cache's watch stream (WatchConfigChanges) to the
cache. The two shells, `aio.IntegrationsClient` and
`sync.IntegrationsClientSync`, only run a `Call` (await or block), keep their
channels, run the watch stream (an asyncio task, a daemon thread) and do
single-flight with their own concurrency model (an asyncio task, or an event
threads wait on). A new RPC is a `Call` builder here plus a one-line method in
each shell; `_watch.Reconnect` decides when the watch resubscribes.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Self, TypeVar

import grpc

from integrations.v1 import integrations_pb2 as pb
from integrations_client._cache import CacheStats, CredentialCache, Key
from integrations_client._watch import FIRST_SUBSCRIPTION_WAIT, Reconnect
from integrations_client._watch import log as watch_log
from integrations_client.config import ReloadingTls, TlsConfig, check_plaintext, env_settings, env_watch
from integrations_client.config import channel_options as tls_channel_options
from integrations_client.errors import (
    ClientClosed,
    ConfigurationError,
    DeadlineExceeded,
    IntegrationsError,
    Unavailable,
    error_from_rpc,
)
from integrations_client.models import (
    Category,
    ChangeKind,
    ConfigChangeEvent,
    Provider,
    ProviderConfig,
    ProviderCredentials,
    WatchEvent,
    WatchResync,
    WatchStarted,
    category_to_pb,
    config_from_pb,
    credentials_from_pb,
    provider_from_pb,
    watch_event_from_pb,
)

DEFAULT_TIMEOUT = 2.0
DEFAULT_CACHE_TTL = 30.0
DEFAULT_CACHE_MAX_ENTRIES = 1024
DEFAULT_STALE_IF_ERROR = 300.0

_Request = TypeVar("_Request")
_Reply = TypeVar("_Reply")
_Result = TypeVar("_Result")
_Flight = TypeVar("_Flight")  # a shell's handle on one get_config read in progress
_Channel = TypeVar("_Channel")

# The stub attributes a `Call` names; both generated stubs (sync and asyncio) have them.
Method = Literal["ListProviders", "GetProviderConfig", "SaveIntegration", "DeleteIntegration"]


@dataclass(frozen=True)
class Call(Generic[_Request, _Reply, _Result]):
    """One unary RPC, ready to run by either shell."""

    method: Method
    # Not in the repr: a save's request holds the new secret values, and tracebacks may show frame locals.
    request: _Request = field(repr=False)
    convert: Callable[[_Reply], _Result]
    timeout: float
    wait_for_ready: bool
    # A write: this key is forgotten once the call is over, whatever its outcome (a lost reply may have applied).
    invalidates: Key | None = None


@dataclass(frozen=True)
class ReadStart:
    """How a get_config read that is about to start runs, and when it started (for the cache entry's age)."""

    wait_for_ready: bool
    started: float


class ClientCore(Generic[_Flight]):
    """Settings, cache policy, requests and errors of one client; the shells add the I/O."""

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
        channels: int = 1,
        watch: bool = True,
        insecure_plaintext_any_address: bool = False,
    ) -> None:
        if not target:
            raise ConfigurationError("target is required (host:port of the integrations service)")
        check_plaintext(target, tls, insecure_plaintext_any_address)
        if timeout <= 0:
            raise ConfigurationError("timeout must be > 0 seconds")
        if channels < 1:
            raise ConfigurationError("channels must be at least 1")
        self._target = target
        self._tls = tls
        self._timeout = timeout
        self._wait_for_ready = wait_for_ready
        # Read the TLS files now, so a wrong path fails at start-up rather than on the first call.
        self._tls_files = ReloadingTls(tls) if tls else None
        self._options = [*tls_channel_options(tls), *channel_options, *_spread_options(channels)]
        self._channel_count = channels
        self._turns = itertools.count()
        self._cache = CredentialCache(cache_ttl, cache_max_entries, stale_if_error, clock)
        self._inflight: dict[Key, _Flight] = {}
        self._closed = False
        # The cache's watch stream: one per client, started by the first get_config (see the README).
        self._watch = watch
        self._reconnect = Reconnect(target)
        self._watch_moving = False  # the current stream is being cancelled to resubscribe on a new channel
        self._lock: contextlib.AbstractContextManager[Any] = self._new_lock()
        self._open_transport()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **kwargs: Any) -> Self:
        """A client for INTEGRATIONS_SERVICE_TARGET; mutual TLS when INTEGRATIONS_CLIENT_CA, _CERT and _KEY are set.

        `kwargs` are the constructor's other arguments (cache_ttl=..., timeout=...). INTEGRATIONS_CLIENT_WATCH=0
        turns the cache's watch off (an explicit `watch=` wins).
        """
        target, tls = env_settings(environ)
        watch = env_watch(environ)
        if watch is not None:
            kwargs.setdefault("watch", watch)
        return cls(target, tls=tls, **kwargs)

    # --- hooks of the shells ---------------------------------------------------------------------------

    def _new_lock(self) -> contextlib.AbstractContextManager[Any]:
        """What guards the cache and the flights: nothing for one event loop; the sync shell's lock for threads."""
        return contextlib.nullcontext()

    def _open_transport(self) -> None:
        """Sets up the shell's own channel state, at the end of the constructor."""

    # --- settings --------------------------------------------------------------------------------------

    @property
    def target(self) -> str:
        return self._target

    @property
    def tls(self) -> TlsConfig | None:
        return self._tls

    @property
    def cache_stats(self) -> CacheStats:
        """A snapshot of the `get_config` cache counters."""
        return self._cache.stats()

    # --- channels --------------------------------------------------------------------------------------

    def _ensure_open(self) -> None:
        if self._closed:
            raise ClientClosed(f"the {type(self).__name__} is closed")

    def _connect(self, insecure: Callable[..., _Channel], secure: Callable[..., _Channel]) -> _Channel:
        """A new channel (grpc's or grpc.aio's factories) with the newest TLS files that loaded."""
        credentials = self._tls_files.credentials if self._tls_files else None
        if credentials is None:
            return insecure(self._target, options=self._options)
        return secure(self._target, credentials, options=self._options)

    def _next_channel(self) -> int:
        """The index of the channel for the next call: round-robin over `channels`.

        A server with several worker processes (`serve --workers N`) gets a connection, not a call, to
        each worker: calls spread over its workers only as far as the client spreads them over connections.
        """
        return next(self._turns) % self._channel_count

    def _tls_changed(self) -> bool:
        """True when new TLS files have loaded since the channel was opened: open a new one."""
        return self._tls_files is not None and self._tls_files.changed()

    # --- calls -----------------------------------------------------------------------------------------

    def _call(
        self,
        method: Method,
        request: _Request,
        convert: Callable[[_Reply], _Result],
        timeout: float | None,
        *,
        wait_for_ready: bool | None = None,
        invalidates: Key | None = None,
    ) -> Call[_Request, _Reply, _Result]:
        return Call(
            method=method,
            request=request,
            convert=convert,
            timeout=self._timeout if timeout is None else timeout,
            wait_for_ready=self._wait_for_ready if wait_for_ready is None else wait_for_ready,
            invalidates=invalidates,
        )

    def _error(self, error: grpc.RpcError, call: Call[Any, Any, Any]) -> IntegrationsError:
        converted = error_from_rpc(error, method=call.method)
        if converted.code is grpc.StatusCode.CANCELLED and self._closed:
            return self._cut_short(call)
        if isinstance(converted, DeadlineExceeded):
            converted.message = (
                f"{converted.message}: no answer from {self._target} within {call.timeout:g} s ({call.method})"
            )
        return converted

    def _cut_short(self, call: Call[Any, Any, Any]) -> IntegrationsError:
        """A call cancelled on this side without its caller asking: its channel closed under it."""
        if self._closed:
            return ClientClosed(f"the {type(self).__name__} was closed while {call.method} was in flight")
        # Only the asyncio client's retired channels close under a call, once their grace period is over.
        return Unavailable(
            f"{call.method} was cut short: its channel closed after a certificate change; try again",
            code=grpc.StatusCode.CANCELLED,
        )

    def _finished(self, call: Call[Any, Any, Any]) -> None:
        """After a call, whatever its outcome."""
        if call.invalidates is not None:
            self.invalidate(*call.invalidates)

    def _credentials_call(
        self, key: Key, timeout: float | None, wait_for_ready: bool
    ) -> Call[pb.GetProviderConfigRequest, pb.GetProviderConfigResponse, ProviderCredentials]:
        request = pb.GetProviderConfigRequest(organization_id=key[0], provider=key[1], view=pb.CONFIG_VIEW_DECRYPTED)
        return self._call("GetProviderConfig", request, _credentials_from_reply, timeout, wait_for_ready=wait_for_ready)

    def _list_providers_call(
        self, organization_id: str | None, category: Category | str | None, timeout: float | None
    ) -> Call[pb.ListProvidersRequest, pb.ListProvidersResponse, list[Provider]]:
        request = pb.ListProvidersRequest(organization_id=organization_id or "", category=category_to_pb(category))
        return self._call("ListProviders", request, _providers_from_reply, timeout)

    def _masked_config_call(
        self, organization_id: str, provider: str, timeout: float | None
    ) -> Call[pb.GetProviderConfigRequest, pb.GetProviderConfigResponse, ProviderConfig]:
        request = pb.GetProviderConfigRequest(
            organization_id=organization_id, provider=provider, view=pb.CONFIG_VIEW_MASKED
        )
        return self._call("GetProviderConfig", request, _config_from_reply, timeout)

    def _save_call(
        self,
        organization_id: str,
        provider: str,
        values: Mapping[str, str] | None,
        clear_fields: Iterable[str],
        etag: str,
        timeout: float | None,
    ) -> Call[pb.SaveIntegrationRequest, pb.SaveIntegrationResponse, ProviderConfig]:
        if isinstance(clear_fields, str):
            raise TypeError("clear_fields is a list of field keys, not a string")
        request = pb.SaveIntegrationRequest(
            organization_id=organization_id,
            provider=provider,
            values=dict(values or {}),
            clear_fields=list(clear_fields),
            etag=etag,
        )
        return self._call(
            "SaveIntegration", request, _config_from_reply, timeout, invalidates=(organization_id, provider)
        )

    def _delete_call(
        self, organization_id: str, provider: str, allow_missing: bool, etag: str, timeout: float | None
    ) -> Call[pb.DeleteIntegrationRequest, pb.DeleteIntegrationResponse, None]:
        request = pb.DeleteIntegrationRequest(
            organization_id=organization_id, provider=provider, allow_missing=allow_missing, etag=etag
        )
        return self._call("DeleteIntegration", request, _nothing, timeout, invalidates=(organization_id, provider))

    # --- the get_config cache policy (the sync shell holds its lock around these) -----------------------

    def _fresh(self, key: Key) -> ProviderCredentials | None:
        """The value to answer with without calling the service; None (a miss, counted) when a read is needed."""
        cached = self._cache.lookup(key)
        if cached is None:
            self._cache.misses += 1
        return cached

    def _joined(self, key: Key) -> _Flight | None:
        """The read in flight for `key` that a caller joins (counted), or None: the caller starts one."""
        flight = self._inflight.get(key)
        if flight is not None and self._in_progress(flight):
            self._cache.coalesced += 1
            return flight
        return None

    def _in_progress(self, flight: _Flight) -> bool:
        """False for a flight that has landed but is not yet removed (the asyncio shell's done tasks)."""
        return True

    def _start_read(self, key: Key) -> ReadStart:
        """A GetProviderConfig read of `key` begins: counted, and told whether it may wait for the service."""
        self._cache.rpc_count += 1
        # With a stale value to fall back on, fail fast rather than wait for a service that is down.
        wait_for_ready = self._wait_for_ready and not self._cache.has_fallback(key)
        return ReadStart(wait_for_ready, self._cache.clock())

    def _join_timed_out(self, timeout: float | None) -> DeadlineExceeded:
        """A caller that joined another caller's read reached its own deadline first (that read goes on)."""
        return DeadlineExceeded(
            f"Deadline Exceeded: no answer from {self._target} within {self._join_budget(timeout):g} s "
            "(GetProviderConfig, waiting for another caller's read of the same config)"
        )

    def _join_budget(self, timeout: float | None) -> float:
        return self._timeout if timeout is None else timeout

    def _stale_instead(self, key: Key, error: IntegrationsError) -> ProviderCredentials | None:
        """After a failed refresh: the stale value to serve instead, or None to raise the error."""
        return self._cache.fallback(key, error.code)

    def _served_stale(self) -> None:
        with self._lock:
            self._cache.stale_served += 1

    def _landed(self, key: Key, flight: object, value: ProviderCredentials, started: float) -> None:
        """A refresh succeeded: cached unless the key was invalidated while it was in flight.

        The flight's identity is its key's generation: an invalidation (a call to `invalidate`, this client's
        write, a change or resync from the watch, a resubscription) removes it from `_inflight`, so a read
        that started before it is not stored. Nor is a read answering another version than the one the
        watch announced (a lagging replica's).
        """
        if self._inflight.get(key) is flight and self._cache.accepts(key, value.etag):
            self._cache.put(key, value, started)

    def _settle(self, key: Key, flight: _Flight) -> None:
        """A refresh is over: later callers start their own."""
        if self._inflight.get(key) is flight:
            del self._inflight[key]

    def invalidate(self, organization_id: str | None = None, provider: str | None = None) -> None:
        """Forgets cached configs: one (organization, provider), one organization's, or all.

        A read in flight for a forgotten key is not stored, and later callers do not join it.
        """
        if provider is not None and organization_id is None:
            raise ValueError("invalidate(provider=...) needs the organization_id too")

        def matches(key: Key) -> bool:
            return invalidation_matches(key, organization_id, provider)

        with self._lock:
            self._forget(matches)

    def _forget(self, matches: Callable[[Key], bool]) -> None:
        self._cache.invalidate(matches)
        for key in [key for key in self._inflight if matches(key)]:
            del self._inflight[key]

    # --- the cache's watch stream (the shells run it; these apply it) ---------------------------------

    def _watch_wanted(self) -> bool:
        """Whether get_config should have the watch running: caching on, the watch not turned off, open."""
        return self._watch and self._cache.enabled and not self._closed

    def _watch_request(self) -> pb.WatchConfigChangesRequest:
        # Everything the caller may read, filtered here: one stream, however many keys are cached.
        return pb.WatchConfigChangesRequest()

    def _first_wait(self, timeout: float | None) -> float:
        """How long the first get_config waits for the watch to be live: 1 s, at most half its deadline."""
        return min(FIRST_SUBSCRIPTION_WAIT, (self._timeout if timeout is None else timeout) / 2)

    def _watch_reply(self, reply: pb.WatchConfigChangesResponse) -> WatchEvent | None:
        """Applies one message of the cache's watch stream to the cache; the event it carried."""
        event = watch_event_from_pb(reply)
        with self._lock:
            if self._closed:
                return None
            if isinstance(event, WatchStarted):
                # Live from now on; what was cached or read before may predate a change the gap hid.
                self._cache.watching = True
                self._cache.watch_subscriptions += 1
                self._forget(lambda _key: True)
            elif isinstance(event, ConfigChangeEvent):
                self._watch_change(event)
            elif isinstance(event, WatchResync):
                self._cache.watch_resyncs += 1
                self._forget(lambda _key: True)
        if isinstance(event, WatchStarted):
            self._reconnect.subscribed()
        elif isinstance(event, WatchResync):
            watch_log.info(
                "the service asked to resynchronize (%s): every cached config was invalidated",
                event.reason,
                extra={"event": "watch_resync", "reason": event.reason},
            )
        return event

    def _watch_change(self, event: ConfigChangeEvent) -> None:
        key = (event.organization_id, event.provider)
        self._cache.watch_events += 1
        reading = key in self._inflight
        known = event.kind is not ChangeKind.UNSPECIFIED
        if self._cache.changed(key, event.etag if known else None, reading=reading and known):
            self._cache.watch_evictions += 1
        if reading:  # that read may have started before the change: not stored, later callers read anew
            del self._inflight[key]

    def _watch_ended(self, code: grpc.StatusCode | None, details: str) -> float:
        """The cache's stream ended: back to the TTL alone; the seconds to wait before subscribing again."""
        with self._lock:
            self._cache.watching = False
            moving, self._watch_moving = self._watch_moving, False
        return self._reconnect.ended(code, details, moving=moving)

    def _watch_changes_request(
        self, organization_id: str | None, providers: Iterable[str]
    ) -> pb.WatchConfigChangesRequest:
        if isinstance(providers, str):
            raise TypeError("providers is a list of provider ids, not a string")
        return pb.WatchConfigChangesRequest(organization_id=organization_id or "", providers=list(providers))

    def _stream_error(self, error: grpc.RpcError) -> IntegrationsError:
        converted = error_from_rpc(error, method="WatchConfigChanges")
        if converted.code is grpc.StatusCode.CANCELLED:
            # Not cancelled by its consumer: its channel closed (replaced after a certificate change).
            return Unavailable(
                f"the watch stream was cancelled: {converted.message}; subscribe again",
                code=converted.code,
                request_id=converted.request_id,
            )
        return converted


def _spread_options(channels: int) -> list[tuple[str, Any]]:
    # Equal channels otherwise share one subchannel, hence one TCP connection, through grpc's global pool.
    return [("grpc.use_local_subchannel_pool", 1)] if channels > 1 else []


def invalidation_matches(key: Key, organization_id: str | None, provider: str | None) -> bool:
    if organization_id is None:
        return True
    return key[0] == organization_id and (provider is None or key[1] == provider)


def _credentials_from_reply(reply: pb.GetProviderConfigResponse) -> ProviderCredentials:
    return credentials_from_pb(reply.config)


def _config_from_reply(reply: pb.GetProviderConfigResponse | pb.SaveIntegrationResponse) -> ProviderConfig:
    return config_from_pb(reply.config)


def _providers_from_reply(reply: pb.ListProvidersResponse) -> list[Provider]:
    return [provider_from_pb(p) for p in reply.providers]


def _nothing(_reply: pb.DeleteIntegrationResponse) -> None:
    return None
