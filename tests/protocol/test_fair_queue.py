"""FairQueue: its internal state under random use, and the bounds its docstring
promises — weighted shares, latency behind a heavy tenant, aging of low classes."""

from __future__ import annotations

import math
from collections import deque

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings
from hypothesis.stateful import invariant

from ostiary.protocol.fair_queue import FairQueue
from ostiary.protocol.scheduler import FifoScheduler, Scheduler, Submitted, Ticket
from tests.protocol.test_scheduler import QUEUED, RUNNING, SchedulerContract

EPS = 1e-9


class FairQueueInternals(SchedulerContract):
    """The contract machine, plus FairQueue's own invariants after every step."""

    make = FairQueue

    @invariant()
    def internal_state_is_consistent(self) -> None:
        if not hasattr(self, "s"):
            return
        q = self.s
        assert isinstance(q, FairQueue)
        queued, running = self.ids(QUEUED), self.ids(RUNNING)
        assert sorted(q._where) == queued
        assert sorted(q._running) == running
        # Flows exist exactly while they hold something; memory follows the load.
        assert len(q._flows) <= len(queued) + len(running)
        for key, flow in q._flows.items():
            assert flow.queue or flow.running
            assert all(q._where[rid] == key for rid in flow.queue)
            assert flow.running == sum(r.flow == key for r in q._running.values())
        assert sum(len(f.queue) for f in q._flows.values()) == len(queued)
        assert sorted(q._classes) == sorted({p for p, _ in q._flows})
        for priority, cls in q._classes.items():
            flows = {k[1]: f for k, f in q._flows.items() if k[0] == priority}
            assert cls.flows == len(flows)
            backlogged = {name for name, f in flows.items() if f.queue}
            assert len(cls.backlogged) == len(backlogged)
            assert cls.backlogged.entries <= 2 * len(backlogged) + 16
            assert sorted(cls.waiting) == sorted(
                rid for rid in queued if self.tickets[rid].priority == priority
            )
            times = list(cls.waiting.values())
            assert times == sorted(times)
            if times:
                assert q._by_age.key_of(priority) == q._age_key(priority, times[0])
            else:
                assert priority not in q._by_age
            for name in backlogged:
                flow = flows[name]
                assert cls.backlogged.key_of(name) == (flow.vtime, 0.0)
                # The counter bound of the docstring, with corrections.
                weight = self.weights[name]
                bound = (1 + self.max_concurrency) * self.max_cost / weight
                slack = self.max_concurrency * self.max_cost / weight
                assert cls.vtime - slack - EPS <= flow.vtime <= cls.vtime + bound + EPS
        assert len(q._by_age) == len({self.tickets[rid].priority for rid in queued})
        finite = [rid for rid in queued if self.tickets[rid].deadline < math.inf]
        assert len(q._deadlines) == len(finite)
        assert q._deadlines.entries <= 2 * len(finite) + 16


TestFairQueueInternals = FairQueueInternals.TestCase
TestFairQueueInternals.settings = settings(max_examples=150, stateful_step_count=80, deadline=None)


