"""Rate-limit math over plain state: buckets, the limits built on them, and the
all-or-nothing judgement of a request across them.

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

The in-memory store that applies it is :mod:`.limits`; the Redis store's Lua script
computes the same figures.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence

import attrs

__all__ = [
    "MAX_EXACT",
    "BucketSpec",
    "Charge",
    "ConcurrencyLimit",
    "Limit",
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


#: A limit and what one request costs it (1 for requests, the estimate for tokens).
Charge = tuple[Limit, int]


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
