"""One time budget per store call: every wait of the call together stays within it.

A call may wait for its turn behind saves of the same row, for a pooled
connection, for a lock held by another writer and for its statements; all of
that together ends within the store's timeout (INTEGRATIONS_DB_TIMEOUT), or
sooner when the RPC's own deadline is nearer. A call that runs out answers
`errors.Unavailable` naming the timeout, and gives up everything it held.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import AsyncIterator, Hashable
from dataclasses import dataclass

from integrations_service import errors
from integrations_service.deadlines import call_deadline


@dataclass(frozen=True)
class Budget:
    timeout: float  # the configured store timeout, which the error message names
    deadline: float  # loop.time() by which the call must be answered
    task: asyncio.Task[object] | None
    call_deadline_first: bool = False  # the RPC's deadline comes before the timeout

    def remaining(self) -> float:
        return max(0.0, self.deadline - asyncio.get_running_loop().time())

    def exceeded(self) -> errors.Unavailable:
        if self.call_deadline_first:
            return errors.Unavailable("the credential store did not answer before the call's deadline")
        return errors.Unavailable(f"the credential store did not answer within {self.timeout:g} s")


# gRPC cancels a call's handler at its deadline, and the call then ends as DEADLINE_EXCEEDED
# (its honest status). The budget ends a moment later, so that it does not race gRPC's
# cancellation into an UNAVAILABLE; it still ends the wait if nothing cancels it.
CALL_DEADLINE_GRACE = 0.25

_active: contextvars.ContextVar[Budget | None] = contextvars.ContextVar("store_budget", default=None)


def active_budget() -> Budget | None:
    """The budget of the store call running in this task, if any."""
    budget = _active.get()
    # A task created inside a store call inherits the contextvar, not the call's timeout scope.
    return budget if budget is not None and budget.task is asyncio.current_task() else None


@contextlib.asynccontextmanager
async def bounded(timeout: float) -> AsyncIterator[Budget]:  # noqa: ASYNC109 (the store's setting, not a parameter of a call)
    """The block runs within `timeout` (or just past the RPC's nearer deadline); nested blocks share the outer budget.

    Running out cancels what the block waits for and raises `errors.Unavailable`.
    """
    outer = active_budget()
    if outer is not None:
        yield outer
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    rpc_deadline = call_deadline()
    if rpc_deadline is not None:
        rpc_deadline += CALL_DEADLINE_GRACE
    call_deadline_first = rpc_deadline is not None and rpc_deadline < deadline
    if rpc_deadline is not None and call_deadline_first:
        deadline = rpc_deadline
    budget = Budget(timeout, deadline, asyncio.current_task(), call_deadline_first)
    token = _active.set(budget)
    scope = asyncio.timeout_at(deadline)
    try:
        async with scope:
            yield budget
    except TimeoutError as exc:
        if scope.expired():
            raise budget.exceeded() from exc
        raise
    finally:
        _active.reset(token)


class KeyedLocks:
    """One asyncio.Lock per key, made when first needed and dropped when nobody holds or awaits it.

    Memory stays bounded by the keys in use at the moment, not by every key ever seen.
    """

    def __init__(self) -> None:
        self._locks: dict[Hashable, tuple[asyncio.Lock, list[int]]] = {}

    def __len__(self) -> int:
        return len(self._locks)

    @contextlib.asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        lock, users = self._locks.setdefault(key, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._locks[key]
