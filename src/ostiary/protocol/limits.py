"""Rate-limit math over plain state, and the in-memory store that applies it.

Every limit is a bucket whose capacity is the limit, refilled continuously over its
window (DESIGN §5a): ``requests_per_minute = 50`` admits a burst of 50, then one
request every 1.2 s. The algorithm is a continuous-refill token bucket. GCRA is the
same admission rule written as a "theoretical arrival time" (TAT = now + deficit /
rate); the bucket form was chosen because what the headers and the settlement need
is read off it directly: the level (``remaining``), the time to full (``reset``) and
cost-weighted debits and credits, including a debt when real usage exceeds the
reservation.

Exactness. A bucket's state is two integers, ``(deficit, stamp)``: ``deficit`` is
how far the bucket is below full, in units of ``1 / per_token`` token, and ``stamp``
the millisecond it was computed at. With ``g = gcd(capacity, window_ms)``, one token
is ``per_token = window_ms / g`` units and one millisecond refills
``per_ms = capacity / g`` units, so refill, debit, settlement, ``remaining`` and every
wait are exact integer arithmetic; nothing rounds, so the Lua script in the Redis
store (whose numbers are doubles) computes bit-for-bit the same figures as long as
every value stays below 2**53, which :class:`BucketSpec` checks once, at
configuration time. Time is whole milliseconds.

Policy when real usage exceeds the reservation: the excess is debited after the fact
and may drive the bucket below zero, down to minus one capacity at most (a debt of
one window). Nothing is refused retroactively; the next requests wait until the debt
is refilled. Usage below the reservation is credited back (never above full). A
refund is a settlement with zero usage. Request counts are not refunded: a request
that was admitted was made.

Concurrency (``max_concurrent``) is a counter per layer, taken in the same
all-or-nothing admission as the buckets and given back when the request ends.
"""

from __future__ import annotations

import enum
import itertools
import math
from collections.abc import Sequence

import attrs

__all__ = [
    "MAX_EXACT",
    "RATE_HEADER_NAMES",
    "BucketSpec",
    "Charge",
    "ConcurrencyLimit",
    "Decision",
    "Hold",
    "Limit",
    "MemoryLimitStore",
    "Plan",
    "Refusal",
    "Unit",
    "deficit_at",
    "judge",
    "remaining",
    "reset_ms",
    "settled",
    "to_ms",
    "wait_ms",
]

#: Integers up to this are exact in a double (Lua's only number type in Redis).
MAX_EXACT = 2**53


def to_ms(now: float) -> int:
    """Seconds to whole milliseconds, rounded to the nearest (monotonic in ``now``)."""
    return int(now * 1000.0 + 0.5)


