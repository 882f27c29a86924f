"""Slots and the bounded queue in front of one backend, sans I/O.

A backend runs at most ``max_concurrency`` requests at once; at most ``max_queue``
more wait for a slot. The :class:`Scheduler` protocol is what the gateway needs of a
queue, whatever its policy:

- :meth:`~Scheduler.submit` a :class:`Ticket`: it runs at once (a slot was free), is
  queued, or is refused because the queue is full;
- :meth:`~Scheduler.release` a running request's slot when it ends (finished, failed,
  client gone): the tickets that now run are returned, so the gateway dispatches them
  in the same call;
- :meth:`~Scheduler.charge` a request with its real cost as usage arrives;
- :meth:`~Scheduler.cancel` a queued ticket (its client left);
- :meth:`~Scheduler.expire` the queued tickets whose deadline has passed, and
  :meth:`~Scheduler.next_deadline` to say when that is next needed;
- :meth:`~Scheduler.drain` every queued ticket (shutdown);
- :meth:`~Scheduler.estimate_wait` for the ``retry-after`` of a refusal, from the
  queue's depth and its recent service rate (:class:`ServiceRate`);
- :meth:`~Scheduler.snapshot` for ``/v1/queue`` and ``/metrics``: what runs and
  waits, per principal (O(principals), read-only).

Every implementation keeps the same contract: a slot is never idle while a ticket
waits (``running < max_concurrency`` implies ``queued == 0``), the queue never holds
more than ``max_queue``, and each submitted request leaves exactly once — by
``release`` if it ran, otherwise by being dispatched, cancelled, expired or drained.
``now`` is monotonic seconds and never goes back between calls.

:class:`FifoScheduler` serves in arrival order, every operation O(1) except
deadlines, which cost O(log n) (:class:`~ostiary.protocol.keyed_heap.KeyedHeap`);
:class:`~ostiary.protocol.fair_queue.FairQueue` shares out the slots by weight.
"""

from __future__ import annotations

import enum
import math
from collections import OrderedDict
from typing import Protocol

import attrs

from .keyed_heap import KeyedHeap

__all__ = [
    "FifoScheduler",
    "QueueSnapshot",
    "Scheduler",
    "SchedulerBase",
    "ServiceRate",
    "Submitted",
    "Ticket",
    "check_capacity",
    "check_cost",
]


def check_cost(value: float) -> float:
    """A cost is a finite number of tokens, never negative."""
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"cost must be finite and >= 0, not {value!r}")
    return value


def check_capacity(max_concurrency: int, max_queue: int) -> None:
    if max_concurrency < 1 or max_queue < 0:
        raise ValueError("max_concurrency must be >= 1 and max_queue >= 0")


@attrs.define
class Ticket:
    """One request asking for a slot. ``cost`` is its estimated tokens, ``weight``
    and ``priority`` come from the principal's role (a fair policy uses them; FIFO
    does not); a queued ticket leaves at ``deadline`` (monotonic seconds). Never
    changed once built (``attrs.evolve`` makes a new one), but not frozen: one is
    built per request, and a frozen class costs twice as much to build."""

    request_id: str
    principal: str = ""
    cost: float = 1.0
    weight: float = 1.0
    priority: int = 0
    deadline: float = math.inf

    def __attrs_post_init__(self) -> None:
        # One check of all three (built per request: three validators cost more).
        if not 0.0 <= self.cost < math.inf:
            check_cost(self.cost)
        if not 0.0 < self.weight < math.inf:
            raise ValueError(f"weight must be finite and > 0, not {self.weight!r}")
        if self.deadline != self.deadline:
            raise ValueError("deadline must be a number")


@attrs.frozen
class QueueSnapshot:
    """One scheduler at one moment: ``running`` and ``queued`` requests, the recent
    ``service_rate`` (requests finished per second), the ``estimated_wait`` of a
    request submitted now, and per principal ``(principal, queued, running)``,
    sorted by principal (only principals with something queued or running)."""

    running: int
    queued: int
    service_rate: float
    estimated_wait: float
    principals: tuple[tuple[str, int, int], ...]


class Submitted(enum.Enum):
    # Members are singletons: hash by identity, not (as Enum does) in Python by name.
    __hash__ = object.__hash__

    RUNNING = "running"
    QUEUED = "queued"
    FULL = "full"


