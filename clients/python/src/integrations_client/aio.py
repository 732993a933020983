"""`IntegrationsClient`: the asyncio client (grpc.aio); the behaviour lives in `_core`, this is its I/O."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar, cast

import grpc

from integrations.v1 import integrations_pb2 as pb
from integrations.v1 import integrations_pb2_grpc as pb_grpc
from integrations_client._cache import Key
from integrations_client._core import Call, ClientCore
from integrations_client._watch import log as watch_log
from integrations_client.config import RETIRED_CHANNEL_GRACE
from integrations_client.errors import IntegrationsError, Unavailable
from integrations_client.models import (
    Category,
    Provider,
    ProviderConfig,
    ProviderCredentials,
    WatchEvent,
    WatchStarted,
    watch_event_from_pb,
)

if TYPE_CHECKING:
    from integrations.v1.integrations_pb2_grpc import IntegrationServiceAsyncStub

__all__ = ["ChangeStream", "IntegrationsClient"]

_Request = TypeVar("_Request")
_Reply = TypeVar("_Reply")
_Result = TypeVar("_Result")
_Flight = asyncio.Task[tuple[ProviderCredentials, bool]]


class ChangeStream:
    """The events of one WatchConfigChanges stream, from `IntegrationsClient.watch_changes` (an async iterator).

    Yields `WatchStarted` first, then a `ConfigChangeEvent` per committed change
    and `WatchResync` when changes may have been missed (rebuild everything;
    the stream stays live). It does not reconnect: the stream's end is raised
    as the client's error, `Unavailable` when the service ends it (it lost its
    change feed, or is shutting down: subscribe again, to this or another
    replica, and rebuild everything). `aclose()` (or leaving `async with`)
    cancels it; closing the client ends it (the iteration just stops).
    """

    def __init__(self, client: IntegrationsClient, call: grpc.aio.UnaryStreamCall[Any, Any]) -> None:
        self._client = client
        self._call = call
        self._closed = False

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> WatchEvent:
        while not self._closed:
            try:
                reply = await self._call.read()
            except grpc.aio.AioRpcError as error:
                if self._closed or self._client._closed:
                    break
                self._closed = True
                raise self._client._stream_error(error) from error
            except asyncio.CancelledError:
                if self._closed or self._client._closed:  # cancelled by aclose() or close(), not by our caller
                    break
                current = asyncio.current_task()
                if current is None or current.cancelling():
                    raise  # our caller was cancelled
                # Nobody cancelled the consumer: the stream's channel closed (retired after a certificate change).
                self._closed = True
                raise Unavailable(
                    "the watch stream was cancelled: its channel closed after a certificate change; subscribe again",
                    code=grpc.StatusCode.CANCELLED,
                ) from None
            if reply is grpc.aio.EOF:
                self._closed = True
                if self._client._closed:
                    break
                raise Unavailable("the service ended the watch stream", code=grpc.StatusCode.UNAVAILABLE)
            event = watch_event_from_pb(cast(pb.WatchConfigChangesResponse, reply))
            if event is not None:
                return event
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Cancels the stream. Idempotent."""
        self._closed = True
        self._call.cancel()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


