"""Weighted fair queueing of tokens in front of one backend, sans I/O.

:class:`FairQueue` is a :class:`~ostiary.protocol.scheduler.Scheduler`: the same
slots and bounded queue as FIFO, but a tenant's burst no longer makes every other
tenant wait behind it.

**Flows.** A queued ticket joins the sub-queue (FIFO) of its *flow*, the pair
(priority, principal). Each flow has a virtual counter ``v``, its charged cost divided
by its weight, in the manner of the virtual token counter of Sheng et al., "Fairness
in Serving Large Language Models" (OSDI 2024). Each priority class has a system
virtual time ``V``: the counter of the flow last served, before its charge.

- Serving a class picks its backlogged flow (one with tickets queued) of least ``v``
  (ties: the one keyed first), sets ``V = v``, dispatches the head ticket and charges
  it: ``v += cost / weight``.
- A flow that becomes backlogged starts at ``v = max(v, V)``; a flow with nothing
  queued or running is forgotten, and comes back at ``v = V``. Idle time earns no
  credit, so forgetting a flow never lets it jump the line.
- :meth:`FairQueue.charge` replaces a request's cost by its real usage as it arrives:
  ``v += (actual - charged) / weight``. For a flow with nothing queued the result is
  floored at ``V`` (a refund never banks credit for later); a backlogged flow keeps
  it, since it waited while over-charged: without that, a generous estimate refunded
  at the end would erase the weights (each refund floored at the same ``V``).

**Bounds.** Let ``C`` be the largest cost charged to one request and ``R`` =
``max_concurrency``. In every class, at every moment, every backlogged flow ``i``
has ``V - R * C / w_i <= v_i <= V + (1 + R) * C / w_i`` (the lower slack: refunds of
at most ``R`` running requests), and ``V <= v_i <= V + C / w_i`` when costs are not
corrected after dispatch. (Proof sketch: serving the least ``v`` keeps
``V`` below every backlogged counter and moves ``V`` only up; each flow is charged at
most ``C / w`` past the ``V`` of its last pick, plus the later corrections of at most
``R`` requests it has running.) Hence, without corrections:

- *Fairness*: over any interval in which flows ``i`` and ``j`` of one class are both
  backlogged, the costs ``S_i``, ``S_j`` dispatched to them satisfy
  ``|S_i / w_i - S_j / w_j| <= C / w_i + C / w_j``. Weights 1 and 3 are served 1:3
  to within ``4 * C / 3`` in units of the weight-1 flow.
- *Latency*: from the moment a ticket is at the head of backlogged flow ``i`` until
  it is dispatched, every other flow ``j`` of its class is dispatched at most
  ``C * (1 + w_j / w_i)`` of cost. A tenant sending one request at a time behind a
  tenant with a deep queue waits for about one of the other's requests per slot, not
  for its whole queue.

**Priority and aging.** A queued ticket's effective priority is its ``priority``
plus one per ``aging_seconds`` waited. The class holding the ticket of highest
effective priority — that is, of least ``enqueued - priority * aging_seconds``, which
is always its oldest, since all waiting tickets age alike — is served next (ties: the
higher class). Because the order does not change with time, ``now`` is not needed to
pick. So a higher class goes first, and aging bounds what a ticket of priority ``c``
enqueued at ``t`` waits for: another class ``p`` is served before its class only
while ``p`` holds a ticket that arrived by ``t + (p - c) * aging_seconds``. Under
sustained load from higher classes it therefore waits ``(P - c) * aging_seconds``
(``P`` the highest class queued), then for the tickets those classes held at that
instant (each served within its own class's latency bound, so with newcomers of
that class taking at most their fair share meanwhile), then for its own latency
bound in its class — never for higher-class tickets that arrive later than that.
With one flow per higher class that is at most as many dispatches as those classes
had queued at ``t + (P - c) * aging_seconds``. ``aging_seconds = math.inf`` is
strict priority (a lower class may then starve).

**Cost.** ``submit``, ``release``, ``charge``, ``cancel`` and each expired,
dispatched or drained ticket cost O(log n) amortized (heaps with lazy deletion,
:class:`~ostiary.protocol.keyed_heap.KeyedHeap`); nothing recurses. Memory is the
queued tickets, the running ones and one flow per principal with something queued
or running.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import attrs

from .exchange import BackendPolicy
from .keyed_heap import HeapKey, KeyedHeap
from .scheduler import (
    FifoScheduler,
    QueueSnapshot,
    Scheduler,
    SchedulerBase,
    Submitted,
    Ticket,
    check_cost,
)

__all__ = ["FairQueue", "scheduler_for"]

#: (priority, principal)
FlowKey = tuple[int, str]


@attrs.define
class _Flow:
    """One principal's sub-queue in one priority class."""

    key: FlowKey
    vtime: float
    queue: OrderedDict[str, Ticket] = attrs.Factory(OrderedDict)
    running: int = 0


