"""The store's time budget and per-key queue: the rules, without a database."""

from __future__ import annotations

import asyncio

import pytest

from integrations_service import errors
from integrations_service.deadlines import set_call_deadline
from integrations_service.store.budget import CALL_DEADLINE_GRACE, KeyedLocks, active_budget, bounded


async def test_running_out_is_unavailable_naming_the_timeout() -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(errors.Unavailable) as raised:
        async with bounded(0.2):
            await asyncio.sleep(5)
    assert raised.value.message == "the credential store did not answer within 0.2 s"
    assert loop.time() - started < 0.5


async def test_nested_blocks_share_the_outer_budget() -> None:
    async with bounded(1.0) as outer:
        async with bounded(60.0) as inner:
            assert inner is outer
        assert active_budget() is outer
    assert active_budget() is None


async def test_a_task_started_inside_a_call_gets_a_budget_of_its_own() -> None:
    async with bounded(0.2):

        async def child() -> float:
            async with bounded(1.0) as budget:
                return budget.remaining()

        assert await asyncio.create_task(child()) > 0.5


async def test_a_nearer_call_deadline_ends_the_wait_first_and_says_so() -> None:
    """Just after the deadline: gRPC cancels the call at its deadline, which must win (DEADLINE_EXCEEDED)."""

    async def call() -> None:
        set_call_deadline(0.1)
        async with bounded(5.0) as budget:
            assert 0.1 < budget.remaining() <= 0.1 + CALL_DEADLINE_GRACE
            await asyncio.sleep(5)

    with pytest.raises(errors.Unavailable, match="before the call's deadline"):
        await asyncio.wait_for(call(), 2)


async def test_other_errors_pass_through_unchanged() -> None:
    failure = ValueError("boom")
    with pytest.raises(ValueError, match="boom") as raised:
        async with bounded(1.0):
            raise failure
    assert raised.value is failure


async def test_keyed_locks_serialize_one_key_only_and_forget_keys_nobody_uses() -> None:
    locks = KeyedLocks()
    order: list[str] = []
    release = asyncio.Event()

    async def hold(key: str, name: str) -> None:
        async with locks.hold(key):
            order.append(name)
            await release.wait()

    first = asyncio.create_task(hold("a", "a1"))
    second = asyncio.create_task(hold("a", "a2"))
    other = asyncio.create_task(hold("b", "b1"))
    await asyncio.sleep(0.01)
    assert order == ["a1", "b1"]  # a2 waits behind a1; b is not held up
    release.set()
    await asyncio.gather(first, second, other)
    assert order == ["a1", "b1", "a2"]
    assert len(locks) == 0


async def test_keyed_locks_forget_a_key_whose_waiters_gave_up() -> None:
    locks = KeyedLocks()
    release = asyncio.Event()

    async def hold() -> None:
        async with locks.hold("a"):
            await release.wait()

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0)
    for _ in range(50):
        with pytest.raises(errors.Unavailable):
            async with bounded(0.01), locks.hold("a"):
                pass  # pragma: no cover (never reached: the key is held)
    release.set()
    await holder
    assert len(locks) == 0