class Backend:
    """A driver for the bound tests: slots finish in the order they started, one
    per step, and every dispatched ticket is recorded."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.s = scheduler
        self.running: deque[str] = deque()
        self.order: list[Ticket] = []
        self.now = 0.0
        self.serial = 0

    def submit(
        self, principal: str, cost: float = 1.0, weight: float = 1.0, priority: int = 0
    ) -> str:
        self.serial += 1
        rid = f"{principal}{self.serial}"
        result = self.s.submit(Ticket(rid, principal, cost, weight, priority), self.now)
        assert result is not Submitted.FULL
        if result is Submitted.RUNNING:
            self.running.append(rid)
            self.order.append(Ticket(rid, principal, cost, weight, priority))
        return rid

    def step(self, dt: float = 1.0) -> list[Ticket]:
        self.now += dt
        started = self.s.release(self.running.popleft(), self.now)
        self.running.extend(t.request_id for t in started)
        self.order.extend(started)
        return started


def occupy(backend: Backend, slots: int) -> None:
    """Fill every slot with a filler so that what follows starts queued."""
    for _ in range(slots):
        backend.submit("filler")


@settings(max_examples=60, deadline=None)
@given(
    costs=st.lists(st.integers(1, 10).map(float), min_size=50, max_size=50),
    slots=st.integers(1, 4),
)
def test_weights_one_and_three_are_served_one_to_three_within_the_bound(
    costs: list[float], slots: int
) -> None:
    """Both tenants backlogged throughout: for every interval,
    |S_a/1 - S_b/3| <= C/1 + C/3; over the run the ratio tends to 1:3."""
    c_max = max(costs)
    backend = Backend(FairQueue(slots, 1000))
    occupy(backend, slots)
    pending = {"a": 0, "b": 0}
    weights = {"a": 1.0, "b": 3.0}
    for n in range(100):
        for name in "ab":
            backend.submit(name, costs[n % len(costs)], weights[name])
            pending[name] += 1
    served = {"a": 0.0, "b": 0.0}
    gaps = [0.0]
    for n in range(1500):
        for ticket in backend.step():
            if ticket.principal == "filler":
                continue
            served[ticket.principal] += ticket.cost
            gaps.append(served["a"] / 1.0 - served["b"] / 3.0)
            # Keep both backlogged: every tenant's ticket served is replaced.
            backend.submit(ticket.principal, costs[(n * 7) % len(costs)], weights[ticket.principal])
    assert max(gaps) - min(gaps) <= c_max / 1.0 + c_max / 3.0 + EPS
    assert served["b"] / served["a"] == pytest.approx(3.0, rel=0.02)


@settings(max_examples=60, deadline=None)
@given(
    weights=st.lists(st.sampled_from([0.5, 1.0, 2.0, 3.0, 5.0]), min_size=2, max_size=5),
    costs=st.lists(st.integers(0, 20).map(float), min_size=10, max_size=40),
    slots=st.integers(1, 3),
)
def test_no_backlogged_principal_waits_longer_than_the_latency_bound(
    weights: list[float], costs: list[float], slots: int
) -> None:
    """From the moment a ticket heads its flow until it runs, every other flow j
    is dispatched at most C * (1 + w_j / w_i) of cost."""
    c_max = max(costs)
    names = [f"p{i}" for i in range(len(weights))]
    weight = dict(zip(names, weights, strict=True))
    backend = Backend(FairQueue(slots, 1000))
    occupy(backend, slots)
    draws = iter(costs * 1000)
    for depth, name in enumerate(names, 1):
        for _ in range(depth):  # different depths; each flow stays backlogged
            backend.submit(name, next(draws), weight[name])
    ahead = {i: dict.fromkeys(names, 0.0) for i in names}
    for _ in range(400):
        for ticket in backend.step():
            i = ticket.principal
            if i == "filler":
                continue
            for j, cost in ahead[i].items():
                assert cost <= c_max * (1 + weight[j] / weight[i]) + EPS, (i, j)
            ahead[i] = dict.fromkeys(names, 0.0)
            for other in names:
                if other != i:
                    ahead[other][i] += ticket.cost
            backend.submit(i, next(draws), weight[i])


def waits_of_a_light_tenant(scheduler: Scheduler) -> list[int]:
    """Two slots; tenant A keeps 100 requests queued, tenant B sends one request at
    a time. For each of B's requests: how many of A's ran before it did."""
    backend = Backend(scheduler)
    occupy(backend, 2)
    for _ in range(100):
        backend.submit("a")
    waits: list[int] = []
    b_waiting: str | None = None
    a_since = 0
    for _ in range(600):
        if b_waiting is None and not any(r.startswith("b") for r in backend.running):
            b_waiting = backend.submit("b")
            a_since = 0
        for ticket in backend.step():
            if ticket.principal == "a":
                a_since += 1
                backend.submit("a")
            elif ticket.request_id == b_waiting:
                waits.append(a_since)
                b_waiting = None
    return waits


def test_a_light_tenant_is_not_stuck_behind_a_heavy_one() -> None:
    fair = waits_of_a_light_tenant(FairQueue(2, 1000))
    fifo = waits_of_a_light_tenant(FifoScheduler(2, 1000))
    # Fair: B overtakes A's queue, waiting for at most C(1 + w_a/w_b) = 2 of A's.
    assert len(fair) > 100
    assert max(fair) <= 2
    # FIFO: every one of B's requests waits for the 100 of A's queued before it.
    assert len(fifo) >= 5
    assert min(fifo) >= 100


def test_a_returning_principal_starts_at_the_system_virtual_time() -> None:
    """A flow forgotten while idle comes back at V, not at zero: it gets its share,
    not the whole backend until its counter catches up."""
    q = FairQueue(1, 1000)
    backend = Backend(q)
    occupy(backend, 1)
    for _ in range(50):
        backend.submit("a", cost=10.0)
    for _ in range(40):
        backend.step()
        backend.submit("a", cost=10.0)
    assert q._classes[0].vtime >= 300  # a has been served a lot
    for _ in range(20):
        backend.submit("c", cost=10.0)
    served = [t.principal for _ in range(20) for t in backend.step()]
    assert 9 <= served.count("c") <= 11


def test_real_usage_corrects_the_estimate() -> None:
    """Tenant A's requests are estimated at 1 token but use 10; once charged, A
    gets a tenth of the dispatches B gets, so actual tokens split evenly."""
    backend = Backend(FairQueue(1, 1000))
    occupy(backend, 1)
    for _ in range(50):
        backend.submit("a", cost=1.0)
        backend.submit("b", cost=10.0)
    actual = {"a": 0.0, "b": 0.0}
    for _ in range(400):
        rid = backend.running[0]
        principal = rid.rstrip("0123456789")
        if principal in actual:
            assert backend.s.charge(rid, 10.0)
            actual[principal] += 10.0
        for ticket in backend.step():
            backend.submit(ticket.principal, ticket.cost)
    # Within (1 + R) * C per side of the counter bound, R = 1 slot, C = 10.
    assert abs(actual["a"] - actual["b"]) <= 2 * 2 * 10.0 + EPS


def test_a_refund_banks_no_credit() -> None:
    q = FairQueue(1, 10)
    assert q.submit(Ticket("a1", "a", cost=100.0), 0.0) is Submitted.RUNNING
    q.submit(Ticket("b1", "b", cost=1.0), 0.0)
    q.charge("a1", 0.0)
    assert q._flows[(0, "a")].vtime == q._classes[0].vtime
    assert q.charge("b1", 5.0)  # a queued ticket's estimate is replaced
    assert q.release("a1", 1.0) == [Ticket("b1", "b", cost=5.0)]
    assert q._flows[(0, "b")].vtime == pytest.approx(5.0)
    assert not q.charge("a1", 1.0)


def test_a_higher_class_is_served_first() -> None:
    backend = Backend(FairQueue(1, 100, aging_seconds=math.inf))
    occupy(backend, 1)
    for priority in (0, 2, 1, 0, 2, 1):
        backend.submit(f"p{priority}x", priority=priority)
    for _ in range(6):
        backend.step()
    assert [t.priority for t in backend.order[1:]] == [2, 2, 1, 1, 0, 0]


@pytest.mark.parametrize("depth", [1, 5, 20])
def test_aging_lets_a_low_class_through_under_sustained_high_load(depth: int) -> None:
    """One slot, one second per request; a high class (priority 1) keeps ``depth``
    tickets queued for ever. A priority-0 ticket enqueued at t0 waits while the
    high class holds tickets older than t0 + aging_seconds, and no longer: it runs
    by t0 + aging + depth + 1 seconds (the high tickets queued at t0 + aging, then
    itself). Without aging it never runs."""
    aging = 10.0
    for aging_seconds, runs in ((aging, True), (math.inf, False)):
        backend = Backend(FairQueue(1, 1000, aging_seconds=aging_seconds))
        occupy(backend, 1)
        for _ in range(depth):
            backend.submit("high", priority=1)
        for _ in range(5):
            backend.step()
            backend.submit("high", priority=1)
        t0 = backend.now
        low = backend.submit("low", priority=0)
        started_at = math.inf
        while backend.now < t0 + 20 * (aging + depth):
            for ticket in backend.step():
                if ticket.request_id == low:
                    started_at = backend.now
                else:
                    backend.submit("high", priority=1)
            if started_at < math.inf:
                break
        if runs:
            assert t0 + aging <= started_at <= t0 + aging + depth + 1
        else:
            assert started_at == math.inf


def test_cancel_expire_and_drain_forget_the_principals() -> None:
    q = FairQueue(1, 10)
    q.submit(Ticket("r", "x"), 0.0)
    q.submit(Ticket("a", "a", deadline=1.0), 0.0)
    q.submit(Ticket("b", "b", priority=3), 0.0)
    q.submit(Ticket("c", "c", priority=3), 0.0)
    assert q.cancel("b")
    assert not q.cancel("b")
    assert q.next_deadline() == 1.0
    assert [t.request_id for t in q.expire(1.0)] == ["a"]
    assert [t.request_id for t in q.drain()] == ["c"]
    assert q.release("r", 2.0) == []
    assert q._flows == {} and q._classes == {} and len(q._by_age) == 0


def test_bad_aging_is_refused() -> None:
    with pytest.raises(ValueError, match="aging_seconds"):
        FairQueue(1, 1, aging_seconds=0.0)
