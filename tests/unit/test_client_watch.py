"""The cache watch's pure rules (integrations_client._watch, _core, _cache, models), without a socket.

The backoff schedule, when a refused watch is asked again, the translation of
the stream's messages into events, and what each event does to the cache: the
evicted key, the read in flight that must not store what it read, the lagging
replica's answer, and the resync or resubscription that forgets everything.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from integrations.v1 import integrations_pb2 as pb
from integrations_client import (
    ChangeKind,
    ConfigChangeEvent,
    ConfigurationError,
    IntegrationsClient,
    IntegrationsClientSync,
    PermissionDenied,
    Unavailable,
    WatchResync,
    WatchStarted,
)
from integrations_client._core import ClientCore
from integrations_client._watch import MAX_BACKOFF, REFUSED_RETRY, STABLE_AFTER, Backoff, Reconnect
from integrations_client.config import ENV_TARGET, ENV_WATCH, env_watch
from integrations_client.models import ProviderCredentials, watch_event_from_pb

KEY = ("org_a", "stripe")
OTHER = ("org_b", "stripe")
WHEN = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def core(**kwargs: Any) -> ClientCore[object]:
    return ClientCore("127.0.0.1:1", **kwargs)


def stamp(when: datetime = WHEN) -> Timestamp:
    value = Timestamp()
    value.FromDatetime(when)
    return value


def credentials(key: tuple[str, str] = KEY, etag: str = "etag-1") -> ProviderCredentials:
    config = pb.ProviderConfig(organization_id=key[0], provider=key[1], etag=etag)
    return core()._credentials_call(key, None, True).convert(pb.GetProviderConfigResponse(config=config))


def started() -> pb.WatchConfigChangesResponse:
    return pb.WatchConfigChangesResponse(started=pb.WatchStarted(start_time=stamp()))


def change(
    key: tuple[str, str] = KEY, etag: str = "etag-2", kind: pb.ChangeType.ValueType = pb.CHANGE_TYPE_SAVED
) -> pb.WatchConfigChangesResponse:
    return pb.WatchConfigChangesResponse(
        change=pb.ConfigChange(organization_id=key[0], provider=key[1], etag=etag, type=kind, change_time=stamp())
    )


def resync(reason: str = "fell_behind") -> pb.WatchConfigChangesResponse:
    return pb.WatchConfigChangesResponse(resync=pb.WatchResync(reason=reason))


def cached(client: ClientCore[object], key: tuple[str, str] = KEY, etag: str = "etag-1") -> None:
    """Puts a read of `key` answering `etag` in the cache, the way a shell does."""
    flight = object()
    client._inflight[key] = flight
    client._landed(key, flight, credentials(key, etag), client._cache.clock())
    client._settle(key, flight)


# --- the backoff ----------------------------------------------------------------------------------------------


def test_the_backoff_doubles_from_a_tenth_of_a_second_to_ten_seconds() -> None:
    highest = Backoff(random_fraction=lambda: 1.0)
    assert [round(highest.next(), 3) for _ in range(10)] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10, 10, 10]
    lowest = Backoff(random_fraction=lambda: 0.0)
    assert [round(lowest.next(), 3) for _ in range(3)] == [0.05, 0.1, 0.2]  # jitter: half to all of the delay
    assert Backoff(random_fraction=lambda: 0.0).nominal() == 0.1
    highest.reset()
    assert highest.next() == pytest.approx(0.1)


def test_the_backoff_never_goes_to_zero_nor_past_its_bound() -> None:
    backoff = Backoff(random_fraction=lambda: 0.0)
    delays = [backoff.next() for _ in range(200)]
    assert min(delays) == pytest.approx(0.05)
    assert max(delays) <= MAX_BACKOFF
    with pytest.raises(ValueError, match="initial"):
        Backoff(initial=0)


def test_a_stream_that_ends_again_and_again_backs_off_until_one_stays_live() -> None:
    clock = FakeClock()
    reconnect = Reconnect("svc:1", clock=clock, random_fraction=lambda: 1.0)
    reconnect.subscribed()
    clock.now += 1  # dropped after 1 s: not stable, the backoff keeps growing
    first = reconnect.ended(grpc.StatusCode.UNAVAILABLE, "feed lost")
    second = reconnect.ended(grpc.StatusCode.UNAVAILABLE, "feed lost")
    reconnect.subscribed()
    clock.now += 1
    third = reconnect.ended(grpc.StatusCode.UNAVAILABLE, "feed lost")
    assert [first, second, third] == pytest.approx([0.1, 0.2, 0.4])
    reconnect.subscribed()
    clock.now += STABLE_AFTER
    assert reconnect.ended(grpc.StatusCode.UNAVAILABLE, "server shutting down") == pytest.approx(0.1)
    assert not reconnect.live


def test_a_refused_watch_is_logged_once_and_asked_again_rarely(caplog: pytest.LogCaptureFixture) -> None:
    reconnect = Reconnect("svc:1", random_fraction=lambda: 0.0)
    with caplog.at_level(logging.INFO, logger="integrations_client.watch"):
        delays = [reconnect.ended(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!") for _ in range(3)]
        denied = reconnect.ended(grpc.StatusCode.PERMISSION_DENIED, "no role may watch")
    assert min(*delays, denied) >= REFUSED_RETRY / 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage().split(" (")[1].split(":")[0] for r in warnings] == ["UNIMPLEMENTED", "PERMISSION_DENIED"]
    assert "TTL" in warnings[0].getMessage()


def test_moving_to_a_new_channel_resubscribes_at_once() -> None:
    reconnect = Reconnect("svc:1")
    reconnect.subscribed()
    assert reconnect.ended(grpc.StatusCode.CANCELLED, "", moving=True) == 0.0


def test_a_lost_stream_is_logged_once_per_gap(caplog: pytest.LogCaptureFixture) -> None:
    reconnect = Reconnect("svc:1")
    with caplog.at_level(logging.DEBUG, logger="integrations_client.watch"):
        reconnect.subscribed()
        for _ in range(5):
            reconnect.ended(grpc.StatusCode.UNAVAILABLE, "connection refused")
        reconnect.subscribed()
        reconnect.ended(grpc.StatusCode.UNAVAILABLE, "server shutting down")
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len([m for m in infos if "ended" in m]) == 2
    assert len([m for m in infos if "again" in m]) == 1  # the resubscription says the cache was invalidated


# --- the stream's messages as events ------------------------------------------------------------------------


def test_every_message_of_the_stream_becomes_its_event() -> None:
    assert watch_event_from_pb(started()) == WatchStarted(time=WHEN)
    assert watch_event_from_pb(change()) == ConfigChangeEvent(
        organization_id="org_a", provider="stripe", etag="etag-2", kind=ChangeKind.SAVED, time=WHEN
    )
    deleted = watch_event_from_pb(change(etag="", kind=pb.CHANGE_TYPE_DELETED))
    assert isinstance(deleted, ConfigChangeEvent)
    assert (deleted.kind, deleted.etag) == (ChangeKind.DELETED, "")
    unknown = watch_event_from_pb(change(kind=pb.ChangeType.ValueType(7)))
    assert isinstance(unknown, ConfigChangeEvent)
    assert unknown.kind is ChangeKind.UNSPECIFIED
    assert watch_event_from_pb(resync("truncated")) == WatchResync(reason="truncated")
    assert watch_event_from_pb(pb.WatchConfigChangesResponse()) is None  # a message kind of a newer service
    no_time = watch_event_from_pb(pb.WatchConfigChangesResponse(started=pb.WatchStarted()))
    assert no_time == WatchStarted(time=None)


# --- what the events do to the cache ------------------------------------------------------------------------


def test_a_change_evicts_its_key_only() -> None:
    client = core()
    client._watch_reply(started())
    cached(client)
    cached(client, OTHER)
    event = client._watch_reply(change())
    assert isinstance(event, ConfigChangeEvent)
    assert client._fresh(KEY) is None
    assert client._fresh(OTHER) is not None
    stats = client.cache_stats
    assert (stats.watch_events, stats.watch_evictions, stats.size, stats.watching) == (1, 1, 1, True)
    client._watch_reply(change(("org_c", "resend")))  # not cached: nothing to evict
    assert (client.cache_stats.watch_events, client.cache_stats.watch_evictions) == (2, 1)


def test_a_change_to_the_version_already_cached_keeps_it() -> None:
    client = core()
    client._watch_reply(started())
    cached(client, etag="etag-2")  # this client's own save, read back before its event arrived
    client._watch_reply(change(etag="etag-2"))
    assert client._fresh(KEY) is not None
    assert client.cache_stats.watch_evictions == 0


def test_a_delete_evicts_even_a_value_read_with_no_stored_credentials() -> None:
    client = core()
    client._watch_reply(started())
    cached(client, etag="")
    client._watch_reply(change(etag="", kind=pb.CHANGE_TYPE_DELETED))
    assert client._fresh(KEY) is None


def test_a_read_in_flight_when_its_key_changes_is_not_stored() -> None:
    client = core()
    client._watch_reply(started())
    flight = object()
    client._inflight[KEY] = flight
    start = client._start_read(KEY)
    client._watch_reply(change())  # the save committed while the read was on its way back
    assert KEY not in client._inflight  # later callers start a read of their own
    client._landed(KEY, flight, credentials(etag="etag-1"), start.started)  # the old value arrives after
    client._settle(KEY, flight)
    assert client._fresh(KEY) is None
    assert client.cache_stats.size == 0


def test_a_read_answering_another_version_than_the_announced_one_is_not_stored() -> None:
    client = core()
    client._watch_reply(started())
    cached(client, etag="etag-1")
    client._watch_reply(change(etag="etag-2"))
    cached(client, etag="etag-1")  # a replica whose feed lags answered the old version
    assert client.cache_stats.size == 0
    cached(client, etag="etag-2")  # the announced version is stored
    assert client._fresh(KEY) is not None
    cached(client, etag="etag-1")  # the expectation was met: reads are stored as before
    assert client.cache_stats.size == 1


def test_a_change_of_a_kind_this_client_does_not_know_evicts_without_blocking_the_key() -> None:
    """Its etag is not trusted, so no version is expected of the next read: it is cached as usual. (It was
    taken for a delete's "": no read but one of deleted credentials was stored again until a resubscription.)"""
    client = core()
    client._watch_reply(started())
    cached(client, etag="etag-1")
    client._watch_reply(change(etag="etag-2", kind=99))  # type: ignore[arg-type]  # a newer server's kind
    assert client._fresh(KEY) is None
    cached(client, etag="etag-2")
    assert client._fresh(KEY) is not None


def test_resync_and_every_subscription_forget_everything_including_reads_in_flight() -> None:
    client = core()
    cached(client)  # read before the watch was live: the gap may hide a change
    client._watch_reply(started())
    assert client.cache_stats.size == 0
    cached(client)
    cached(client, OTHER)
    flight = object()
    client._inflight[("org_c", "resend")] = flight
    client._watch_reply(resync())
    assert client.cache_stats.size == 0
    assert not client._inflight
    assert client.cache_stats.watch_resyncs == 1
    assert client._watch_ended(grpc.StatusCode.UNAVAILABLE, "feed lost") > 0
    assert client.cache_stats.watching is False
    cached(client)  # while not watching, values are cached for their TTL as before
    client._watch_reply(started())
    stats = client.cache_stats
    assert (stats.size, stats.watch_subscriptions, stats.watching) == (0, 2, True)


def test_the_watch_runs_only_with_the_cache_on_and_not_turned_off() -> None:
    assert core()._watch_wanted()
    assert not core(watch=False)._watch_wanted()
    assert not core(cache_ttl=0)._watch_wanted()
    assert core()._watch_request() == pb.WatchConfigChangesRequest()  # everything, filtered by the client


def test_the_first_read_waits_at_most_a_second_or_half_its_deadline() -> None:
    client = core(timeout=5)
    assert client._first_wait(None) == 1.0
    assert client._first_wait(0.5) == 0.25


def test_public_watch_requests_carry_the_scope() -> None:
    client = core()
    assert client._watch_changes_request("org_a", ["stripe", "resend"]) == pb.WatchConfigChangesRequest(
        organization_id="org_a", providers=["stripe", "resend"]
    )
    assert client._watch_changes_request(None, ()) == pb.WatchConfigChangesRequest()
    with pytest.raises(TypeError, match="providers"):
        client._watch_changes_request("org_a", "stripe")


@pytest.mark.parametrize(
    ("value", "expected"), [("0", False), ("false", False), ("Off", False), ("1", True), ("", None)]
)
def test_the_environment_turns_the_watch_off(value: str, expected: bool | None) -> None:
    assert env_watch({ENV_WATCH: value}) is expected
    for cls in (IntegrationsClient, IntegrationsClientSync):
        client = cls.from_env({ENV_TARGET: "127.0.0.1:1", ENV_WATCH: value})
        assert client._watch is (True if expected is None else expected)
        assert cls.from_env({ENV_TARGET: "127.0.0.1:1", ENV_WATCH: value}, watch=True)._watch is True
        if isinstance(client, IntegrationsClientSync):
            client.close()


def test_a_wrong_watch_setting_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match=ENV_WATCH):
        env_watch({ENV_WATCH: "sometimes"})


class _Ended(grpc.RpcError):
    """What a stream raises when it ends with a status (code and details, no trailers)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[()]:
        return ()


def test_the_end_of_a_public_stream_is_the_clients_error() -> None:
    client = core()
    lost = client._stream_error(_Ended(grpc.StatusCode.UNAVAILABLE, "server shutting down; reconnect"))
    assert isinstance(lost, Unavailable)
    assert lost.message == "server shutting down; reconnect"
    denied = client._stream_error(_Ended(grpc.StatusCode.PERMISSION_DENIED, "no role may watch"))
    assert isinstance(denied, PermissionDenied)
    # Cancelled by someone else than its consumer (its channel closed): subscribe again, like UNAVAILABLE.
    cancelled = client._stream_error(_Ended(grpc.StatusCode.CANCELLED, "Channel closed!"))
    assert isinstance(cancelled, Unavailable)
    assert "subscribe again" in cancelled.message
