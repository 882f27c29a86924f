"""The in-memory limit store, which applies the bucket math of :mod:`.buckets` to
buckets held in this process, and what admission gives: a :class:`Hold` until the
request is settled, a :class:`Decision` across every layer, and the :class:`Plan`
that lays one kind of request's limits out once for the hot path.

Concurrency (``max_concurrent``) is a counter per layer, taken in the same
all-or-nothing admission as the buckets and given back when the request ends.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import attrs

from .buckets import (
    Charge,
    ConcurrencyLimit,
    Limit,
    Refusal,
    Unit,
    deficit_at,
    judge,
    remaining,
    reset_ms,
    settled,
    to_ms,
)

__all__ = [
    "RATE_HEADER_NAMES",
    "Decision",
    "Hold",
    "MemoryLimitStore",
    "Plan",
]

#: The ``x-ratelimit-{limit,remaining,reset}-*`` header names of each unit, requests
#: then tokens.
RATE_HEADER_NAMES = tuple(
    tuple(b"x-ratelimit-%s-%s" % (what, unit) for what in (b"limit", b"remaining", b"reset"))
    for unit in (b"requests", b"tokens")
)

#: A minute bucket as a unit's ``x-ratelimit-*`` headers read it: its index,
#: ``per_token``, ``full``, ``per_ms`` and its ``limit`` header.
ReportRow = tuple[int, int, int, int, tuple[bytes, bytes]]
#: A unit's first report row, its other rows, and its remaining and reset header names.
ReportUnit = tuple[ReportRow, tuple[ReportRow, ...], bytes, bytes]

#: What a list of bucket states is filled with before each place is set.
_NO_STATE: list[int] = []


# Hold and Decision are made on every admission: plain slotted classes (attrs'
# frozen ones set each field through object.__setattr__, about 1 µs a class).
class Hold:
    """What an admitted request holds until it is settled or refunded (never changed).

    A hold taken through a :class:`Plan` (:meth:`MemoryLimitStore.take`) keeps the plan
    and the tokens it reserved on each token bucket; its ``charges`` are built from
    them when asked for."""

    __slots__ = ("_charges", "id", "plan", "slots", "tokens")

    def __init__(
        self,
        id: int,
        charges: tuple[Charge, ...] | None,
        slots: tuple[ConcurrencyLimit, ...],
        plan: Plan | None = None,
        tokens: int = 0,
    ) -> None:
        self.id = id
        self._charges = charges
        self.slots = slots
        self.plan = plan
        self.tokens = tokens

    @property
    def charges(self) -> tuple[Charge, ...]:
        charges = self._charges
        if charges is None:
            assert self.plan is not None
            charges = self._charges = self.plan.charged(self.tokens)
        return charges

    def __repr__(self) -> str:
        return f"Hold(id={self.id!r}, charges={self.charges!r}, slots={self.slots!r})"


@attrs.define(eq=False)
class Decision:
    """The outcome of one admission across every layer: a hold, or a refusal (never
    changed).

    ``deficits`` are the buckets' states right after the decision (debited when
    allowed), one per charge, from which :meth:`remaining` and :meth:`reset_ms` read
    the ``x-ratelimit-*`` figures.
    """

    charges: tuple[Charge, ...]
    deficits: tuple[int, ...]
    hold: Hold | None = None
    refusal: Refusal | None = None

    @property
    def allowed(self) -> bool:
        return self.hold is not None

    def limit(self, index: int) -> int:
        return self.charges[index][0].spec.capacity

    def remaining(self, index: int) -> int:
        return remaining(self.charges[index][0].spec, self.deficits[index])

    def reset_ms(self, index: int) -> int:
        return reset_ms(self.charges[index][0].spec, self.deficits[index])


class Plan:
    """The limits and slots of one kind of request, laid out once for the hot path.

    Requests of the same principal, client, model and endpoint are charged on the
    same buckets and slots (:class:`~.access.AccessPolicy` keeps one plan per such
    combination), so what admitting, reporting and settling them reads is built here
    once, as plain tuples: ``rows`` (one per limit: its index, key, ``per_token``,
    ``per_ms``, ``full``, and whether it counts tokens), ``token_rows`` (the token
    buckets, for settling: key, ``per_token``, ``per_ms``, capacity and the deepest
    deficit, a debt of one window), ``slot_rows`` and
    ``reports`` (the minute buckets each ``x-ratelimit-*`` unit may report, requests
    then tokens: index, ``per_token``, ``full``, ``per_ms`` and the capacity in
    ASCII digits); ``report_units`` lays ``reports`` out for
    :func:`~.guard.rate_headers`: for each unit that has some, its first row, the
    others, and the names of its ``remaining`` and ``reset`` headers, each row
    ending with its whole ``limit`` header instead of the digits.
    """

    __slots__ = (
        "_token_at",
        "empty",
        "largest_tokens",
        "limits",
        "report_units",
        "reports",
        "rows",
        "slot_rows",
        "slots",
        "smallest_tokens",
        "token_rows",
        "untokened",
    )

    def __init__(self, limits: tuple[Limit, ...], slots: tuple[ConcurrencyLimit, ...]) -> None:
        self.limits = limits
        self.slots = slots
        self.empty = not limits and not slots
        tokens = Unit.TOKENS
        sizes = [limit.spec.capacity for limit in limits if limit.unit is tokens]
        #: The largest and smallest token bucket (0: none).
        self.largest_tokens = max(sizes, default=0)
        self.smallest_tokens = min(sizes, default=0)
        #: The charges of a request that counts no tokens.
        self.untokened: tuple[Charge, ...] = tuple((limit, 1) for limit in limits)
        self._token_at = tuple((i, limit) for i, limit in enumerate(limits) if limit.unit is tokens)
        self.rows = tuple(
            (
                i,
                limit.key,
                limit.spec.per_token,
                limit.spec.per_ms,
                limit.spec.full,
                limit.unit is tokens,
            )
            for i, limit in enumerate(limits)
        )
        self.token_rows = tuple(
            (
                limit.key,
                limit.spec.per_token,
                limit.spec.per_ms,
                limit.spec.capacity,
                2 * limit.spec.full,
            )
            for _, limit in self._token_at
        )
        self.slot_rows = tuple((slot.layer, slot.limit) for slot in slots)
        self.reports = tuple(
            tuple(
                (
                    i,
                    limit.spec.per_token,
                    limit.spec.full,
                    limit.spec.per_ms,
                    b"%d" % limit.spec.capacity,
                )
                for i, limit in enumerate(limits)
                if limit.reports == unit
            )
            for unit in (0, 1)
        )
        units = []
        for reports, (limit_name, remaining_name, reset_name) in zip(
            self.reports, RATE_HEADER_NAMES, strict=True
        ):
            if reports:
                # The limit header is built once here, not per response.
                rows = tuple(
                    (i, pt, full, pms, (limit_name, cap)) for i, pt, full, pms, cap in reports
                )
                units.append((rows[0], rows[1:], remaining_name, reset_name))
        self.report_units: tuple[ReportUnit, ...] = tuple(units)

    def charged(self, tokens: int) -> tuple[Charge, ...]:
        """The charges of a request that reserves ``tokens`` on token buckets."""
        if not self._token_at:
            return self.untokened
        out = list(self.untokened)
        for i, limit in self._token_at:
            out[i] = (limit, tokens)
        return tuple(out)


@attrs.define
class MemoryLimitStore:
    """The math applied to buckets held in this process, in the same call.

    Memory is bounded: a bucket that is full again is the same as no bucket, so it
    is dropped whenever the table is swept; the table is swept when it has doubled
    since the last sweep (or reached ``max_buckets``), so sweeping costs O(1) per
    admission. If live (not full) buckets alone fill more than seven eighths of
    ``max_buckets``, those nearest to full are forgotten until seven eighths are left.
    Forgetting a bucket treats it as full, so it can
    only ever admit more for that key than exact counting would, and only for a key
    that was about to be full anyway; under that pressure (many distinct IPs, say)
    the store stays bounded rather than exact. Concurrency counters and open holds are
    never evicted: they are bounded by the requests in flight.
    """

    #: Most buckets tracked at once (``[limits] max_tracked_buckets``).
    max_buckets: int = attrs.field(default=1_000_000, validator=attrs.validators.ge(8))
    _buckets: dict[str, list[int]] = attrs.field(factory=dict, init=False)
    _counts: dict[str, int] = attrs.field(factory=dict, init=False)
    _open: dict[int, Hold] = attrs.field(factory=dict, init=False)
    _ids: itertools.count[int] = attrs.field(factory=itertools.count, init=False)
    _sweep_at: int = attrs.field(
        default=attrs.Factory(lambda self: min(1024, self.max_buckets), takes_self=True),
        init=False,
    )

    def admit(
        self, charges: Sequence[Charge], slots: Sequence[ConcurrencyLimit], now: float
    ) -> Decision:
        """Admit a request on every layer at once, or on none."""
        t = int(now * 1000.0 + 0.5)  # to_ms, inlined: this is the hot path
        buckets = self._buckets
        counts = self._counts
        held = tuple(charges)
        # Each bucket's deficit after this request's debit, and whether all of them
        # fit (what judge() decides, for the common case where everything does).
        debited = []
        fits = True
        for limit, cost in held:
            key, per_token, per_ms, full, span = limit.bucket
            state = buckets.get(key)
            deficit = 0
            if state is not None:
                # deficit_at, inlined: the refill since the state's stamp.
                deficit = state[0]
                elapsed = t - state[1]
                if elapsed > 0 and deficit > 0:
                    refill = per_ms * (elapsed if elapsed < span else span)
                    deficit = deficit - refill if refill < deficit else 0
            deficit += cost * per_token
            debited.append(deficit)
            if deficit > full:
                fits = False
        if fits:
            for slot in slots:
                if counts.get(slot.layer, 0) >= slot.limit:
                    fits = False
        if not fits:
            pairs = zip(debited, held, strict=True)
            deficits = [d - cost * limit.spec.per_token for d, (limit, cost) in pairs]
            used = [counts.get(slot.layer, 0) for slot in slots]
            return Decision(held, tuple(deficits), None, judge(held, deficits, slots, used))
        for (limit, _), deficit in zip(held, debited, strict=True):
            bucket = limit.bucket
            buckets[bucket[0]] = [deficit, t, bucket[2]]
        for slot in slots:
            counts[slot.layer] = counts.get(slot.layer, 0) + 1
        hold = Hold(next(self._ids), held, tuple(slots))
        self._open[hold.id] = hold
        if len(buckets) >= self._sweep_at:
            self._sweep(t)
        return Decision(held, tuple(debited), hold)

    def take(self, plan: Plan, tokens: int, now: float) -> tuple[Hold, list[int]] | None:
        """:meth:`admit` of ``plan.charged(tokens)`` and ``plan.slots``, when every
        bucket and slot admits it: the hold, and every bucket's deficit right after
        the debit (``Decision.deficits``, in ``plan.limits`` order). None, with
        nothing changed, when one refuses: :meth:`admit` then says why.

        The same math as :meth:`admit`, over the plan's rows, with bucket states
        updated in place."""
        t = int(now * 1000.0 + 0.5)  # to_ms
        buckets = self._buckets
        # Filled by index, not appended: a store into a list costs a third of a call
        # to append.
        states: list[list[int]] = [_NO_STATE] * len(plan.rows)
        deficits = [0] * len(states)
        fresh = None
        for i, key, per_token, per_ms, full, counts_tokens in plan.rows:
            state = buckets.get(key)
            if state is None:
                deficit = per_token * tokens if counts_tokens else per_token
                state = [deficit, t, per_ms]
                if fresh is None:
                    fresh = [(key, state)]
                else:
                    fresh.append((key, state))
            else:
                # deficit_at, inlined: the refill since the state's stamp. Python's
                # integers need no cap on the refill (``span``: for the doubles of
                # Lua): a deficit is at most two buckets, which a refill of ``span``
                # or more fills up anyway.
                deficit = state[0]
                elapsed = t - state[1]
                if elapsed > 0:
                    refill = per_ms * elapsed
                    deficit = deficit - refill if refill < deficit else 0
                deficit += per_token * tokens if counts_tokens else per_token
            if deficit > full:
                return None
            states[i] = state
            deficits[i] = deficit
        counts = self._counts
        slot_rows = plan.slot_rows
        for layer, limit in slot_rows:
            if counts.get(layer, 0) >= limit:
                return None
        for layer, _ in slot_rows:
            counts[layer] = counts.get(layer, 0) + 1
        i = 0
        for state in states:
            state[0] = deficits[i]
            state[1] = t
            i += 1  # noqa: SIM113 (a counter costs less than enumerate's or zip's pairs)
        if fresh is not None:
            for key, state in fresh:
                buckets[key] = state
        if len(buckets) >= self._sweep_at:
            self._sweep(t)
        hold = Hold(next(self._ids), None, plan.slots, plan, tokens)
        self._open[hold.id] = hold
        return hold, deficits

    def settle(self, hold: Hold, actual_tokens: int, now: float) -> bool:
        """End an admitted request: token buckets get its real usage, slots come back.

        Each hold ends once; a second call changes nothing and returns False.
        """
        if self._open.pop(hold.id, None) is None:
            return False
        plan = hold.plan
        if plan is not None:
            # The same math as below (deficit_at and settled, inlined) over the
            # plan's token rows, states updated in place (a state's ``per_ms`` is its
            # key's, so it stays). No cap on the refill: as in take, none is needed.
            reserved = hold.tokens
            if reserved != actual_tokens:
                t = int(now * 1000.0 + 0.5)  # to_ms
                buckets = self._buckets
                for key, per_token, per_ms, capacity, most in plan.token_rows:
                    state = buckets.get(key)
                    deficit = 0
                    if state is not None:
                        deficit = state[0]
                        elapsed = t - state[1]
                        if elapsed > 0 and deficit > 0:
                            refill = per_ms * elapsed
                            deficit = deficit - refill if refill < deficit else 0
                    if actual_tokens <= reserved:
                        unused = reserved - actual_tokens
                        credit = (unused if unused < capacity else capacity) * per_token
                        new = deficit - credit if credit < deficit else 0
                    else:
                        over = actual_tokens - reserved
                        new = deficit + (over if over < capacity else capacity) * per_token
                        new = new if new < most else most
                    if not new:
                        buckets.pop(key, None)
                    elif state is None:
                        buckets[key] = [new, t, per_ms]
                    else:
                        state[0] = new
                        state[1] = t
            counts = self._counts
            for layer, _ in plan.slot_rows:
                left = counts[layer] - 1
                if left:
                    counts[layer] = left
                else:
                    del counts[layer]
            return True
        t = int(now * 1000.0 + 0.5)  # to_ms
        buckets = self._buckets
        tokens = Unit.TOKENS
        for limit, reserved in hold.charges:
            if reserved != actual_tokens and limit.unit is tokens:
                spec = limit.spec
                key = limit.key
                state = buckets.get(key)
                deficit = 0 if state is None else deficit_at(spec, state[0], state[1], t)
                new = settled(spec, deficit, reserved, actual_tokens)
                if new:
                    buckets[key] = [new, t, spec.per_ms]
                else:
                    buckets.pop(key, None)
        counts = self._counts
        for slot in hold.slots:
            left = counts[slot.layer] - 1
            if left:
                counts[slot.layer] = left
            else:
                del counts[slot.layer]
        return True

    def refund(self, hold: Hold, now: float) -> bool:
        """End a request that used nothing (cancelled, failed, timed out)."""
        return self.settle(hold, 0, now)

    def deficit(self, limit: Limit, now: float) -> int:
        """The bucket's deficit at ``now`` (0: full), for figures without a charge."""
        state = self._buckets.get(limit.key)
        return 0 if state is None else deficit_at(limit.spec, state[0], state[1], to_ms(now))

    def raise_deficit(self, limit: Limit, deficit: int, now: float) -> None:
        """Make the bucket's deficit at ``now`` at least ``deficit``: another
        store's view of the same bucket (same math), merged in."""
        t = to_ms(now)
        spec = limit.spec
        state = self._buckets.get(limit.key)
        current = 0 if state is None else deficit_at(spec, state[0], state[1], t)
        if deficit > current:
            self._buckets[limit.key] = [deficit, t, spec.per_ms]
            if len(self._buckets) >= self._sweep_at:
                self._sweep(t)

    def tracks(self, key: str) -> bool:
        """Whether the bucket ``key`` (a :attr:`Limit.key`) may be below full: one not
        tracked is full (a cheap check before building a :class:`Limit`)."""
        return key in self._buckets

    def in_flight(self, layer: str) -> int:
        return self._counts.get(layer, 0)

    @property
    def tracked(self) -> int:
        """Buckets held in memory (full ones may linger until the next sweep)."""
        return len(self._buckets)

    @property
    def open_holds(self) -> int:
        return len(self._open)

    def _sweep(self, now: int) -> None:
        # A state is [deficit, stamp, per_ms]; it is full once its deficit is refilled.
        live = {k: s for k, s in self._buckets.items() if s[0] > (now - s[1]) * s[2]}
        keep = self.max_buckets - self.max_buckets // 8
        if len(live) > keep:
            order = sorted(live, key=lambda k: live[k][1] + live[k][0] // live[k][2])
            for key in order[: len(live) - keep]:
                del live[key]
        self._buckets = live
        self._sweep_at = min(max(1024, 2 * len(live)), self.max_buckets)