class Scheduler(Protocol):
    """What the gateway asks of the queue in front of one backend."""

    @property
    def running(self) -> int: ...

    @property
    def queued(self) -> int: ...

    def is_running(self, request_id: str) -> bool: ...

    def submit(self, ticket: Ticket, now: float) -> Submitted:
        """Run, queue or refuse ``ticket``; ValueError if its id is already in."""
        ...

    def release(self, request_id: str, now: float) -> list[Ticket]:
        """Free a running request's slot (KeyError if it is not running) and return
        the queued tickets that now run, in the order they were chosen."""
        ...

    def charge(self, request_id: str, actual_cost: float) -> bool:
        """Replace the request's cost by ``actual_cost``, its total so far (so
        calling again as usage grows is right); call before ``release``. False if
        the request is neither queued nor running; ValueError on a bad cost."""
        ...

    def cancel(self, request_id: str) -> bool:
        """Remove a queued ticket; False if it is not queued."""
        ...

    def expire(self, now: float) -> list[Ticket]:
        """Remove and return the queued tickets whose deadline is ``<= now``."""
        ...

    def next_deadline(self) -> float:
        """The earliest deadline of a queued ticket, ``math.inf`` if none."""
        ...

    def drain(self) -> list[Ticket]:
        """Remove and return every queued ticket; running ones stay running."""
        ...

    def estimate_wait(self, now: float) -> float:
        """Seconds a ticket submitted now would wait for a slot (0 if one is free)."""
        ...

    def snapshot(self, now: float) -> QueueSnapshot:
        """What runs and waits now, per principal; changes nothing."""
        ...


class ServiceRate:
    """Requests finished per second over the recent past, and the wait it implies.

    A release ``a`` seconds ago counts ``exp(-a / window)``; so does each second of
    observed time (from the first call on). The rate is their ratio, with one
    pseudo-release per ``1 / prior_rate`` seconds of pseudo-time mixed in, so an
    estimate exists before the first release and moves to the measured rate as
    releases arrive::

        rate = (Σ exp(-a_k / window) + 1) / (window * (1 - exp(-T / window)) + 1 / prior_rate)

    where ``T`` is the time observed. A backend that stops finishing requests sees
    its rate decay, and the waits quoted grow, within about one ``window``.
    """

    __slots__ = ("_decayed", "_last", "_observed", "prior_rate", "window")

    def __init__(self, window: float = 30.0, prior_rate: float = 1.0) -> None:
        if not (window > 0 and prior_rate > 0 and math.isfinite(window + prior_rate)):
            raise ValueError("window and prior_rate must be finite and > 0")
        self.window = window
        self.prior_rate = prior_rate
        self._decayed = 0.0
        self._observed = 0.0
        self._last: float | None = None

    def observe(self, now: float) -> None:
        """Start the observed time (on the first call), or advance it to ``now``
        (what :meth:`_at` gives, done in place: twice per request)."""
        last = self._last
        if last is None:
            self._last = now
        elif now > last:
            factor = math.exp((last - now) / self.window)
            self._decayed *= factor
            self._observed = self._observed * factor + self.window * (1.0 - factor)
            self._last = now

    def release(self, now: float) -> None:
        """Count one finished request at ``now``."""
        self.observe(now)
        self._decayed += 1.0

    def rate(self, now: float) -> float:
        """Requests per second, always finite and > 0."""
        decayed, observed = self._at(now)
        return (decayed + 1.0) / (observed + 1.0 / self.prior_rate)

    def estimate_wait(self, now: float, queued: int, running: int, slots: int) -> float:
        """Seconds until a slot frees for a ticket behind ``queued`` others, with
        ``running`` of ``slots`` busy: one release per ticket ahead, at the rate."""
        ahead = queued + 1 - (slots - running)
        return ahead / self.rate(now) if ahead > 0 else 0.0

    def _at(self, now: float) -> tuple[float, float]:
        if self._last is None:
            return 0.0, 0.0
        factor = math.exp(-max(0.0, now - self._last) / self.window)
        return self._decayed * factor, self._observed * factor + self.window * (1.0 - factor)


