"""The deadline of the RPC being served, for the layers below the API to respect.

The API layer records it once per call (`set_call_deadline`); a store reads it
(`call_deadline`) so that it never waits past the moment the caller stops
listening. A contextvar: every RPC runs in its own task, so each sees its own.
"""

from __future__ import annotations

import asyncio
import contextvars

# In the event loop's clock (loop.time()), or None when the caller set no deadline.
_call_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("call_deadline", default=None)


def set_call_deadline(remaining: float | None) -> None:
    """Record that the current call must be answered within `remaining` seconds (None: no deadline)."""
    _call_deadline.set(None if remaining is None else asyncio.get_running_loop().time() + max(0.0, remaining))


def call_deadline() -> float | None:
    """The current call's deadline in loop.time(), or None."""
    return _call_deadline.get()