class IntegrationsClient(ClientCore[_Flight]):
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

    def _open_transport(self) -> None:
        # One slot per channel (`channels=`), each opened on its first call.
        self._channels: list[grpc.aio.Channel | None] = [None] * self._channel_count
        self._stubs: list[IntegrationServiceAsyncStub | None] = [None] * self._channel_count
        # Channels replaced after a certificate change, closing once their calls finish.
        self._retired: dict[grpc.aio.Channel, asyncio.Task[None]] = {}
        # The cache's watch: a task on the loop of the first get_config; `_watch_first` is set once its first
        # subscription is live or has failed (the first reads wait for it, briefly).
        self._watch_task: asyncio.Task[None] | None = None
        self._watch_first = asyncio.Event()
        self._watch_call: grpc.aio.UnaryStreamCall[Any, Any] | None = None

    # --- lifecycle -------------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stops the watch, closes the channel (cancelling calls in flight) and forgets the cache. Idempotent."""
        self._closed = True
        watcher, self._watch_task = self._watch_task, None
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        self._cache.watching = False
        channels = self._take_channels()
        self._forget(lambda _key: True)
        retired, self._retired = self._retired, {}
        for task in retired.values():
            task.cancel()
        for old in [*retired, *channels]:
            await old.close(grace=None)

    def _take_channels(self) -> list[grpc.aio.Channel]:
        """The open channels, their slots emptied."""
        opened = [channel for channel in self._channels if channel is not None]
        self._channels = [None] * self._channel_count
        self._stubs = [None] * self._channel_count
        return opened

    def _service(self) -> IntegrationServiceAsyncStub:
        self._ensure_open()
        if self._tls_changed():
            for channel in self._take_channels():
                self._retire(channel)
            if self._watch_call is not None:  # the watch moves to the new channel now
                self._watch_moving = True
                self._watch_call.cancel()
        index = self._next_channel()
        stub = self._stubs[index]
        if stub is None:
            channel = self._channels[index] = self._connect(grpc.aio.insecure_channel, grpc.aio.secure_channel)
            stub = self._stubs[index] = pb_grpc.IntegrationServiceStub(channel)
        return stub

    def _retire(self, channel: grpc.aio.Channel) -> None:
        """New calls go to a new channel; this one closes when its calls are done (or after the grace period)."""

        async def close_when_idle() -> None:
            await channel.close(grace=RETIRED_CHANNEL_GRACE)
            self._retired.pop(channel, None)

        self._retired[channel] = asyncio.get_running_loop().create_task(close_when_idle())

    async def _run(self, call: Call[_Request, _Reply, _Result]) -> _Result:
        # The core names the stub method; its request and reply types are the ones the `Call` carries.
        method = cast("grpc.aio.UnaryUnaryMultiCallable[_Request, _Reply]", getattr(self._service(), call.method))
        try:
            reply = await method(call.request, timeout=call.timeout, wait_for_ready=call.wait_for_ready)
        except grpc.aio.AioRpcError as error:
            raise self._error(error, call) from error
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is None or current.cancelling():
                raise  # the caller was cancelled
            # The call was, not its caller: its channel closed (close(), or a retired channel's grace ran out).
            raise self._cut_short(call) from None
        finally:
            self._finished(call)
        return call.convert(reply)

    # --- the commerce path -----------------------------------------------------------------------------

    async def get_config(
        self,
        organization_id: str,
        provider: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - gRPC deadline
    ) -> ProviderCredentials:
        """The organization's effective, decrypted configuration of `provider`, from the cache when fresh.

        Concurrent calls for the same key share one read. When the service cannot
        be reached, a value read less than cache_ttl + stale_if_error ago is
        served instead of raising (logged as a warning on "integrations_client").
        """
        key = (organization_id, provider)
        if not self._cache.enabled:
            wait_for_ready = self._start_read(key).wait_for_ready
            return await self._run(self._credentials_call(key, timeout, wait_for_ready))
        cached = self._fresh(key)
        if cached is not None:
            return cached
        if not self._watch_first.is_set() and self._watch_wanted():
            timeout = await self._start_watch(timeout)
        flight = self._joined(key)
        if flight is None:
            flight = asyncio.get_running_loop().create_task(self._refresh(key, timeout))
            self._inflight[key] = flight
            flight.add_done_callback(lambda done: self._on_done(key, done))
            # shield: a caller that gives up (cancelled) does not cancel the read the others wait for.
            value, stale = await asyncio.shield(flight)
        else:
            value, stale = await self._join(key, flight, timeout)
        if stale:
            self._served_stale()
        return value

    async def _join(
        self,
        key: Key,
        flight: _Flight,
        timeout: float | None,  # noqa: ASYNC109 - the caller's deadline
    ) -> tuple[ProviderCredentials, bool]:
        """Waits for another caller's read, up to this caller's own deadline (the read has the other's)."""
        try:
            return await asyncio.wait_for(asyncio.shield(flight), self._join_budget(timeout))
        except TimeoutError:
            error = self._join_timed_out(timeout)
            stale = self._stale_instead(key, error)
            if stale is None:
                raise error from None
            return stale, True

    def _in_progress(self, flight: _Flight) -> bool:
        return not flight.done()

    async def _start_watch(self, timeout: float | None) -> float | None:  # noqa: ASYNC109 - the read's deadline
        """Starts the cache's watch and waits briefly for it to be live; the read's deadline, less that wait."""
        if self._watch_task is None:
            self._ensure_open()
            self._watch_task = asyncio.get_running_loop().create_task(
                self._watch_loop(), name="integrations-client-watch"
            )
        budget = self._timeout if timeout is None else timeout
        started = time.monotonic()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._watch_first.wait(), self._first_wait(timeout))
        return max(budget - (time.monotonic() - started), 0.001)

    async def _watch_loop(self) -> None:
        """One stream at a time, resubscribed after each end (see _watch.Reconnect), until the client closes."""
        while not self._closed:
            code: grpc.StatusCode | None = None
            details = ""
            try:
                call = self._service().WatchConfigChanges(self._watch_request(), wait_for_ready=self._wait_for_ready)
                self._watch_call = call
                async for reply in call:
                    if isinstance(self._watch_reply(reply), WatchStarted):
                        self._watch_first.set()
            except grpc.aio.AioRpcError as error:
                code, details = error.code(), error.details() or ""
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if self._closed or (current is not None and current.cancelling()):
                    raise  # close(): the task itself is cancelled
                code = grpc.StatusCode.CANCELLED  # the call was: moving to a new channel
            except Exception as error:  # never let a bug kill the watch or reach a caller
                if self._closed:  # _service() refused: the client closed meanwhile
                    return
                watch_log.exception("the config watch failed", extra={"event": "watch_error"})
                details = type(error).__name__
            finally:
                self._watch_call = None
            self._watch_first.set()
            await asyncio.sleep(self._watch_ended(code, details))

    def watch_changes(self, organization_id: str | None = None, providers: Iterable[str] = ()) -> ChangeStream:
        """The committed changes of stored credentials, as an async iterator of events (see `ChangeStream`).

        ```python
        async with client.watch_changes(org_id, ["stripe"]) as changes:
            async for event in changes:
                ...  # WatchStarted, then ConfigChangeEvent / WatchResync
        ```

        `organization_id` and `providers` (at most 16) narrow the scope; empty
        means everything this caller may read. No deadline; with
        `wait_for_ready` it waits for a service that is (re)starting. Does not
        reconnect by itself: its end raises the client's error. The cache's own
        watch is separate (and does reconnect).
        """
        request = self._watch_changes_request(organization_id, providers)
        call = self._service().WatchConfigChanges(request, wait_for_ready=self._wait_for_ready)
        return ChangeStream(self, call)

    async def _refresh(self, key: Key, deadline: float | None) -> tuple[ProviderCredentials, bool]:
        start = self._start_read(key)
        try:
            value = await self._run(self._credentials_call(key, deadline, start.wait_for_ready))
        except IntegrationsError as error:
            stale = self._stale_instead(key, error)
            if stale is None:
                raise
            return stale, True
        self._landed(key, asyncio.current_task(), value, start.started)
        return value, False

    def _on_done(self, key: Key, flight: _Flight) -> None:
        self._settle(key, flight)
        if not flight.cancelled():
            flight.exception()  # retrieved: no "exception never retrieved" when every caller gave up

    # --- the dashboard side ----------------------------------------------------------------------------

    async def list_providers(
        self,
        organization_id: str | None = None,
        category: Category | str | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the gRPC deadline
    ) -> list[Provider]:
        """The provider catalog, in the service's stable order; with an organization, its configured/ready status."""
        return await self._run(self._list_providers_call(organization_id, category, timeout))

    async def get_masked_config(
        self,
        organization_id: str,
        provider: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - gRPC deadline
    ) -> ProviderConfig:
        """The effective configuration with secrets masked, and its etag (for the dashboard form). Not cached."""
        return await self._run(self._masked_config_call(organization_id, provider, timeout))

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
        return await self._run(self._save_call(organization_id, provider, values, clear_fields, etag, timeout))

    async def delete(
        self,
        organization_id: str,
        provider: str,
        allow_missing: bool = False,
        etag: str = "",
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the gRPC deadline
    ) -> None:
        """Removes the organization's stored credentials for `provider` (fields fall back to the environment).

        NotFound when there are none, unless `allow_missing`. Never retried.
        """
        await self._run(self._delete_call(organization_id, provider, allow_missing, etag, timeout))
