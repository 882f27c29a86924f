"""Timeouts over real loopback sockets, proven on a virtual clock moved by hand.

An autojump clock jumps as soon as every task waits, which over real sockets also
happens while the kernel is still delivering bytes: a timeout can then fire early.
:func:`finishes_at` moves the clock itself, and only after ``ready`` says, at the
application level, that nothing is in flight (the peer holds the whole request and
sends nothing, or the caller has read all that was sent): then the call must still
be waiting just before ``seconds`` and must be done at ``seconds``, exactly.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio
import trio.testing

__all__ = ["EARLY", "finishes_at"]

#: Virtual seconds before a deadline at which nothing may have happened yet.
EARLY = 1 / 64


async def finishes_at(
    clock: trio.testing.MockClock,
    seconds: float,
    call: Callable[[], Awaitable[Any]],
    ready: Callable[[], Awaitable[object]],
) -> Any:
    """Run ``call()``; once ``ready()`` has returned and every task waits, move
    ``clock`` (a :class:`~trio.testing.MockClock` that does not jump by itself) to
    ``seconds - EARLY``, where ``call`` must still be waiting, then to ``seconds``,
    where it must be done. Returns its result or raises its exception."""
    done: list[tuple[Any, Exception | None]] = []

    async def run() -> None:
        try:
            done.append((await call(), None))
        except Exception as exc:
            done.append((None, exc))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await ready()
        await trio.testing.wait_all_tasks_blocked()
        clock.jump(seconds - EARLY)
        await trio.testing.wait_all_tasks_blocked()
        assert not done, f"finished before {seconds} virtual seconds"
        clock.jump(EARLY)
        await trio.testing.wait_all_tasks_blocked()
        if not done:
            nursery.cancel_scope.cancel()
            raise AssertionError(f"still waiting after {seconds} virtual seconds")
    value, error = done[0]
    if error is not None:
        raise error
    return value
