"""`IntegrationsClientSync`: the blocking client, safe to share between threads (WSGI workers).

The behaviour lives in `_core`; this is its I/O: blocking calls, a lock, and single-flight by events.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Self, TypeVar, cast

import grpc

from integrations.v1 import integrations_pb2 as pb
from integrations.v1 import integrations_pb2_grpc as pb_grpc
from integrations_client._cache import Key
from integrations_client._core import Call, ClientCore, ReadStart
from integrations_client._watch import log as watch_log
from integrations_client.errors import ClientClosed, IntegrationsError, Unavailable
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
    from integrations.v1.integrations_pb2_grpc import IntegrationServiceStub

__all__ = ["ChangeStreamSync", "IntegrationsClientSync"]

# How long close() waits for the watch thread to end (it is a daemon thread either way).
WATCH_THREAD_JOIN = 5.0

_Request = TypeVar("_Request")
_Reply = TypeVar("_Reply")
_Result = TypeVar("_Result")


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


class ChangeStreamSync:
    """The events of one WatchConfigChanges stream, from `IntegrationsClientSync.watch_changes` (a blocking iterator).

    The same events and end as the asyncio client's `ChangeStream`: `WatchStarted`
    first, then `ConfigChangeEvent` and `WatchResync`; no reconnection, the
    stream's end raises the client's error (`Unavailable` when the service ends
    it). `close()`, from any thread, or leaving `with`, cancels it: the iteration
    stops; closing the client does too.
    """

    def __init__(
        self, client: IntegrationsClientSync, channel: _Channel, request: pb.WatchConfigChangesRequest
    ) -> None:
        self._client = client
        self._channel = channel
        # A grpc.Call (cancel()) that iterates over the replies.
        self._call = channel.stub.WatchConfigChanges(request, wait_for_ready=client._wait_for_ready)
        self._closed = False
        self._checked_in = False
        self._lock = threading.Lock()

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> WatchEvent:
        while not self._closed:
            try:
                reply = next(self._call)
            except StopIteration:
                stopped = self._closed or self._client._closed
                self._end()
                if stopped:
                    break
                raise Unavailable("the service ended the watch stream", code=grpc.StatusCode.UNAVAILABLE) from None
            except grpc.RpcError as error:
                stopped = self._closed or self._client._closed  # cancelled by close(), here or on the client
                self._end()
                if stopped:
                    break
                raise self._client._stream_error(error) from error
            event = watch_event_from_pb(reply)
            if event is not None:
                return event
        self._end()
        raise StopIteration

    def _end(self) -> None:
        """The stream is over: its channel is given back (once), so a retired one can close."""
        with self._lock:
            self._closed = True
            if self._checked_in:
                return
            self._checked_in = True
        self._client._checkin(self._channel)

    def close(self) -> None:
        """Cancels the stream (a thread blocked in it stops iterating). Idempotent."""
        self._closed = True
        self._call.cancel()
        self._end()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class IntegrationsClientSync(ClientCore[_Flight]):
    """Blocking client of the integrations service, with the same methods and options as `IntegrationsClient`.

    One instance is meant to be shared by every thread of the process (its
    channel, cache and single-flight are thread-safe).
    """

    def _new_lock(self) -> threading.Lock:
        return threading.Lock()

    def _open_transport(self) -> None:
        self._current = [self._open_channel() for _ in range(self._channel_count)]
        self._retired: set[_Channel] = set()
        # The cache's watch: a daemon thread started by the first get_config; `_watch_first` is set once its
        # first subscription is live or has failed (the first reads wait for it, briefly).
        self._watch_thread: threading.Thread | None = None
        self._watch_first = threading.Event()
        self._watch_stop = threading.Event()
        self._watch_call: grpc.Call | None = None

    # --- lifecycle -------------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stops the watch, closes the channel (cancelling calls in flight) and forgets the cache. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._forget(lambda _key: True)
            self._cache.watching = False
            channels, self._retired = [*self._current, *self._retired], set()
            watcher, call = self._watch_thread, self._watch_call
        self._watch_stop.set()
        if call is not None:
            call.cancel()
        for channel in channels:
            channel.channel.close()
        if watcher is not None and watcher is not threading.current_thread():
            watcher.join(WATCH_THREAD_JOIN)

    def _open_channel(self) -> _Channel:
        return _Channel(self._connect(grpc.insecure_channel, grpc.secure_channel))

    def _checkout(self) -> _Channel:
        """The channel for one call; after a certificate change, new ones, the old ones retired."""
        with self._lock:
            self._ensure_open()
            idle: list[_Channel] = []
            if self._tls_changed():
                old, self._current = self._current, [self._open_channel() for _ in range(self._channel_count)]
                for channel in old:
                    channel.retired = True
                    self._retired.add(channel)
                idle = [channel for channel in old if channel.calls == 0]
                if self._watch_call is not None:  # the watch moves to the new channel now
                    self._watch_moving = True
                    self._watch_call.cancel()
            current = self._current[self._next_channel()]
            current.calls += 1
        for channel in idle:
            self._close_retired(channel)
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

    def _run(self, call: Call[_Request, _Reply, _Result]) -> _Result:
        channel = self._checkout()
        # The core names the stub method; its request and reply types are the ones the `Call` carries.
        method = cast("grpc.UnaryUnaryMultiCallable[_Request, _Reply]", getattr(channel.stub, call.method))
        try:
            reply = method(call.request, timeout=call.timeout, wait_for_ready=call.wait_for_ready)
        except grpc.RpcError as error:
            raise self._error(error, call) from error
        except ValueError as error:  # grpc's "Cannot invoke RPC on closed channel!": close() ran since _checkout
            if not self._closed:
                raise
            raise self._cut_short(call) from error
        finally:
            self._checkin(channel)
            self._finished(call)
        return call.convert(reply)

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
                wait_for_ready = self._start_read(key).wait_for_ready
            return self._run(self._credentials_call(key, timeout, wait_for_ready))
        with self._lock:
            cached = self._fresh(key)
            if cached is not None:
                return cached
            first = self._watch_thread is None and self._watch_wanted()
            if first:
                self._start_watch()
        if first or not self._watch_first.is_set():
            timeout = self._await_watch(timeout)
        with self._lock:
            flight = self._joined(key)
            start = None if flight is not None else self._start_read(key)
            if flight is None:
                flight = self._inflight[key] = _Flight()
        if start is not None:
            self._lead(key, flight, timeout, start)
        elif not flight.done.wait(self._join_budget(timeout)):
            # This thread's deadline came before the end of the read it joined (which goes on for the others).
            error = self._join_timed_out(timeout)
            with self._lock:
                stale = self._stale_instead(key, error)
            if stale is None:
                raise error
            self._served_stale()
            return stale
        if flight.error is not None:
            # A copy per thread: one exception object raised in several threads would share a traceback.
            raise copy.copy(flight.error) from flight.error.__cause__
        assert flight.value is not None
        if flight.stale:
            self._served_stale()
        return flight.value

    def _start_watch(self) -> None:
        """Starts the cache's watch thread (the caller holds the lock)."""
        thread = threading.Thread(target=self._watch_run, name="integrations-client-watch", daemon=True)
        self._watch_thread = thread
        thread.start()

    def _await_watch(self, timeout: float | None) -> float | None:
        """Waits briefly for the watch's first subscription; the read's deadline, less that wait."""
        if self._watch_thread is None or self._watch_first.is_set():
            return timeout
        budget = self._timeout if timeout is None else timeout
        started = time.monotonic()
        self._watch_first.wait(self._first_wait(timeout))
        return max(budget - (time.monotonic() - started), 0.001)

    def _watch_run(self) -> None:
        """The watch thread: one stream at a time, resubscribed after each end, until the client closes."""
        while not self._watch_stop.is_set():
            try:
                channel = self._checkout()
            except RuntimeError:  # closed
                return
            code: grpc.StatusCode | None = None
            details = ""
            try:
                call = channel.stub.WatchConfigChanges(self._watch_request(), wait_for_ready=self._wait_for_ready)
                with self._lock:
                    self._watch_call = call
                if self._watch_stop.is_set():
                    call.cancel()
                for reply in call:
                    if isinstance(self._watch_reply(reply), WatchStarted):
                        self._watch_first.set()
            except grpc.RpcError as error:
                rpc = cast(grpc.Call, error)
                code, details = rpc.code(), rpc.details() or ""
            except Exception as error:  # never let a bug kill the watch or reach a caller
                if not self._watch_stop.is_set():  # else: close() closed the channel under it
                    watch_log.exception("the config watch failed", extra={"event": "watch_error"})
                details = type(error).__name__
            finally:
                with self._lock:
                    self._watch_call = None
                self._checkin(channel)
            self._watch_first.set()
            if self._watch_stop.is_set():
                return
            self._watch_stop.wait(self._watch_ended(code, details))

    def watch_changes(self, organization_id: str | None = None, providers: Iterable[str] = ()) -> ChangeStreamSync:
        """The committed changes of stored credentials, as a blocking iterator of events (see `ChangeStreamSync`).

        ```python
        with client.watch_changes(org_id, ["stripe"]) as changes:
            for event in changes:
                ...  # WatchStarted, then ConfigChangeEvent / WatchResync
        ```

        `organization_id` and `providers` (at most 16) narrow the scope; empty
        means everything this caller may read. No deadline; with
        `wait_for_ready` it waits for a service that is (re)starting. Does not
        reconnect by itself: its end raises the client's error. The cache's own
        watch is separate (and does reconnect).
        """
        request = self._watch_changes_request(organization_id, providers)
        channel = self._checkout()
        try:
            return ChangeStreamSync(self, channel, request)
        except ValueError as error:  # the channel closed since _checkout: close() ran
            self._checkin(channel)
            if not self._closed:
                raise
            raise ClientClosed(f"the {type(self).__name__} was closed") from error
        except BaseException:
            self._checkin(channel)
            raise

    def _lead(self, key: Key, flight: _Flight, timeout: float | None, start: ReadStart) -> None:
        try:
            value = self._run(self._credentials_call(key, timeout, start.wait_for_ready))
        except IntegrationsError as error:
            with self._lock:
                stale = self._stale_instead(key, error)
            if stale is None:
                flight.error = error
            else:
                flight.value, flight.stale = stale, True
        except BaseException as error:  # handed to every waiting thread, each re-raises it
            flight.error = error
        else:
            flight.value = value
            with self._lock:
                self._landed(key, flight, value, start.started)
        finally:
            with self._lock:
                self._settle(key, flight)
            flight.done.set()

    # --- the dashboard side ----------------------------------------------------------------------------

    def list_providers(
        self,
        organization_id: str | None = None,
        category: Category | str | None = None,
        *,
        timeout: float | None = None,
    ) -> list[Provider]:
        """The provider catalog, in the service's stable order; with an organization, its configured/ready status."""
        return self._run(self._list_providers_call(organization_id, category, timeout))

    def get_masked_config(self, organization_id: str, provider: str, *, timeout: float | None = None) -> ProviderConfig:
        """The effective configuration with secrets masked, and its etag (for the dashboard form). Not cached."""
        return self._run(self._masked_config_call(organization_id, provider, timeout))

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
        return self._run(self._save_call(organization_id, provider, values, clear_fields, etag, timeout))

    def delete(
        self,
        organization_id: str,
        provider: str,
        allow_missing: bool = False,
        etag: str = "",
        *,
        timeout: float | None = None,
    ) -> None:
        """Removes the organization's stored credentials for `provider` (fields fall back to the environment).

        NotFound when there are none, unless `allow_missing`. Never retried.
        """
        self._run(self._delete_call(organization_id, provider, allow_missing, etag, timeout))