@attrs.define
class _Class:
    """One priority class: its virtual time and its backlogged flows."""

    priority: int
    vtime: float = 0.0
    flows: int = 0
    #: Principals with tickets queued in this class, by their flow's counter.
    backlogged: KeyedHeap[str] = attrs.Factory(KeyedHeap)
    #: Queued request ids in arrival order, with the time each was enqueued.
    waiting: OrderedDict[str, float] = attrs.Factory(OrderedDict)


@attrs.define
class _Running:
    flow: FlowKey
    charged: float
    weight: float


class FairQueue(SchedulerBase):
    """Weighted fair queueing with priority classes and aging (see the module).

    ``max_concurrency`` slots, at most ``max_queue`` queued tickets. A queued
    ticket's priority rises by one class per ``aging_seconds`` waited (``inf``:
    never). ``rate_window`` and ``service_time`` tune :meth:`estimate_wait`
    (:class:`~ostiary.protocol.scheduler.SchedulerBase`).
    """

    __slots__ = (
        "_by_age",
        "_classes",
        "_flows",
        "_running",
        "_spare_class",
        "_spare_flow",
        "_where",
        "aging_seconds",
    )

    def __init__(
        self,
        max_concurrency: int,
        max_queue: int,
        *,
        aging_seconds: float = 60.0,
        rate_window: float = 30.0,
        service_time: float = 1.0,
    ) -> None:
        super().__init__(max_concurrency, max_queue, rate_window, service_time)
        if not aging_seconds > 0:
            raise ValueError("aging_seconds must be > 0")
        self.aging_seconds = aging_seconds
        self._flows: dict[FlowKey, _Flow] = {}
        self._classes: dict[int, _Class] = {}
        #: Classes with tickets queued, by the aging key of their oldest.
        self._by_age: KeyedHeap[int] = KeyedHeap()
        #: The flow of every queued request.
        self._where: dict[str, FlowKey] = {}
        self._running: dict[str, _Running] = {}
        #: The last flow and class forgotten, empty, to be reused: a backend that
        #: runs one request at a time would otherwise build both for every request.
        self._spare_flow: _Flow | None = None
        self._spare_class: _Class | None = None

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def queued(self) -> int:
        return len(self._where)

    def is_running(self, request_id: str) -> bool:
        return request_id in self._running

    def is_queued(self, request_id: str) -> bool:
        return request_id in self._where

    def submit(self, ticket: Ticket, now: float) -> Submitted:
        verdict = self._admit(ticket, now)
        if verdict is Submitted.FULL:
            return verdict
        flow, cls = self._flow(ticket)
        if verdict is Submitted.RUNNING:
            flow.vtime = max(flow.vtime, cls.vtime)
            self._start(ticket, flow, cls)
            return verdict
        rid = ticket.request_id
        if not flow.queue:
            flow.vtime = max(flow.vtime, cls.vtime)
            cls.backlogged.push(flow.key[1], (flow.vtime, 0.0))
        flow.queue[rid] = ticket
        cls.waiting[rid] = now
        if len(cls.waiting) == 1:
            self._by_age.push(cls.priority, self._age_key(cls.priority, now))
        self._where[rid] = flow.key
        return verdict

    def release(self, request_id: str, now: float) -> list[Ticket]:
        done = self._running.pop(request_id)
        flow = self._flows[done.flow]
        flow.running -= 1
        self._forget_if_idle(flow)
        self._rate.release(now)
        return self._dispatch()

    def charge(self, request_id: str, actual_cost: float) -> bool:
        check_cost(actual_cost)
        running = self._running.get(request_id)
        if running is not None:
            flow = self._flows[running.flow]
            cls = self._classes[flow.key[0]]
            vtime = flow.vtime + (actual_cost - running.charged) / running.weight
            # A backlogged flow keeps a refund (it was owed that service while it
            # waited); an idle one comes back at V anyway.
            flow.vtime = vtime if flow.queue else max(cls.vtime, vtime)
            running.charged = actual_cost
            if flow.queue:
                cls.backlogged.push(flow.key[1], (flow.vtime, 0.0))
            return True
        key = self._where.get(request_id)
        if key is None:
            return False
        queue = self._flows[key].queue
        queue[request_id] = attrs.evolve(queue[request_id], cost=actual_cost)
        return True

    def cancel(self, request_id: str) -> bool:
        if request_id not in self._where:
            return False
        self._remove_queued(request_id)
        return True

    def expire(self, now: float) -> list[Ticket]:
        return [self._remove_queued(rid) for rid in self._deadlines.pop_due(now)]

    def drain(self) -> list[Ticket]:
        """Every queued ticket, in arrival order."""
        drained = [self._flows[key].queue[rid] for rid, key in self._where.items()]
        for ticket in drained:
            self._remove_queued(ticket.request_id)
        return drained

    def snapshot(self, now: float) -> QueueSnapshot:
        """O(flows): a principal's flows in every class, added up."""
        counts: dict[str, list[int]] = {}
        for (_, principal), flow in self._flows.items():
            entry = counts.setdefault(principal, [0, 0])
            entry[0] += len(flow.queue)
            entry[1] += flow.running
        return self._snapshot(now, counts)

    def _age_key(self, priority: int, enqueued: float) -> HeapKey:
        if self.aging_seconds == math.inf:
            return (-priority, enqueued)
        return (enqueued - priority * self.aging_seconds, -priority)

    def _flow(self, ticket: Ticket) -> tuple[_Flow, _Class]:
        """The ticket's flow and class, made (at the class's virtual time) if new."""
        cls = self._classes.get(ticket.priority)
        if cls is None:
            cls = self._spare_class
            if cls is None:
                cls = _Class(ticket.priority)
            else:
                self._spare_class = None
                cls.priority = ticket.priority
                cls.vtime = 0.0
            self._classes[ticket.priority] = cls
        key = (ticket.priority, ticket.principal)
        flow = self._flows.get(key)
        if flow is None:
            flow = self._spare_flow
            if flow is None:
                flow = _Flow(key, cls.vtime)
            else:
                self._spare_flow = None
                flow.key = key
                flow.vtime = cls.vtime
            self._flows[key] = flow
            cls.flows += 1
        return flow, cls

    def _start(self, ticket: Ticket, flow: _Flow, cls: _Class) -> None:
        cls.vtime = max(cls.vtime, flow.vtime)
        flow.vtime += ticket.cost / ticket.weight
        flow.running += 1
        self._running[ticket.request_id] = _Running(flow.key, ticket.cost, ticket.weight)

    def _dispatch(self) -> list[Ticket]:
        """Fill the free slots from the queue (a loop, one ticket per slot)."""
        started: list[Ticket] = []
        while len(self._running) < self.max_concurrency:
            top = self._by_age.peek()
            if top is None:
                break
            cls = self._classes[top[0]]
            head = cls.backlogged.peek()
            assert head is not None, "a class with tickets waiting has a backlogged flow"
            flow = self._flows[(cls.priority, head[0])]
            rid, ticket = flow.queue.popitem(last=False)
            self._unqueue(rid, cls)
            self._start(ticket, flow, cls)
            if flow.queue:
                cls.backlogged.push(flow.key[1], (flow.vtime, 0.0))
            else:
                cls.backlogged.discard(flow.key[1])
            started.append(ticket)
        return started

    def _remove_queued(self, request_id: str) -> Ticket:
        """Take a queued ticket out without running it (cancel, expire, drain)."""
        flow = self._flows[self._where[request_id]]
        cls = self._classes[flow.key[0]]
        ticket = flow.queue.pop(request_id)
        self._unqueue(request_id, cls)
        if not flow.queue:
            cls.backlogged.discard(flow.key[1])
            self._forget_if_idle(flow)
        return ticket

    def _unqueue(self, request_id: str, cls: _Class) -> None:
        """Drop the bookkeeping of a ticket leaving the queue (not its flow's FIFO)."""
        del self._where[request_id]
        self._deadlines.discard(request_id)
        waiting = cls.waiting
        was_oldest = next(iter(waiting)) == request_id
        del waiting[request_id]
        if not was_oldest:
            return
        if waiting:
            self._by_age.push(
                cls.priority, self._age_key(cls.priority, next(iter(waiting.values())))
            )
        else:
            self._by_age.discard(cls.priority)

    def _forget_if_idle(self, flow: _Flow) -> None:
        if flow.queue or flow.running:
            return
        del self._flows[flow.key]
        self._spare_flow = flow  # empty: nothing queued, nothing running
        cls = self._classes[flow.key[0]]
        cls.flows -= 1
        if not cls.flows:
            del self._classes[cls.priority]
            # No flows, so nothing queued: only superseded heap entries may remain.
            cls.backlogged.clear()
            self._spare_class = cls


def scheduler_for(policy: BackendPolicy) -> Scheduler:
    """The queue a backend's policy asks for ("fair" or "fifo"), with its limits."""
    if policy.scheduler == "fifo":
        return FifoScheduler(
            policy.max_concurrency,
            policy.max_queue,
            rate_window=policy.rate_window,
            service_time=policy.service_time,
        )
    return FairQueue(
        policy.max_concurrency,
        policy.max_queue,
        aging_seconds=policy.aging_seconds,
        rate_window=policy.rate_window,
        service_time=policy.service_time,
    )
