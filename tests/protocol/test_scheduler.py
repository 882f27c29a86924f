"""The Scheduler contract, checked on every implementation by one state machine:
capacity and slots never exceeded, no slot idle while a ticket waits, every request
leaves exactly once, deadlines and retry-after estimates consistent with the state."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from ostiary.protocol.fair_queue import FairQueue
from ostiary.protocol.scheduler import (
    FifoScheduler,
    Scheduler,
    ServiceRate,
    Submitted,
    Ticket,
)

PRINCIPALS = ("a", "b", "c", "d")
QUEUED, RUNNING, ENDED = "queued", "running", "ended"


class SchedulerContract(RuleBasedStateMachine):
    """A model of which request is where, against any Scheduler."""

    make: Callable[[int, int], Scheduler]

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.status: dict[str, str] = {}
        self.tickets: dict[str, Ticket] = {}
        self.weights: dict[str, float] = {}
        self.priorities: dict[str, int] = {}
        self.max_cost = 0.0
        self.serial = 0

    @initialize(
        max_concurrency=st.integers(1, 4),
        max_queue=st.integers(0, 10),
        weights=st.lists(st.sampled_from([0.5, 1.0, 2.0, 3.0]), min_size=4, max_size=4),
        priorities=st.lists(st.integers(0, 2), min_size=4, max_size=4),
    )
    def setup(
        self, max_concurrency: int, max_queue: int, weights: list[float], priorities: list[int]
    ) -> None:
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.s = type(self).make(max_concurrency, max_queue)
        self.weights = dict(zip(PRINCIPALS, weights, strict=True))
        self.priorities = dict(zip(PRINCIPALS, priorities, strict=True))

    def ids(self, state: str) -> list[str]:
        return sorted(rid for rid, s in self.status.items() if s == state)

    def dispatched(self, started: list[Ticket]) -> None:
        for ticket in started:
            assert self.status[ticket.request_id] == QUEUED
            self.status[ticket.request_id] = RUNNING

    def admit(self, rid: str, principal: str, cost: float, patience: float) -> None:
        ticket = Ticket(
            rid,
            principal,
            cost,
            self.weights[principal],
            self.priorities[principal],
            self.now + patience,
        )
        queued, running = self.s.queued, self.s.running
        result = self.s.submit(ticket, self.now)
        if result is Submitted.RUNNING:
            assert running < self.max_concurrency and queued == 0
            self.status[rid] = RUNNING
        elif result is Submitted.QUEUED:
            assert running == self.max_concurrency and queued < self.max_queue
            self.status[rid] = QUEUED
        else:
            assert running == self.max_concurrency and queued == self.max_queue
            return
        self.tickets[rid] = ticket
        self.max_cost = max(self.max_cost, cost)

    @rule(
        principal=st.sampled_from(PRINCIPALS),
        cost=st.integers(0, 50).map(float),
        patience=st.one_of(st.just(math.inf), st.floats(0.0, 5.0)),
    )
    def submit(self, principal: str, cost: float, patience: float) -> None:
        self.serial += 1
        self.admit(f"r{self.serial}", principal, cost, patience)

    @precondition(lambda self: self.ids(ENDED))
    @rule(data=st.data(), principal=st.sampled_from(PRINCIPALS))
    def resubmit(self, data: st.DataObject, principal: str) -> None:
        """Ids may come back once their request has left (stale entries must not
        hit the new one)."""
        rid = data.draw(st.sampled_from(self.ids(ENDED)))
        self.admit(rid, principal, 1.0, data.draw(st.floats(0.0, 5.0)))

    @precondition(lambda self: self.ids(QUEUED) or self.ids(RUNNING))
    @rule(data=st.data())
    def submit_twice(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(self.ids(QUEUED) + self.ids(RUNNING)))
        with pytest.raises(ValueError, match="already scheduled"):
            self.s.submit(Ticket(rid), self.now)

    def end(self, rid: str) -> None:
        queued = self.s.queued
        self.status[rid] = ENDED
        started = self.s.release(rid, self.now)
        assert len(started) == min(1, queued)
        self.dispatched(started)

    @precondition(lambda self: self.ids(RUNNING))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        self.end(data.draw(st.sampled_from(self.ids(RUNNING))))

    @precondition(lambda self: self.ids(RUNNING))
    @rule(data=st.data())
    def fail(self, data: st.DataObject) -> None:
        """A failed request is charged what it really used (often nothing)."""
        rid = data.draw(st.sampled_from(self.ids(RUNNING)))
        assert self.s.charge(rid, 0.0)
        self.end(rid)

    @rule(data=st.data(), actual=st.integers(0, 50).map(float))
    def charge(self, data: st.DataObject, actual: float) -> None:
        rid = data.draw(st.sampled_from([*sorted(self.status), "nobody"]))
        known = self.status.get(rid) in (QUEUED, RUNNING)
        assert self.s.charge(rid, actual) is known
        if known:
            self.max_cost = max(self.max_cost, actual)

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from([*sorted(self.status), "nobody"]))
        queued = self.status.get(rid) == QUEUED
        assert self.s.cancel(rid) is queued
        if queued:
            self.status[rid] = ENDED

    @rule(dt=st.sampled_from([0.0, 0.25, 1.0, 3.0]))
    def tick(self, dt: float) -> None:
        self.now += dt
        for ticket in self.s.expire(self.now):
            assert self.status[ticket.request_id] == QUEUED
            assert ticket.deadline <= self.now
            self.status[ticket.request_id] = ENDED
        assert self.s.next_deadline() > self.now

    @rule()
    def drain(self) -> None:
        drained = self.s.drain()
        assert sorted(t.request_id for t in drained) == self.ids(QUEUED)
        for ticket in drained:
            self.status[ticket.request_id] = ENDED

    @rule()
    def release_unknown(self) -> None:
        with pytest.raises(KeyError):
            self.s.release("nobody", self.now)

    @invariant()
    def counts_agree(self) -> None:
        if not hasattr(self, "s"):
            return
        running, queued = self.ids(RUNNING), self.ids(QUEUED)
        assert self.s.running == len(running) <= self.max_concurrency
        assert all(self.s.is_running(rid) for rid in running)
        assert not any(self.s.is_running(rid) for rid in queued)
        assert self.s.queued == len(queued) <= self.max_queue
        if self.s.running < self.max_concurrency:
            assert self.s.queued == 0
        deadlines = [self.tickets[rid].deadline for rid in queued]
        assert self.s.next_deadline() == min(deadlines, default=math.inf)
        wait = self.s.estimate_wait(self.now)
        assert math.isfinite(wait)
        assert (wait == 0.0) is (self.s.running < self.max_concurrency)

    @invariant()
    def snapshot_counts_each_principal(self) -> None:
        if not hasattr(self, "s"):
            return
        expected: dict[str, list[int]] = {}
        for rid, state in self.status.items():
            if state in (QUEUED, RUNNING):
                counts = expected.setdefault(self.tickets[rid].principal, [0, 0])
                counts[0 if state == QUEUED else 1] += 1
        snap = self.s.snapshot(self.now)
        assert snap.principals == tuple((p, q, r) for p, (q, r) in sorted(expected.items()))
        assert (snap.queued, snap.running) == (self.s.queued, self.s.running)
        assert snap.service_rate > 0
        assert snap.estimated_wait == self.s.estimate_wait(self.now)

    def teardown(self) -> None:
        if not hasattr(self, "s"):
            return
        for ticket in self.s.drain():
            self.status[ticket.request_id] = ENDED
        for rid in self.ids(RUNNING):
            assert self.s.release(rid, self.now) == []
            self.status[rid] = ENDED
        assert self.s.running == self.s.queued == 0
        assert set(self.status.values()) <= {ENDED}


# FairQueue runs this machine, with its own invariants added, in test_fair_queue.py.
class FifoContract(SchedulerContract):
    make = FifoScheduler


TestFifoContract = FifoContract.TestCase
TestFifoContract.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)


@pytest.mark.parametrize("make", [FifoScheduler, FairQueue])
def test_fifo_order_and_fair_queue_agree_with_one_principal(make: Callable[..., Scheduler]) -> None:
    """With one principal and one class, fair queueing is FIFO."""
    s = make(1, 10)
    assert s.submit(Ticket("r0", cost=5), 0.0) is Submitted.RUNNING
    for n in range(1, 6):
        assert s.submit(Ticket(f"r{n}", cost=n), 0.0) is Submitted.QUEUED
    order = []
    running = "r0"
    while True:
        started = s.release(running, 1.0)
        if not started:
            break
        running = started[0].request_id
        order.append(running)
    assert order == ["r1", "r2", "r3", "r4", "r5"]


@pytest.mark.parametrize("make", [FifoScheduler, FairQueue])
@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_charge_validates_cost(make: Callable[..., Scheduler], bad: float) -> None:
    s = make(1, 1)
    s.submit(Ticket("r"), 0.0)
    with pytest.raises(ValueError, match="cost"):
        s.charge("r", bad)
    with pytest.raises(ValueError, match="cost"):
        s.charge("nobody", bad)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("cost", -1.0),
        ("cost", math.nan),
        ("weight", 0.0),
        ("weight", math.inf),
        ("deadline", math.nan),
    ],
)
def test_ticket_validates_its_numbers(field: str, value: float) -> None:
    fields: dict[str, Any] = {field: value}
    with pytest.raises(ValueError, match=field):
        Ticket("r", **fields)


@pytest.mark.parametrize("make", [FifoScheduler, FairQueue])
def test_bad_capacity_is_refused(make: Callable[..., Scheduler]) -> None:
    with pytest.raises(ValueError, match="max_concurrency"):
        make(0, 1)
    with pytest.raises(ValueError, match="max_queue"):
        make(1, -1)


def test_service_rate_starts_at_the_prior_and_learns_the_measured_rate() -> None:
    rate = ServiceRate(window=10.0, prior_rate=2.0)
    assert rate.rate(0.0) == pytest.approx(2.0)
    rate.observe(0.0)
    for n in range(1, 301):  # one release every 0.25 s: 4 per second
        rate.release(n * 0.25)
    assert rate.rate(75.0) == pytest.approx(4.0, rel=0.05)
    # Nine queued, one slot busy: ten releases ahead, at 4/s.
    assert rate.estimate_wait(75.0, queued=9, running=1, slots=1) == pytest.approx(2.5, rel=0.05)
    assert rate.estimate_wait(75.0, queued=0, running=0, slots=1) == 0.0


@pytest.mark.parametrize(("window", "prior"), [(0.0, 1.0), (1.0, 0.0), (math.inf, 1.0)])
def test_service_rate_refuses_bad_settings(window: float, prior: float) -> None:
    with pytest.raises(ValueError, match="window"):
        ServiceRate(window, prior)


def test_service_rate_decays_when_the_backend_stops_finishing() -> None:
    rate = ServiceRate(window=10.0, prior_rate=1.0)
    rate.observe(0.0)
    for n in range(1, 101):
        rate.release(n * 0.1)
    waits = [rate.estimate_wait(10.0 + t, queued=4, running=1, slots=1) for t in (0, 10, 30, 60)]
    assert waits == sorted(waits)
    assert waits[-1] > 20 * waits[0]


@pytest.mark.parametrize("make", [FifoScheduler, FairQueue])
def test_estimate_wait_follows_depth_and_rate(make: Callable[..., Scheduler]) -> None:
    """The retry-after of a full queue: more queued or slower service, longer wait;
    both schedulers quote the same figure for the same history."""
    s = make(2, 50, rate_window=20.0, service_time=1.0)
    assert s.estimate_wait(0.0) == 0.0
    s.submit(Ticket("a"), 0.0)
    s.submit(Ticket("b"), 0.0)
    for n in range(20):
        s.submit(Ticket(f"q{n}"), 0.0)
    # No release yet: the prior (two slots, one second each) rules.
    assert s.estimate_wait(0.0) == pytest.approx(21 / 2.0)
    running = ["a", "b"]
    for n in range(40):  # one release per 0.1 s: 10 per second
        started = s.release(running.pop(0), 0.1 * (n + 1))
        running += [t.request_id for t in started]
        s.submit(Ticket(f"more{n}"), 0.1 * (n + 1))
    fast = s.estimate_wait(4.0)
    assert fast == pytest.approx(21 / 10.0, rel=0.3)
    assert s.estimate_wait(30.0) > 3 * fast


def test_both_schedulers_quote_the_same_wait_for_the_same_history() -> None:
    fifo, fair = FifoScheduler(1, 10), FairQueue(1, 10)
    for s in (fifo, fair):
        s.submit(Ticket("r0"), 0.0)
        for n in range(1, 8):
            s.submit(Ticket(f"r{n}"), 0.5 * n)
        for n in range(5):
            s.release(f"r{n}", 1.0 + 0.7 * n)
    assert fifo.estimate_wait(6.0) == fair.estimate_wait(6.0) > 0
