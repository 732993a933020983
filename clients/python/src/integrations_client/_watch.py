"""When the cache's watch stream resubscribes, and what it logs: the pure part of the watcher, shared by both shells.

The shells (an asyncio task, a daemon thread) run the stream; the core applies
its events to the cache; `Reconnect` decides how long to wait before the next
subscription after a stream ended, and logs the transitions once each:

- a stream that ends (UNAVAILABLE: the service's change feed was lost, or it is
  shutting down; a broken connection; any other failure) is resubscribed after
  an exponential backoff with jitter: nominally 0.1 s doubling to 10 s, each
  delay drawn between half and all of its nominal value. The backoff starts
  over once a subscription has stayed live for 10 s, so a service that accepts
  the stream and drops it at once is not hammered;
- a service that refuses the watch (UNIMPLEMENTED: an older server;
  PERMISSION_DENIED or UNAUTHENTICATED: this identity may not watch) is logged
  once as a warning and asked again only every 5 minutes;
- moving to a new channel (new TLS files) resubscribes at once.

Meanwhile cached values expire after their TTL, as without a watch; every
(re)subscription invalidates everything (changes during the gap are unknown).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

import grpc

log = logging.getLogger("integrations_client.watch")

INITIAL_BACKOFF = 0.1
MAX_BACKOFF = 10.0
# A subscription that stayed live this long resets the backoff.
STABLE_AFTER = 10.0
# How often a service that refused the watch is asked again.
REFUSED_RETRY = 300.0
REFUSED_CODES = frozenset(
    {grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED}
)
# The first get_config of a client waits this long at most (and at most half its deadline) for the watch to be
# live, so that the first values it caches are covered by the stream instead of dropped when it starts.
FIRST_SUBSCRIPTION_WAIT = 1.0


class Backoff:
    """Exponential backoff with jitter: nominal delays `initial` * 2^n up to `maximum`, each drawn in [d/2, d]."""

    def __init__(
        self,
        initial: float = INITIAL_BACKOFF,
        maximum: float = MAX_BACKOFF,
        random_fraction: Callable[[], float] = random.random,
    ) -> None:
        if not 0 < initial <= maximum:
            raise ValueError("the backoff needs 0 < initial <= maximum")
        self.initial = initial
        self.maximum = maximum
        self._random = random_fraction
        self._attempt = 0

    def nominal(self) -> float:
        """The nominal delay of the next failure (before jitter)."""
        return min(self.maximum, self.initial * 2.0 ** min(self._attempt, 64))

    def next(self) -> float:
        """The delay before the next attempt; each call doubles the nominal delay, up to the maximum."""
        nominal = self.nominal()
        self._attempt += 1
        return nominal * (0.5 + 0.5 * self._random())

    def reset(self) -> None:
        self._attempt = 0


class Reconnect:
    """The watcher's state across subscriptions: whether it is live, and how long to wait after each end."""

    def __init__(
        self,
        target: str,
        clock: Callable[[], float] = time.monotonic,
        random_fraction: Callable[[], float] = random.random,
    ) -> None:
        self._target = target
        self._clock = clock
        self._random = random_fraction
        self.backoff = Backoff(random_fraction=random_fraction)
        self.live_since: float | None = None
        self.subscriptions = 0
        self._refusals_logged: set[grpc.StatusCode] = set()
        self._loss_logged = False

    @property
    def live(self) -> bool:
        return self.live_since is not None

    def subscribed(self) -> None:
        """The stream said it is live (its first message)."""
        self.live_since = self._clock()
        self.subscriptions += 1
        if self.subscriptions == 1:
            log.debug("watching %s for config changes", self._target, extra={"event": "watch_subscribed"})
        else:
            log.info(
                "watching %s for config changes again: every cached config was invalidated (changes during the gap "
                "are unknown)",
                self._target,
                extra={"event": "watch_resubscribed"},
            )
        self._loss_logged = False

    def ended(self, code: grpc.StatusCode | None, details: str, *, moving: bool = False) -> float:
        """A stream ended (`code` None: cleanly, or by an unexpected error): the seconds to wait before the next."""
        was_live_for = None if self.live_since is None else self._clock() - self.live_since
        self.live_since = None
        if moving:
            return 0.0
        if code in REFUSED_CODES:
            assert code is not None
            if code not in self._refusals_logged:
                self._refusals_logged.add(code)
                log.warning(
                    "%s refuses WatchConfigChanges (%s: %s): cached configs expire after their TTL only; "
                    "asking again every %.0f s",
                    self._target,
                    code.name,
                    details,
                    REFUSED_RETRY,
                    extra={"event": "watch_refused", "code": code.name},
                )
            return REFUSED_RETRY * (0.5 + 0.5 * self._random())
        if was_live_for is not None and was_live_for >= STABLE_AFTER:
            self.backoff.reset()
        delay = self.backoff.next()
        name = code.name if code is not None else "ended"
        if not self._loss_logged:
            self._loss_logged = True
            log.info(
                "the config watch on %s ended (%s: %s): cached configs expire after their TTL until it is "
                "resubscribed; next attempt in %.2f s",
                self._target,
                name,
                details,
                delay,
                extra={"event": "watch_lost", "code": name},
            )
        else:
            log.debug("the config watch on %s failed again (%s); next attempt in %.2f s", self._target, name, delay)
        return delay
