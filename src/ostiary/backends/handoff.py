"""A bounded hand-off from one worker thread to one Trio reader, in batches.

A model that runs in a worker thread produces many small items (tokens) a few
milliseconds apart. Handing each across with ``trio.from_thread`` costs a round trip
per token: the worker waits until the Trio thread has run its call. :class:`Handoff`
costs a lock per item instead, and the Trio side is woken at most once per batch:

- the worker appends under a lock and returns at once; only when the reader is
  waiting does it ask Trio (``run_sync_soon``, which does not wait) to wake it, and
  the wake-up is claimed under the lock, so it happens once whatever the worker
  appends before the reader runs;
- the reader takes everything buffered in one go;
- at most ``capacity`` items are buffered: a worker that is ahead by that much blocks
  until the reader takes them or leaves (memory stays bounded);
- a reader that leaves (:meth:`Handoff.leave`) unblocks the worker, whose next
  :meth:`Handoff.put` says to stop.

The worker ends with :meth:`Handoff.finish`, which carries the outcome (its last
word: a usage, an error) and runs ``on_done(handoff)`` on the Trio thread.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

import trio

__all__ = ["Handoff", "Waker"]

T = TypeVar("T")
R = TypeVar("R")


class Waker(Protocol):
    """What the worker needs of Trio: ``trio.lowlevel.TrioToken`` has it."""

    def run_sync_soon(self, sync_fn: Callable[[], object]) -> None: ...


class Handoff(Generic[T, R]):
    """One stream's bounded buffer (see the module docstring). Thread-safe where
    the method says "worker"; every other method runs on the Trio thread."""

    def __init__(
        self,
        capacity: int,
        waker: Waker,
        on_done: Callable[[Handoff[T, R]], object] | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._capacity = capacity
        self._waker = waker
        self._on_done = on_done
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._items: list[T] = []
        self._waiter: trio.Event | None = None
        self._finished = False
        #: The worker's last word, set by :meth:`finish`.
        self.outcome: R | None = None
        #: Set once the worker has finished (on the Trio thread).
        self.done = trio.Event()
        #: The reader has left: the worker should stop. Read without the lock.
        self.gone = False

    # --- the worker's side ----------------------------------------------------------

    def put(self, item: T) -> bool:
        """Worker: buffer ``item``, blocking while the buffer is full. Returns False,
        dropping ``item``, when the reader has left: stop producing."""
        with self._lock:
            while len(self._items) >= self._capacity and not self.gone:
                self._room.wait()
            if self.gone:
                return False
            self._items.append(item)
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            self._wake(waiter.set)
        return True

    def finish(self, outcome: R | None) -> None:
        """Worker: no more items; ``outcome`` is what the reader gets at the end."""
        with self._lock:
            self.outcome = outcome
            self._finished = True
        self._wake(self._finished_on_trio)

    def _wake(self, fn: Callable[[], object]) -> None:
        with contextlib.suppress(trio.RunFinishedError):  # nobody left to wake
            self._waker.run_sync_soon(fn)

    def _finished_on_trio(self) -> None:
        with self._lock:
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.set()
        self.done.set()
        if self._on_done is not None:
            self._on_done(self)

    # --- the reader's side ----------------------------------------------------------

    def try_take(self) -> list[T] | None:
        """Everything buffered, without waiting: [] once the worker has finished and
        all is read; None when nothing is there yet."""
        with self._lock:
            if self._items:
                batch, self._items = self._items, []
                self._room.notify()
                return batch
            return [] if self._finished else None

    async def take(self) -> list[T]:
        """Everything buffered, waiting for at least one item; [] once the worker has
        finished and all is read. Always a checkpoint."""
        while True:
            batch = self.try_take()
            if batch is not None:
                await trio.lowlevel.checkpoint()
                return batch
            with self._lock:
                if self._items or self._finished:
                    continue
                waiter = self._waiter = trio.Event()
            await waiter.wait()

    def leave(self) -> None:
        """The reader is gone: unblock the worker and make its next put fail."""
        with self._lock:
            self.gone = True
            self._items.clear()
            self._room.notify_all()