def _check_exact(instance: BucketSpec, attribute: attrs.Attribute[int], value: int) -> None:
    g = math.gcd(instance.capacity, value)
    if 4 * instance.capacity * (value // g) >= MAX_EXACT:
        raise ValueError(
            f"a limit of {instance.capacity} per {value} ms is too fine to count exactly"
        )


@attrs.frozen
class BucketSpec:
    """A bucket of ``capacity`` refilled over ``window_ms`` milliseconds."""

    capacity: int = attrs.field(validator=attrs.validators.ge(1))
    window_ms: int = attrs.field(validator=[attrs.validators.ge(1), _check_exact])
    #: Units per token.
    per_token: int = attrs.field(init=False)
    #: Units refilled per millisecond.
    per_ms: int = attrs.field(init=False)
    #: Units of a whole bucket: a deficit of ``full`` is a level of zero.
    full: int = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        g = math.gcd(self.capacity, self.window_ms)
        object.__setattr__(self, "per_token", self.window_ms // g)
        object.__setattr__(self, "per_ms", self.capacity // g)
        object.__setattr__(self, "full", self.capacity * (self.window_ms // g))

    @classmethod
    def per(cls, capacity: int, window_seconds: int) -> BucketSpec:
        return cls(capacity, window_seconds * 1000)


class Unit(enum.Enum):
    """What a bucket counts. Only token buckets are settled with real usage."""

    REQUESTS = "requests"
    TOKENS = "tokens"


@attrs.frozen
class Limit:
    """One bucket of one layer, built once from the configuration.

    ``layer`` names the layer and the value it counts (``principal:key:abc``,
    ``ip:10.0.0.1``, ``global``); ``name`` the dimension (``rpm``, ``tpd``...).
    Requests sharing a ``(layer, name)`` and its spec share a bucket.
    """

    layer: str
    name: str
    spec: BucketSpec
    unit: Unit
    key: str = attrs.field(init=False)
    #: What admission reads of the bucket, in one tuple: its key, the spec's
    #: ``per_token``, ``per_ms`` and ``full``, and the longest refill that counts.
    bucket: tuple[str, int, int, int, int] = attrs.field(init=False, eq=False, repr=False)
    #: Which ``x-ratelimit-*`` figures a bucket of one minute may give: 0 requests,
    #: 1 tokens (-1: another window, never reported unless it refuses).
    reports: int = attrs.field(init=False, eq=False, repr=False)

    @key.default
    def _key(self) -> str:
        # The spec is part of the key: a deficit is counted in units of the spec, so
        # a limit changed by a reload is another bucket (starting full), never the
        # old state read in the wrong units.
        return f"{self.layer}:{self.name}:{self.spec.capacity}/{self.spec.window_ms}"

    @reports.default
    def _reports(self) -> int:
        if self.spec.window_ms != 60_000:
            return -1
        return 0 if self.unit is Unit.REQUESTS else 1

    @bucket.default
    def _bucket(self) -> tuple[str, int, int, int, int]:
        spec = self.spec
        return (self.key, spec.per_token, spec.per_ms, spec.full, 2 * spec.window_ms)


@attrs.frozen
class ConcurrencyLimit:
    """At most ``limit`` requests of ``layer`` from admission to their end."""

    layer: str
    limit: int = attrs.field(validator=attrs.validators.ge(1))


#: The ``x-ratelimit-{limit,remaining,reset}-*`` header names of each unit, requests
#: then tokens.
RATE_HEADER_NAMES = tuple(
    tuple(b"x-ratelimit-%s-%s" % (what, unit) for what in (b"limit", b"remaining", b"reset"))
    for unit in (b"requests", b"tokens")
)

#: A limit and what one request costs it (1 for requests, the estimate for tokens).
Charge = tuple[Limit, int]
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


@attrs.frozen
class Refusal:
    """Why a request was refused.

    ``exhausted`` is the index of the charge that refused: one that can never pass
    (``never``: its own cost exceeds the capacity, so retrying cannot help), else the
    one with the longest wait; ``retry_after_ms`` is the wait after which every
    bucket would admit the request. Or ``full_slot`` is the index of the concurrency
    limit that is full, and ``retry_after_ms`` is None: no time is known.
    """

    exhausted: int | None
    full_slot: int | None
    retry_after_ms: int | None
    never: bool = False

    @property
    def retry_after(self) -> int | None:
        """Whole seconds, rounded up (``retry-after``), agreeing with the ms figure."""
        ms = self.retry_after_ms
        return None if ms is None else -(-ms // 1000)


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


def deficit_at(spec: BucketSpec, deficit: int, stamp: int, now: int) -> int:
    """The deficit at ``now`` of a bucket that had ``deficit`` at ``stamp``."""
    if deficit <= 0:
        return 0
    elapsed = now - stamp
    if elapsed <= 0:
        return deficit
    refill = spec.per_ms * min(elapsed, 2 * spec.window_ms)
    return deficit - refill if refill < deficit else 0


def wait_ms(spec: BucketSpec, deficit: int, cost: int) -> int:
    """Milliseconds until ``cost`` fits (0: it fits now). Needs ``cost <= capacity``."""
    excess = deficit + cost * spec.per_token - spec.full
    return -(-excess // spec.per_ms) if excess > 0 else 0


def remaining(spec: BucketSpec, deficit: int) -> int:
    """Whole tokens (or requests) left in the bucket, never negative."""
    level = spec.full - deficit
    return level // spec.per_token if level > 0 else 0


def reset_ms(spec: BucketSpec, deficit: int) -> int:
    """Milliseconds until the bucket is full again."""
    return -(-deficit // spec.per_ms) if deficit > 0 else 0


def settled(spec: BucketSpec, deficit: int, reserved: int, actual: int) -> int:
    """The deficit after replacing a debit of ``reserved`` with ``actual`` usage."""
    if actual <= reserved:
        credit = min(reserved - actual, spec.capacity) * spec.per_token
        return deficit - credit if credit < deficit else 0
    debt = deficit + min(actual - reserved, spec.capacity) * spec.per_token
    return min(debt, 2 * spec.full)


def judge(
    charges: Sequence[Charge],
    deficits: Sequence[int],
    slots: Sequence[ConcurrencyLimit],
    counts: Sequence[int],
) -> Refusal | None:
    """All-or-nothing admission, given every bucket's deficit now and every slot's count.

    None admits. A cost over a capacity refuses first (it can never pass); then the
    bucket with the longest wait; then a full concurrency slot.
    """
    worst = -1
    worst_wait = 0
    for i, (limit, cost) in enumerate(charges):
        spec = limit.spec
        if cost > spec.capacity:
            return Refusal(i, None, None, never=True)
        wait = wait_ms(spec, deficits[i], cost)
        if wait > worst_wait:
            worst, worst_wait = i, wait
    if worst >= 0:
        return Refusal(worst, None, worst_wait)
    for j, slot in enumerate(slots):
        if counts[j] >= slot.limit:
            return Refusal(None, j, None)
    return None


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