class SchedulerBase:
    """What every scheduler here shares: the limits, the deadlines of queued
    tickets, the service rate, and the admission verdict. ``rate_window`` and
    ``service_time`` (the time one request is assumed to hold a slot until releases
    have been measured) tune :meth:`estimate_wait`."""

    __slots__ = ("_deadlines", "_rate", "max_concurrency", "max_queue")

    def __init__(
        self, max_concurrency: int, max_queue: int, rate_window: float, service_time: float
    ) -> None:
        check_capacity(max_concurrency, max_queue)
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        #: Queued tickets with a finite deadline, soonest first.
        self._deadlines: KeyedHeap[str] = KeyedHeap()
        self._rate = ServiceRate(rate_window, max_concurrency / service_time)

    @property
    def running(self) -> int:
        raise NotImplementedError

    @property
    def queued(self) -> int:
        raise NotImplementedError

    def is_running(self, request_id: str) -> bool:
        raise NotImplementedError

    def is_queued(self, request_id: str) -> bool:
        raise NotImplementedError

    def next_deadline(self) -> float:
        return self._deadlines.least(math.inf)

    def estimate_wait(self, now: float) -> float:
        return self._rate.estimate_wait(now, self.queued, self.running, self.max_concurrency)

    def _snapshot(self, now: float, principals: dict[str, list[int]]) -> QueueSnapshot:
        """A snapshot from per-principal ``[queued, running]`` counts."""
        return QueueSnapshot(
            running=self.running,
            queued=self.queued,
            service_rate=self._rate.rate(now),
            estimated_wait=self.estimate_wait(now),
            principals=tuple((p, q, r) for p, (q, r) in sorted(principals.items()) if q or r),
        )

    def _admit(self, ticket: Ticket, now: float) -> Submitted:
        """Whether ``ticket`` runs, queues or is refused (the caller then does it);
        a queued ticket's deadline is noted here."""
        rid = ticket.request_id
        if self.is_running(rid) or self.is_queued(rid):
            raise ValueError(f"request {rid!r} is already scheduled")
        self._rate.observe(now)
        queued = self.queued
        if self.running < self.max_concurrency and not queued:
            return Submitted.RUNNING
        if queued >= self.max_queue:
            return Submitted.FULL
        if ticket.deadline < math.inf:
            self._deadlines.push(rid, (ticket.deadline, 0.0))
        return Submitted.QUEUED


class FifoScheduler(SchedulerBase):
    """First come, first served, with ``max_concurrency`` slots and room for
    ``max_queue`` waiting tickets."""

    __slots__ = ("_counts", "_queue", "_running")

    def __init__(
        self,
        max_concurrency: int,
        max_queue: int,
        *,
        rate_window: float = 30.0,
        service_time: float = 1.0,
    ) -> None:
        super().__init__(max_concurrency, max_queue, rate_window, service_time)
        #: Running request ids, with their principals.
        self._running: dict[str, str] = {}
        #: Queued tickets in arrival order (an OrderedDict pops its first item in
        #: O(1); a dict's cost grows with the items deleted before it).
        self._queue: OrderedDict[str, Ticket] = OrderedDict()
        #: ``[queued, running]`` per principal with something queued or running.
        self._counts: dict[str, list[int]] = {}

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def is_running(self, request_id: str) -> bool:
        return request_id in self._running

    def is_queued(self, request_id: str) -> bool:
        return request_id in self._queue

    def submit(self, ticket: Ticket, now: float) -> Submitted:
        verdict = self._admit(ticket, now)
        if verdict is Submitted.RUNNING:
            self._running[ticket.request_id] = ticket.principal
            self._count(ticket.principal, 0, 1)
        elif verdict is Submitted.QUEUED:
            self._queue[ticket.request_id] = ticket
            self._count(ticket.principal, 1, 0)
        return verdict

    def release(self, request_id: str, now: float) -> list[Ticket]:
        self._count(self._running.pop(request_id), 0, -1)
        self._rate.release(now)
        started: list[Ticket] = []
        queue = self._queue
        while queue and len(self._running) < self.max_concurrency:
            rid, ticket = queue.popitem(last=False)
            self._deadlines.discard(rid)
            self._running[rid] = ticket.principal
            self._count(ticket.principal, -1, 1)
            started.append(ticket)
        return started

    def snapshot(self, now: float) -> QueueSnapshot:
        return self._snapshot(now, self._counts)

    def _count(self, principal: str, queued: int, running: int) -> None:
        counts = self._counts.get(principal)
        if counts is None:
            counts = self._counts[principal] = [0, 0]
        counts[0] += queued
        counts[1] += running
        if not (counts[0] or counts[1]):
            del self._counts[principal]

    def charge(self, request_id: str, actual_cost: float) -> bool:
        check_cost(actual_cost)
        return request_id in self._running or request_id in self._queue

    def cancel(self, request_id: str) -> bool:
        self._deadlines.discard(request_id)
        ticket = self._queue.pop(request_id, None)
        if ticket is None:
            return False
        self._count(ticket.principal, -1, 0)
        return True

    def expire(self, now: float) -> list[Ticket]:
        expired = [self._queue.pop(rid) for rid in self._deadlines.pop_due(now)]
        for ticket in expired:
            self._count(ticket.principal, -1, 0)
        return expired

    def drain(self) -> list[Ticket]:
        drained = list(self._queue.values())
        self._queue.clear()
        self._deadlines.clear()
        for ticket in drained:
            self._count(ticket.principal, -1, 0)
        return drained
