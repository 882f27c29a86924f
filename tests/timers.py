"""Timeouts over real loopback sockets, proven on a virtual clock moved by hand.

An autojump clock jumps as soon as every task waits, which over real sockets also
happens while the kernel is still delivering bytes: a timeout can then fire early.
:func:`finishes_at` moves the clock itself, and only after ``ready`` says, at the
application level, that nothing is in flight (the peer holds the whole request and
sends nothing, or the caller has read all that was sent): then the call must still
be waiting just before ``seconds`` and must be done at ``seconds``, exactly.
:func:`finishes_untimed` checks the other case, a call that must end on what its
peer sends with the clock stopped.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

__all__ = ["EARLY", "calls", "finishes_at", "finishes_untimed"]

#: Virtual seconds before a deadline at which nothing may have happened yet.
EARLY = 1 / 64

Call = Callable[[], Awaitable[Any]]
Done = list[tuple[Any, Exception | None]]


def calls(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> trio.Semaphore:
    """A counter released each time the async function ``owner.<name>`` is entered
    (it then runs as before): ``calls(...).acquire`` is a ``ready`` that returns once
    the code under test has reached that point."""
    original = getattr(owner, name)
    entered = trio.Semaphore(0)

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        entered.release()
        return await original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return entered


def _result(done: Done) -> Any:
    value, error = done[0]
    if error is not None:
        raise error
    return value


async def _start(nursery: trio.Nursery, call: Call, ready: Call, *, early_ok: bool) -> Done:
    """Start ``call()`` and return once ``ready()`` has, or ``call`` has ended (an
    error unless ``early_ok``: ``ready`` might otherwise wait for ever)."""
    done: Done = []
    waiting = trio.CancelScope()

    async def run() -> None:
        try:
            done.append((await call(), None))
        except Exception as exc:
            done.append((None, exc))
        finally:
            waiting.cancel()

    nursery.start_soon(run)
    with waiting:
        await ready()
    if done and not early_ok:
        _result(done)
        raise AssertionError("finished before it was ready")
    return done


async def finishes_untimed(call: Call, ready: Call, *, rounds: int = 1000) -> Any:
    """Run ``call()`` on a clock that does not move: it must finish on what its peer
    sends, without a timer. After ``ready()`` (or the call's end, if sooner), each
    round waits until every task waits (the kernel meanwhile delivers bytes still in
    flight); after ``rounds`` such rounds without an end it fails rather than hang.
    Returns its result or raises its exception."""
    async with trio.open_nursery() as nursery:
        done = await _start(nursery, call, ready, early_ok=True)
        for _ in range(rounds):
            await trio.testing.wait_all_tasks_blocked()
            if done:
                break
        else:
            nursery.cancel_scope.cancel()
            raise AssertionError(f"not finished after {rounds} rounds with the clock stopped")
    return _result(done)


async def finishes_at(
    clock: trio.testing.MockClock, seconds: float, call: Call, ready: Call
) -> Any:
    """Run ``call()``; once ``ready()`` has returned and every task waits, move
    ``clock`` (a :class:`~trio.testing.MockClock` that does not jump by itself) to
    ``seconds - EARLY``, where ``call`` must still be waiting, then to ``seconds``,
    where it must be done. Returns its result or raises its exception."""
    async with trio.open_nursery() as nursery:
        done = await _start(nursery, call, ready, early_ok=False)
        await trio.testing.wait_all_tasks_blocked()
        clock.jump(seconds - EARLY)
        await trio.testing.wait_all_tasks_blocked()
        assert not done, f"finished before {seconds} virtual seconds"
        clock.jump(EARLY)
        await trio.testing.wait_all_tasks_blocked()
        if not done:
            nursery.cancel_scope.cancel()
            raise AssertionError(f"still waiting after {seconds} virtual seconds")
    return _result(done)
