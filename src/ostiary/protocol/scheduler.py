"""Slots and the bounded queue in front of one backend, sans I/O.

A backend runs at most ``max_concurrency`` requests at once; at most ``max_queue``
more wait for a slot. The :class:`Scheduler` protocol is what the gateway needs of a
queue, whatever its policy:

- :meth:`~Scheduler.submit` a :class:`Ticket`: it runs at once (a slot was free), is
  queued, or is refused because the queue is full;
- :meth:`~Scheduler.release` a running request's slot when it ends (finished, failed,
  cancelled): the tickets that now run are returned, so the gateway dispatches them in
  the same call;
- :meth:`~Scheduler.cancel` a queued ticket (its client left);
- :meth:`~Scheduler.expire` the queued tickets whose deadline has passed, and
  :meth:`~Scheduler.next_deadline` to say when that is next needed;
- :meth:`~Scheduler.drain` every queued ticket (shutdown).

:class:`FifoScheduler` serves in arrival order. Every operation is O(1) amortized,
except deadlines, which cost O(log n) (a heap with lazy deletion, so tickets may carry
deadlines of their own).
"""

from __future__ import annotations

import enum
import heapq
import math
from typing import Protocol

import attrs

__all__ = ["FifoScheduler", "Scheduler", "Submitted", "Ticket"]


@attrs.frozen
class Ticket:
    """One request asking for a slot. ``cost`` is its estimated tokens, ``weight``
    and ``priority`` come from the principal's role (a fair policy uses them; FIFO
    does not); a queued ticket leaves at ``deadline`` (monotonic seconds)."""

    request_id: str
    principal: str = ""
    cost: float = 1.0
    weight: float = 1.0
    priority: int = 0
    deadline: float = math.inf


class Submitted(enum.Enum):
    RUNNING = "running"
    QUEUED = "queued"
    FULL = "full"


class Scheduler(Protocol):
    """What the gateway asks of the queue in front of one backend."""

    @property
    def running(self) -> int: ...

    @property
    def queued(self) -> int: ...

    def submit(self, ticket: Ticket, now: float) -> Submitted: ...

    def release(self, request_id: str, now: float) -> list[Ticket]: ...

    def cancel(self, request_id: str) -> bool: ...

    def expire(self, now: float) -> list[Ticket]: ...

    def next_deadline(self) -> float: ...

    def drain(self) -> list[Ticket]: ...


class FifoScheduler:
    """First come, first served, with ``max_concurrency`` slots and room for
    ``max_queue`` waiting tickets."""

    __slots__ = ("_deadlines", "_queue", "_running", "_seq", "max_concurrency", "max_queue")

    def __init__(self, max_concurrency: int, max_queue: int) -> None:
        if max_concurrency < 1 or max_queue < 0:
            raise ValueError("max_concurrency must be >= 1 and max_queue >= 0")
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self._running: set[str] = set()
        #: Queued tickets in arrival order (dicts keep insertion order; O(1) removal).
        self._queue: dict[str, Ticket] = {}
        #: (deadline, seq, request_id) of queued tickets with a finite deadline;
        #: entries of tickets that left meanwhile are skipped when met.
        self._deadlines: list[tuple[float, int, str]] = []
        self._seq = 0

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def is_running(self, request_id: str) -> bool:
        return request_id in self._running

    def submit(self, ticket: Ticket, now: float) -> Submitted:
        rid = ticket.request_id
        if rid in self._running or rid in self._queue:
            raise ValueError(f"request {rid!r} is already scheduled")
        if len(self._running) < self.max_concurrency and not self._queue:
            self._running.add(rid)
            return Submitted.RUNNING
        if len(self._queue) >= self.max_queue:
            return Submitted.FULL
        self._queue[rid] = ticket
        if ticket.deadline < math.inf:
            self._seq += 1
            heapq.heappush(self._deadlines, (ticket.deadline, self._seq, rid))
        return Submitted.QUEUED

    def release(self, request_id: str, now: float) -> list[Ticket]:
        self._running.remove(request_id)
        started: list[Ticket] = []
        queue = self._queue
        while queue and len(self._running) < self.max_concurrency:
            rid = next(iter(queue))
            started.append(queue.pop(rid))
            self._running.add(rid)
        return started

    def cancel(self, request_id: str) -> bool:
        return self._queue.pop(request_id, None) is not None

    def expire(self, now: float) -> list[Ticket]:
        expired: list[Ticket] = []
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            _, _, rid = heapq.heappop(heap)
            ticket = self._queue.pop(rid, None)
            if ticket is not None:
                expired.append(ticket)
        return expired

    def next_deadline(self) -> float:
        heap = self._deadlines
        while heap and heap[0][2] not in self._queue:
            heapq.heappop(heap)
        return heap[0][0] if heap else math.inf

    def drain(self) -> list[Ticket]:
        drained = list(self._queue.values())
        self._queue.clear()
        self._deadlines.clear()
        return drained
