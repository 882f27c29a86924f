"""The backends' slots, queues and call timers, as the gateway uses them.

:class:`Backends` keeps, per backend, its policy, its scheduler (the queue in front of
its ``max_concurrency`` slots) and a window of recent queue waits, plus one heap of
the deadlines of running calls. It decides nothing about responses: it hands the
gateway the exchanges that may run now, that waited too long, or whose calls timed
out, and the gateway answers them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

from .actions import Action, Count, Dispatch
from .exchange import BackendPolicy, Exchange, ExchangeState
from .scheduler import Scheduler, Submitted, Ticket
from .timers import CallTimers
from .visibility import WaitWindow

__all__ = ["Backends"]


class Backends:
    __slots__ = ("_live", "policies", "schedulers", "timers", "waits")

    def __init__(
        self,
        policies: Mapping[str, BackendPolicy],
        make: Callable[[BackendPolicy], Scheduler],
        live: dict[str, Exchange],
    ) -> None:
        self.policies = policies
        self.schedulers: dict[str, Scheduler] = {n: make(p) for n, p in policies.items()}
        #: Recent queue waits per backend, for ``/v1/queue``.
        self.waits = {name: WaitWindow() for name in policies}
        self.timers = CallTimers()
        #: The gateway's exchanges by request id (shared, never copied).
        self._live = live

    def next_deadline(self, soonest: float) -> float:
        """The sooner of ``soonest`` and any queue's or running call's deadline."""
        deadline = self.timers.next_deadline()
        soonest = min(soonest, deadline)
        for scheduler in self.schedulers.values():
            deadline = scheduler.next_deadline()
            soonest = min(soonest, deadline)
        return soonest

    def submit(self, exchange: Exchange, backend: str, now: float) -> Submitted:
        """Ask for a slot; a queued exchange leaves after its policy's wait."""
        policy = self.policies[backend]
        exchange.policy = policy
        principal = exchange.principal
        if principal is None:
            ticket = Ticket(
                exchange.request_id, cost=exchange.cost, deadline=now + policy.max_queue_wait
            )
        else:
            role = principal.role
            wait = role.max_queue_wait if role.max_queue_wait is not None else policy.max_queue_wait
            ticket = Ticket(
                exchange.request_id,
                principal=principal.id,
                cost=exchange.cost,
                weight=role.weight,
                priority=role.priority,
                deadline=now + wait,
            )
        outcome = self.schedulers[backend].submit(ticket, now)
        if outcome is Submitted.QUEUED:
            exchange.state = ExchangeState.QUEUED
        return outcome

    def dispatch(self, exchange: Exchange, now: float) -> Dispatch:
        exchange.state = ExchangeState.RUNNING
        exchange.dispatched = now
        policy = exchange.policy
        call = exchange.call
        assert policy is not None and call is not None
        self.waits[policy.name].add(now, now - exchange.started)
        # No deadline of this call can come sooner than this (the stall deadline
        # counts from output that comes after dispatch): one timer entry per call.
        live = self._live
        self.timers.push(now + policy.earliest_timeout, exchange.request_id, live, len(live))
        return Dispatch(exchange.request_id, policy.name, call)

    def release(self, exchange: Exchange, now: float) -> list[Action]:
        """Free the exchange's slot; dispatch whoever is next (in this same call)."""
        policy = exchange.policy
        assert policy is not None
        actions: list[Action] = []
        scheduler = self.schedulers[policy.name]
        usage = exchange.usage
        if usage is not None:
            # The real cost replaces the estimate in the fair queue's accounts.
            scheduler.charge(exchange.request_id, usage.total_tokens)
        for ticket in scheduler.release(exchange.request_id, now):
            waiting = self._live[ticket.request_id]
            actions.append(self.dispatch(waiting, now))
            labels = (("backend", policy.name),)
            actions.append(Count("ostiary_queue_wait_seconds", labels, now - waiting.started))
        return actions

    def cancel(self, exchange: Exchange) -> None:
        """A queued exchange's client left."""
        assert exchange.policy is not None
        self.schedulers[exchange.policy.name].cancel(exchange.request_id)

    def expired(self, now: float) -> Iterator[tuple[Exchange, float]]:
        """Queued exchanges past their wait, each with the wait a client should be
        told to expect before retrying."""
        for scheduler in self.schedulers.values():
            if scheduler.next_deadline() > now:
                continue
            for ticket in scheduler.expire(now):
                yield self._live[ticket.request_id], scheduler.estimate_wait(now)

    def timed_out(self, now: float) -> list[Exchange]:
        """Running exchanges whose call has passed a deadline at ``now``."""
        live = self._live
        out: list[Exchange] = []
        for request_id in list(self.timers.due(now)):
            timed = live.get(request_id)
            if timed is None or not timed.running:
                continue
            deadline = timed.deadline()
            if deadline > now:
                self.timers.push(deadline, request_id, live, len(live))
            else:
                out.append(timed)
        return out

    def drain(self) -> Iterable[Exchange]:
        """Every queued exchange, taken out of its queue (shutdown)."""
        for scheduler in self.schedulers.values():
            for ticket in scheduler.drain():
                yield self._live[ticket.request_id]
