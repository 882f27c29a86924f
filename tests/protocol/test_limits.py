"""The rate-limit math against a reference model in exact rational arithmetic."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

from ostiary.protocol.buckets import MAX_EXACT, BucketSpec, ConcurrencyLimit, Limit, Unit, to_ms
from ostiary.protocol.limits import Hold, MemoryLimitStore


def ceil(x: Fraction) -> int:
    return -((-x.numerator) // x.denominator)


class ReferenceBucket:
    """A bucket as the design states it: a level refilled at capacity/window."""

    def __init__(self, capacity: int, window_ms: int) -> None:
        self.capacity = capacity
        self.rate = Fraction(capacity, window_ms)
        self.level = Fraction(capacity)
        self.stamp = 0

    def at(self, now: int) -> Fraction:
        if now > self.stamp:
            self.level = min(Fraction(self.capacity), self.level + (now - self.stamp) * self.rate)
            self.stamp = now
        return self.level

    def wait(self, cost: int) -> int:
        return ceil((cost - self.level) / self.rate) if cost > self.level else 0

    def remaining(self) -> int:
        return max(0, self.level.numerator // self.level.denominator)

    def reset(self) -> int:
        return ceil((self.capacity - self.level) / self.rate)

    def settle(self, reserved: int, actual: int) -> None:
        if actual <= reserved:
            self.level = min(
                Fraction(self.capacity), self.level + min(reserved - actual, self.capacity)
            )
        else:
            self.level = max(
                -Fraction(self.capacity), self.level - min(actual - reserved, self.capacity)
            )


LIMITS = st.lists(
    st.tuples(st.integers(1, 12), st.integers(1, 5000), st.sampled_from(Unit)),
    min_size=1,
    max_size=4,
)


class LimitsMachine(RuleBasedStateMachine):
    holds = Bundle("holds")

    @initialize(shapes=LIMITS, slot_limits=st.lists(st.integers(1, 4), max_size=2))
    def setup(self, shapes: list[tuple[int, int, Unit]], slot_limits: list[int]) -> None:
        self.store = MemoryLimitStore(max_buckets=1000)
        self.limits = [
            Limit(f"layer{i % 2}", f"d{i}", BucketSpec(c, w), u)
            for i, (c, w, u) in enumerate(shapes)
        ]
        self.ref = [ReferenceBucket(c, w) for c, w, _ in shapes]
        self.slots = [ConcurrencyLimit(f"slot{j}", n) for j, n in enumerate(slot_limits)]
        self.in_use = [0] * len(self.slots)
        self.open: dict[int, tuple[Hold, list[int], list[int], int]] = {}
        self.now = 0
        self.admitted: list[list[int]] = [[] for _ in self.limits]

    @rule(dt=st.one_of(st.integers(0, 50), st.integers(0, 20_000)))
    def advance(self, dt: int) -> None:
        self.now += dt

    @rule(
        target=holds,
        picks=st.lists(st.integers(0, 3), min_size=1, max_size=4, unique=True),
        slot_picks=st.lists(st.integers(0, 1), max_size=2, unique=True),
        tokens=st.integers(0, 14),
    )
    def admit(self, picks: list[int], slot_picks: list[int], tokens: int) -> int:
        idx = sorted({p % len(self.limits) for p in picks})
        sidx = sorted({p % len(self.slots) for p in slot_picks}) if self.slots else []
        charges = [
            (self.limits[i], tokens if self.limits[i].unit is Unit.TOKENS else 1) for i in idx
        ]
        decision = self.store.admit(charges, [self.slots[j] for j in sidx], self.now / 1000)
        refs = [self.ref[i] for i in idx]
        levels = [r.at(self.now) for r in refs]
        costs = [cost for _, cost in charges]
        fits = all(lv >= c for lv, c in zip(levels, costs, strict=True))
        free = all(self.in_use[j] < self.slots[j].limit for j in sidx)
        assert decision.allowed == (fits and free)
        if decision.allowed:
            for r, c in zip(refs, costs, strict=True):
                r.level -= c
            for j in sidx:
                self.in_use[j] += 1
            for i in idx:
                self.admitted[i].append(self.now)
            assert decision.hold is not None
            self.open[decision.hold.id] = (decision.hold, idx, sidx, tokens)
        else:
            refusal = decision.refusal
            assert refusal is not None
            never = [k for k, (r, c) in enumerate(zip(refs, costs, strict=True)) if c > r.capacity]
            if never:
                assert (refusal.exhausted, refusal.never, refusal.retry_after_ms) == (
                    never[0],
                    True,
                    None,
                )
            elif not fits:
                waits = [r.wait(c) for r, c in zip(refs, costs, strict=True)]
                assert refusal.retry_after_ms == max(waits)
                assert refusal.exhausted == waits.index(max(waits))
                assert refusal.retry_after == ceil(Fraction(max(waits), 1000))
                assert not refusal.never
            else:
                full = [k for k, j in enumerate(sidx) if self.in_use[j] >= self.slots[j].limit]
                assert (refusal.full_slot, refusal.retry_after_ms) == (full[0], None)
        for k, r in enumerate(refs):
            assert decision.limit(k) == r.capacity
            assert decision.remaining(k) == r.remaining()
            assert decision.reset_ms(k) == r.reset()
        return decision.hold.id if decision.hold is not None else -1

    def _end(self, hold_id: int, actual: int | None) -> None:
        if hold_id not in self.open:
            return
        hold, idx, sidx, reserved = self.open.pop(hold_id)
        for i in idx:
            self.ref[i].at(self.now)
            if self.limits[i].unit is Unit.TOKENS:
                self.ref[i].settle(reserved, actual or 0)
        for j in sidx:
            self.in_use[j] -= 1
        if actual is None:
            assert self.store.refund(hold, self.now / 1000)
            assert not self.store.refund(hold, self.now / 1000)
        else:
            assert self.store.settle(hold, actual, self.now / 1000)
            assert not self.store.settle(hold, actual, self.now / 1000)

    @rule(hold_id=consumes(holds), actual=st.integers(0, 30))
    def settle(self, hold_id: int, actual: int) -> None:
        self._end(hold_id, actual)

    @rule(hold_id=consumes(holds))
    def refund(self, hold_id: int) -> None:
        self._end(hold_id, None)

    @invariant()
    def concurrency_matches(self) -> None:
        for j, slot in enumerate(self.slots):
            assert self.store.in_flight(slot.layer) == self.in_use[j] <= slot.limit

    @invariant()
    def figures_match(self) -> None:
        for limit, r in zip(self.limits, self.ref, strict=True):
            deficit = self.store.deficit(limit, self.now / 1000)
            assert Fraction(limit.spec.full - deficit, limit.spec.per_token) == r.at(self.now)

    @invariant()
    def request_buckets_conform(self) -> None:
        """Over any span, a request bucket admits at most its capacity plus the refill."""
        for limit, times in zip(self.limits, self.admitted, strict=True):
            if limit.unit is not Unit.REQUESTS or not times:
                continue
            cap, window = limit.spec.capacity, limit.spec.window_ms
            t = times[-1]
            for start in range(len(times)):
                span = t - times[start]
                assert len(times) - start <= cap + Fraction(cap * span, window)

    @precondition(lambda self: hasattr(self, "store"))
    @rule()
    def end_everything(self) -> None:
        for hold_id in list(self.open):
            self._end(hold_id, 1)
        assert self.store.open_holds == 0
        for slot in self.slots:
            assert self.store.in_flight(slot.layer) == 0

    def teardown(self) -> None:
        if hasattr(self, "store"):
            self.end_everything()


TestLimitsMachine = LimitsMachine.TestCase
TestLimitsMachine.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)


def test_a_burst_of_the_limit_then_one_per_refill() -> None:
    store = MemoryLimitStore()
    rpm = Limit("principal:key:a", "rpm", BucketSpec.per(50, 60), Unit.REQUESTS)
    assert all(store.admit([(rpm, 1)], [], 10.0).allowed for _ in range(50))
    refused = store.admit([(rpm, 1)], [], 10.0)
    assert refused.refusal is not None
    assert (refused.refusal.retry_after_ms, refused.refusal.retry_after) == (1200, 2)
    assert (refused.remaining(0), refused.reset_ms(0)) == (0, 60_000)
    assert not store.admit([(rpm, 1)], [], 11.199).allowed
    assert store.admit([(rpm, 1)], [], 11.2).allowed


def test_a_reservation_over_the_capacity_can_never_pass_while_small_ones_do() -> None:
    store = MemoryLimitStore()
    tpm = Limit("principal:key:a", "tpm", BucketSpec.per(100, 60), Unit.TOKENS)
    big = store.admit([(tpm, 101)], [], 0.0)
    assert big.refusal is not None and big.refusal.never and big.refusal.retry_after is None
    assert store.admit([(tpm, 100)], [], 0.0).allowed


def test_usage_over_the_reservation_is_a_debt_of_at_most_one_window() -> None:
    store = MemoryLimitStore()
    tpm = Limit("p", "tpm", BucketSpec.per(600, 60), Unit.TOKENS)
    first = store.admit([(tpm, 300)], [], 0.0)
    second = store.admit([(tpm, 300)], [], 0.0)
    assert first.hold is not None and second.hold is not None
    assert store.settle(first.hold, 10_000, 0.0)
    assert store.deficit(tpm, 0.0) == 2 * tpm.spec.full
    assert store.settle(second.hold, 10_000, 0.0)
    assert store.deficit(tpm, 0.0) == 2 * tpm.spec.full
    refused = store.admit([(tpm, 1)], [], 0.0)
    assert refused.refusal is not None and refused.refusal.retry_after_ms == 60_100
    assert store.admit([(tpm, 1)], [], 60.1).allowed


def test_a_concurrency_refusal_names_the_slot_and_no_time() -> None:
    store = MemoryLimitStore()
    rpm = Limit("p", "rpm", BucketSpec.per(10, 60), Unit.REQUESTS)
    slot = ConcurrencyLimit("p", 1)
    first = store.admit([(rpm, 1)], [slot], 0.0)
    second = store.admit([(rpm, 1)], [slot], 0.0)
    assert second.refusal is not None
    assert (second.refusal.full_slot, second.refusal.retry_after_ms) == (0, None)
    assert second.remaining(0) == 9  # refused: nothing was debited
    assert first.hold is not None and store.refund(first.hold, 1.0)
    assert store.admit([(rpm, 1)], [slot], 1.0).allowed


def test_a_spec_too_fine_to_count_exactly_is_refused() -> None:
    with pytest.raises(ValueError, match="exactly"):
        BucketSpec(MAX_EXACT // 1000 + 1, 86_400_001)
    assert BucketSpec.per(10**9, 86_400).full < MAX_EXACT // 4


@given(st.floats(0, 1e9, allow_nan=False))
def test_milliseconds_round_trip(now: float) -> None:
    ms = to_ms(now)
    assert to_ms(ms / 1000) == ms
    assert abs(ms - now * 1000) <= 0.5 + 1e-6 * now


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 400), st.integers(0, 3000)), min_size=1, max_size=300),
    st.integers(8, 64),
)
def test_eviction_keeps_memory_bounded_and_only_ever_admits_more(
    arrivals: list[tuple[int, int]], cap: int
) -> None:
    """Forgetting a bucket treats it as full: never stricter than exact counting."""
    bounded = MemoryLimitStore(max_buckets=cap)
    exact = MemoryLimitStore()
    spec = BucketSpec.per(2, 60)
    now = 0
    for key, dt in arrivals:
        now += dt
        limit = Limit(f"ip:{key}", "rpm", spec, Unit.REQUESTS)
        want = exact.admit([(limit, 1)], [], now / 1000).allowed
        got = bounded.admit([(limit, 1)], [], now / 1000).allowed
        assert got or not want
        assert bounded.tracked <= cap


def test_full_buckets_are_dropped_so_a_quiet_store_forgets_them_exactly() -> None:
    store = MemoryLimitStore(max_buckets=4096)
    spec = BucketSpec.per(5, 1)
    for i in range(3000):
        store.admit([(Limit(f"ip:{i}", "rps", spec, Unit.REQUESTS), 1)], [], i / 1000)
    # Every bucket refills in 200 ms, so at most the last 200 are not full.
    assert store.tracked <= 2048
    late = Limit("ip:2999", "rps", spec, Unit.REQUESTS)
    assert store.deficit(late, 2.999) == spec.per_token
