"""The bounded thread-to-Trio hand-off, with real threads (no model needed)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import trio
import trio.testing

from ostiary.backends.handoff import Handoff


class CountingWaker:
    """The real Trio token, counting the wake-ups the worker asks for."""

    def __init__(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        self.wakes = 0

    def run_sync_soon(self, sync_fn: Callable[[], object]) -> None:
        self.wakes += 1
        self.token.run_sync_soon(sync_fn)


async def in_thread(fn: Callable[[], object]) -> None:
    await trio.to_thread.run_sync(fn)


async def test_what_piles_up_is_taken_in_one_batch_without_wake_ups() -> None:
    waker = CountingWaker()
    handoff: Handoff[int, str] = Handoff(16, waker)

    def work() -> None:
        for i in range(10):
            assert handoff.put(i)
        handoff.finish("usage")

    await in_thread(work)
    assert waker.wakes == 1, "only the finish: nobody was waiting for the items"
    assert await handoff.take() == list(range(10))
    assert await handoff.take() == []
    assert handoff.outcome == "usage"
    assert handoff.done.is_set()


async def test_a_waiting_reader_is_woken_once_however_many_items_follow() -> None:
    waker = CountingWaker()
    handoff: Handoff[int, str] = Handoff(16, waker)
    batches: list[list[int]] = []

    async def read_once() -> None:
        batches.append(await handoff.take())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_once)
        await trio.testing.wait_all_tasks_blocked()

        def work() -> None:
            for i in range(5):
                assert handoff.put(i)

        await in_thread(work)
    assert waker.wakes == 1
    rest = handoff.try_take() or []
    assert batches[0] + rest == list(range(5))


async def test_a_worker_that_is_ahead_by_the_capacity_blocks() -> None:
    handoff: Handoff[int, str] = Handoff(3, trio.lowlevel.current_trio_token())
    three_in, fourth_in = threading.Event(), threading.Event()

    def work() -> None:
        for i in range(3):
            assert handoff.put(i)
        three_in.set()
        assert handoff.put(3)
        fourth_in.set()
        handoff.finish("usage")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(in_thread, work)
        await in_thread(three_in.wait)
        assert not fourth_in.is_set()
        assert await handoff.take() == [0, 1, 2]
        await in_thread(fourth_in.wait)
        assert await handoff.take() == [3]
    assert await handoff.take() == []


async def test_a_reader_that_leaves_unblocks_the_worker_and_stops_it() -> None:
    done: list[Handoff[int, str]] = []
    handoff: Handoff[int, str] = Handoff(1, trio.lowlevel.current_trio_token(), done.append)
    one_in = threading.Event()
    results: list[bool] = []

    def work() -> None:
        results.append(handoff.put(0))
        one_in.set()
        results.append(handoff.put(1))  # blocks: the buffer is full
        results.append(handoff.put(2))
        handoff.finish(None)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(in_thread, work)
        await in_thread(one_in.wait)
        handoff.leave()
        assert handoff.gone
    await handoff.done.wait()
    assert results == [True, False, False]
    assert done == [handoff]
    assert await handoff.take() == [], "what was buffered is dropped"


async def test_a_worker_outliving_the_trio_run_is_not_an_error() -> None:
    class Finished:
        def run_sync_soon(self, sync_fn: Callable[[], object]) -> None:
            raise trio.RunFinishedError("the run is over")

    handoff: Handoff[int, str] = Handoff(2, Finished())
    assert handoff.put(1)
    handoff.finish("late")
    assert handoff.try_take() == [1]
    assert handoff.try_take() == []
    assert not handoff.done.is_set()


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity"):
        Handoff(0, object())  # type: ignore[arg-type]
