"""The memory store's planned fast path (``take`` and a planned hold's ``settle``)
against its general ``admit``/``settle``: on the same random sequences, the same
decisions, the same deficits and ``x-ratelimit-*`` headers, and the same table of
buckets and slots, in the same order (sweeping and eviction included)."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
)

from ostiary.protocol.buckets import BucketSpec, ConcurrencyLimit, Limit, Unit
from ostiary.protocol.guard import Guard, rate_headers
from ostiary.protocol.limits import Decision, Hold, MemoryLimitStore, Plan

NAMES = {(Unit.REQUESTS, 60_000): "rpm", (Unit.TOKENS, 60_000): "tpm"}

LIMIT = st.builds(
    lambda layer, unit, capacity, window: Limit(
        f"layer{layer}",
        NAMES.get((unit, window), f"{unit.value}/{window}"),
        BucketSpec(capacity, window),
        unit,
    ),
    st.integers(0, 3),
    st.sampled_from(Unit),
    st.integers(1, 40),
    st.sampled_from([60_000, 60_000, 1_000, 7, 86_400_000]),
)
SLOT = st.builds(ConcurrencyLimit, st.sampled_from(["a", "b", "c"]), st.integers(1, 3))


class PlannedMachine(RuleBasedStateMachine):
    holds = Bundle("holds")

    @initialize(
        plans=st.lists(
            st.tuples(
                st.lists(LIMIT, max_size=5, unique_by=lambda x: x.key),
                st.lists(SLOT, max_size=2, unique_by=lambda x: x.layer),
            ),
            min_size=1,
            max_size=4,
        ),
        max_buckets=st.sampled_from([8, 12, 1_000_000]),
    )
    def setup(
        self,
        plans: list[tuple[list[Limit], list[ConcurrencyLimit]]],
        max_buckets: int,
    ) -> None:
        self.plans = [Plan(tuple(limits), tuple(slots)) for limits, slots in plans]
        self.general = MemoryLimitStore(max_buckets=max_buckets)
        self.planned = MemoryLimitStore(max_buckets=max_buckets)
        self.now = 1_000_000

    @rule(
        target=holds, which=st.integers(0, 3), tokens=st.integers(0, 50), step=st.integers(-5, 3000)
    )
    def admit(self, which: int, tokens: int, step: int) -> tuple[Hold, Hold] | None:
        self.now += step  # now and then backwards: the wall clock of failed logins
        plan = self.plans[which % len(self.plans)]
        charges = plan.charged(tokens)
        now = self.now / 1000
        decision = self.general.admit(charges, plan.slots, now)
        taken = self.planned.take(plan, tokens, now)
        assert (taken is not None) == decision.allowed
        if taken is None:
            return None
        hold, deficits = taken
        assert decision.hold is not None
        assert tuple(deficits) == decision.deficits
        assert hold.charges == decision.charges and hold.slots == decision.hold.slots
        assert rate_headers(plan, deficits) == Guard.headers(decision)
        return decision.hold, hold

    @rule(pair=consumes(holds), actual=st.integers(0, 80), step=st.integers(-5, 3000))
    def settle(self, pair: tuple[Hold, Hold] | None, actual: int, step: int) -> None:
        if pair is None:
            return
        self.now += step
        general, planned = pair
        assert self.general.settle(general, actual, self.now / 1000)
        assert self.planned.settle(planned, actual, self.now / 1000)
        assert not self.planned.settle(planned, actual, self.now / 1000)

    @invariant()
    def same_tables(self) -> None:
        if not hasattr(self, "general"):
            return
        assert list(self.general._buckets.items()) == list(self.planned._buckets.items())
        assert self.general._counts == self.planned._counts
        assert self.general.open_holds == self.planned.open_holds


TestPlanned = PlannedMachine.TestCase
TestPlanned.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)


def test_a_plan_reports_only_minute_buckets_and_charges_tokens_in_place() -> None:
    rpm = Limit("p", "rpm", BucketSpec.per(10, 60), Unit.REQUESTS)
    tpd = Limit("p", "tpd", BucketSpec.per(1000, 86_400), Unit.TOKENS)
    tpm = Limit("p", "tpm", BucketSpec.per(100, 60), Unit.TOKENS)
    plan = Plan((rpm, tpd, tpm), ())
    assert plan.charged(7) == ((rpm, 1), (tpd, 7), (tpm, 7))
    assert plan.largest_tokens == 1000 and plan.smallest_tokens == 100
    assert [row[0] for row in plan.reports[0]] == [0]
    assert [row[0] for row in plan.reports[1]] == [2]
    untokened = Plan((rpm,), ())
    assert untokened.charged(7) == ((rpm, 1),)
    assert rate_headers(Plan((), ()), []) == ()
    store = MemoryLimitStore()
    taken = store.take(plan, 7, 0.0)
    assert taken is not None
    hold, deficits = taken
    assert "charges" in repr(hold) and hold.charges == plan.charged(7)
    decision = Decision(plan.charged(7), tuple(deficits), hold)
    assert rate_headers(plan, deficits) == Guard.headers(decision)
    assert rate_headers(Plan((tpm,), ()), deficits[2:]) == Guard.headers(decision)[3:]
