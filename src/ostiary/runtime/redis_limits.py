"""The limit store shared by replicas: the core's bucket math, run inside Redis.

One Lua script per admission judges every layer at once and debits all or none,
atomically, on Redis' own clock (``TIME``), so the clocks of the replicas cannot
change a decision. It is the same integer arithmetic as
:mod:`ostiary.protocol.buckets`, operation for operation (``lua/bucket.lua``); a
differential test keeps the two identical. Tests may pass an explicit ``now_ms``,
which replaces Redis' clock; nothing else does.

Keys (``prefix`` defaults to ``ostiary:``):

- ``{prefix}{<layer>}:<name>:<capacity>/<window_ms>``: a bucket (the limit's value
  is in the key, as in :attr:`Limit.key`: a deficit counts in its units, so a limit
  changed by a reload is another bucket), 24 bytes: its deficit, its stamp and
  its key's expiry as little-endian doubles (exact: every figure is an integer
  below 2**53), expiring a second or two after it is full again, so Redis holds
  only buckets below full (one MGET reads an admission's buckets, one SET writes
  each, with a new expiry only when the one it has falls short: about once a
  second for a busy bucket; see ``lua/bucket.lua``). Binary, not decimal: Redis'
  Lua parses and prints decimals through strtod and printf, which cost more than
  the rest of the script; the numbers a script is given travel the same way, in one
  argument;
- ``{prefix}{<layer>}:concurrent``: the requests in flight of a layer, a hash of
  replica id to count;
- ``{prefix}holds:{<replica>}``: the replica's open holds, hold id to the hold's slot
  keys (each as ``<length>:<key>``), and its lease. Only a hold with something to
  settle (slots, or token buckets) is kept; one of request buckets alone ends without
  a round trip, as request counts are never refunded. Every admission and every
  :meth:`heartbeat` renews the TTL (``lease``); one heartbeat owns all holds, so a
  long stream needs no renewal of its own.

Leases. When a replica dies its holds hash expires, and the next admission that
counts a layer's concurrency drops the counts of every replica without a live holds
hash (its own included: it learns whether its hash is alive from the PEXPIRE that
renews it): a dead replica's slots come back within ``lease`` of its death, at the
first admission that needs them (nothing needs them earlier). Token reservations
need no lease: a reservation is a debit that the bucket refills on its own within a
window, so a dead replica's reservations count as fully used, which errs on the safe
side. A replica that was only slow (no heartbeat for ``lease``) loses its counts the
same way; its later settlements change nothing (their reservations count as used).

Reconciliation. Each hold in the holds hash records its slot keys. The store knows
every hold id it still has business with (admitting, open, being settled, waiting to
be settled again); the heartbeat lists the holds hash and releases every hold it
does not know: an admission whose reply was lost (timeout, cancellation) but which
Redis carried out, or a settlement given up because too many were waiting
(``max_pending``). Their slots come back, their token reservations count as used.
So nothing is lost silently and memory stays bounded by the requests in flight plus
``max_pending``. Settlements are idempotent: a hold's field is deleted once, and
only the call that deletes it changes a counter. Admissions are not idempotent,
so the client never sends one again by itself when a connection breaks under it
(Redis may have run it): the store sends it again flagged, and the script first
looks for the hold's record, so an admission Redis carried out is not counted twice.

Redis Cluster. Every key carries a hash tag: all buckets and the counter of one
layer value share a slot (``{principal:key:abc}``), and each replica's holds its own.
One admission, though, spans several layers (principal, IP, model, global...), which
land in different slots, and EVAL may only touch one slot; and the reclaim reads
other replicas' holds hashes, keys the script is not given. So Cluster would need
either one tag for everything (Cluster-compatible, but one node does all the work),
or one script per slot, run in turn, each reserving its layers, with the earlier
reservations refunded when a later slot refuses: never more admitted than the
limits allow, but a refused request can briefly hold budget another one needed; and
a copy of each replica's lease expiry inside every counter hash it writes to,
refreshed with the heartbeat (one write per slot touched instead of one). The key
layout allows the second way; the scripts are written for a single primary (Redis
or Valkey).
"""

from __future__ import annotations

import collections
import functools
import importlib.resources
import itertools
import logging
import struct
import uuid
from collections.abc import Sequence
from typing import Any

import attrs
import trio

from ..protocol.buckets import Charge, ConcurrencyLimit, Limit, Refusal, Unit, deficit_at
from ..protocol.limits import Decision, Hold
from .redis_client import RedisClient
from .resp import RedisError, RedisMaybeRanError, Script, bulk, evalsha_head

__all__ = ["ADMIT", "RELEASE", "SETTLE", "LimiterUnavailableError", "RedisLimitStore"]

log = logging.getLogger("ostiary.limits")


def _script(*names: str) -> Script:
    lua = importlib.resources.files("ostiary.runtime") / "lua"
    return Script("".join((lua / f"{name}.lua").read_text() for name in names))


# Each script is its helpers and its body: helpers a script does not use would be
# defined on every call for nothing.
ADMIT = _script("bucket", "admit")
SETTLE = _script("bucket", "slots", "settle")
RELEASE = _script("slots", "release")


#: A limit's piece of the admission: its key as packed, per_token, per_ms, full,
#: span, and whether it counts tokens; a slot's: its key as packed, and its part of
#: the hold's record, bare and packed as the whole record.
_PackedLimit = tuple[Limit, bytes, int, int, int, int, bool]
_PackedSlot = tuple[ConcurrencyLimit, bytes, bytes, bytes]
#: Limits and slots whose pieces are kept at most (then they are packed afresh).
_PACKED = 8192
#: ARGV of the admission: numbers, hold id, record, then the replica's three.
_ARGS = 6
_NO_RECORD = bulk(b"")


@functools.cache
def _head(keys: int) -> bytes:
    return evalsha_head(ADMIT, keys, _ARGS)


#: A bucket as Redis stores it: its deficit, stamp and expiry, little-endian doubles.
_BUCKET = struct.Struct("<ddd")


def _doubles(numbers: list[int]) -> bytes:
    """A script's numbers as it reads them (``ARGV[1]``): little-endian doubles, exact
    below 2**53, which :class:`~ostiary.protocol.buckets.BucketSpec` sees to."""
    return struct.pack(f"<{len(numbers)}d", *numbers)


def _recorded(charges: Sequence[Charge], slots: Sequence[ConcurrencyLimit]) -> bool:
    """Whether an admitted hold is kept in Redis: it has slots to give back or token
    usage to settle. Request counts are never refunded, so a hold of request buckets
    alone ends without a round trip."""
    return bool(slots) or any(limit.unit is Unit.TOKENS for limit, _ in charges)


class LimiterUnavailableError(Exception):
    """The shared limit store could not decide in time (Redis down or too slow).

    The gateway answers 503 ``rate_limiter_unavailable`` or counts locally, as
    ``[redis] on_failure`` says.
    """


@attrs.define(eq=False)
class RedisLimitStore:
    """Admission, settlement and leases against one Redis (or Valkey) primary."""

    client: RedisClient
    prefix: str = "ostiary:"
    #: This process's id among the replicas sharing Redis.
    replica: str = attrs.field(factory=lambda: uuid.uuid4().hex)
    #: Seconds a replica's holds outlive its last heartbeat (``[redis] lease``).
    lease: float = attrs.field(default=15.0, validator=attrs.validators.gt(0))
    #: Settlements that failed (Redis down) wait here and are retried by the
    #: heartbeat; beyond this many, a hold is left to reconciliation (its slots come
    #: back, its reservation counts as used).
    max_pending: int = attrs.field(default=10_000, validator=attrs.validators.ge(1))
    #: Settlements given up to reconciliation because ``max_pending`` were waiting.
    given_up: int = attrs.field(default=0, init=False)
    #: Holds released by reconciliation (lost admissions, given-up settlements).
    released: int = attrs.field(default=0, init=False)
    _ids: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1), init=False)
    #: Admitted holds not yet ended (each ends once).
    _open: set[int] = attrs.field(factory=set, init=False)
    #: Every hold id this store still has business with in Redis: admitting, open,
    #: settling, pending. Reconciliation releases the holds of Redis not in it.
    _live: set[int] = attrs.field(factory=set, init=False)
    _pending: collections.deque[tuple[Hold, int]] = attrs.field(
        factory=collections.deque, init=False
    )
    _holds_prefix: str = attrs.field(init=False)
    _holds_key: str = attrs.field(init=False)
    #: Pieces of the admission command: this replica's, and each limit's and slot's,
    #: by id (an entry holds its limit, so the id is not another's meanwhile).
    _holds_arg: bytes = attrs.field(init=False)
    _tail: bytes = attrs.field(init=False)
    _packed: dict[int, _PackedLimit] = attrs.field(factory=dict, init=False)
    _packed_slots: dict[int, _PackedSlot] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        self._holds_prefix = f"{self.prefix}holds:{{"
        self._holds_key = f"{self._holds_prefix}{self.replica}}}"
        self._holds_arg = bulk(self._holds_key.encode())
        replica, lease, at = self.replica, self._lease_ms, self._holds_prefix
        self._tail = b"".join(bulk(str(arg).encode()) for arg in (replica, lease, at))

    def _pack_limit(self, limit: Limit) -> _PackedLimit:
        if len(self._packed) >= _PACKED:
            self._packed.clear()
        _, per_token, per_ms, full, span = limit.bucket
        key = bulk(self.bucket_key(limit).encode())
        entry = (limit, key, per_token, per_ms, full, span, limit.unit is Unit.TOKENS)
        self._packed[id(limit)] = entry
        return entry

    def _pack_slot(self, slot: ConcurrencyLimit) -> _PackedSlot:
        if len(self._packed_slots) >= _PACKED:
            self._packed_slots.clear()
        key = self.slot_key(slot).encode()
        piece = b"%d:%b" % (len(key), key)
        entry = (slot, bulk(key), piece, bulk(piece))
        self._packed_slots[id(slot)] = entry
        return entry

    @property
    def holds_key(self) -> str:
        return self._holds_key

    @property
    def _lease_ms(self) -> int:
        return int(self.lease * 1000)

    def bucket_key(self, limit: Limit) -> str:
        spec = limit.spec
        return f"{self.prefix}{{{limit.layer}}}:{limit.name}:{spec.capacity}/{spec.window_ms}"

    def slot_key(self, slot: ConcurrencyLimit) -> str:
        return f"{self.prefix}{{{slot.layer}}}:concurrent"

    @property
    def open_holds(self) -> int:
        return len(self._open)

    @property
    def pending(self) -> int:
        """Settlements waiting for Redis to come back."""
        return len(self._pending)

    async def admit(
        self,
        charges: Sequence[Charge],
        slots: Sequence[ConcurrencyLimit],
        *,
        now_ms: int | None = None,
        deadline: float | None = None,
    ) -> Decision:
        """Admit a request on every layer at once, or on none (one round trip, by
        ``deadline`` if given, else within the client's timeout)."""
        hold_id = next(self._ids)
        # The command is packed here from pieces kept per limit: packing its
        # arguments one by one cost more than the rest of this method.
        cache, slot_cache = self._packed, self._packed_slots
        parts = [b""]  # the head, once the keys are counted
        numbers = [-1 if now_ms is None else now_ms, len(charges), len(slots), 0, -1]
        recorded = bool(slots)
        for i, (limit, cost) in enumerate(charges):
            entry = cache.get(id(limit))
            if entry is None or entry[0] is not limit:
                entry = self._pack_limit(limit)
            parts.append(entry[1])
            _, _, per_token, per_ms, full, span, tokens = entry
            debit = cost * per_token
            if debit > full:  # its cost exceeds its capacity: it can never pass
                if numbers[4] == -1:
                    numbers[4] = i  # the first such refuses
                debit = 0  # never used
            numbers += (per_ms, span, full, debit)
            if tokens:
                recorded = True  # see _recorded
        record = _NO_RECORD
        if slots:
            pieces = []
            for slot in slots:
                packed = slot_cache.get(id(slot))
                if packed is None or packed[0] is not slot:
                    packed = self._pack_slot(slot)
                parts.append(packed[1])
                pieces.append(packed[2])
                numbers.append(slot.limit)
                record = packed[3]  # the whole record, if this is the only slot
            if len(pieces) > 1:
                record = bulk(b"".join(pieces))
        if recorded:
            numbers[3] = 1
        parts.append(self._holds_arg)
        parts[0] = _head(len(parts) - 1)
        parts += (
            bulk(struct.pack(f"<{len(numbers)}d", *numbers)),  # _doubles, inlined
            bulk(b"%d" % hold_id),
            record,
            self._tail,
        )
        payload = b"".join(parts)
        self._live.add(hold_id)
        try:
            try:
                reply = await self.client.evalsha_packed(
                    ADMIT, payload, deadline=deadline, resend=False
                )
            except RedisMaybeRanError:
                # The connection broke under the call, maybe after Redis admitted
                # it: sent again, a kept hold is first looked for, and an admission
                # found is not counted twice (flag 2). A hold not kept (request
                # buckets alone) cannot be looked for; sent again, its requests may
                # count twice: the safe side, and only when a connection breaks.
                if recorded:
                    numbers[3] = 2
                    parts[-4] = bulk(struct.pack(f"<{len(numbers)}d", *numbers))
                    payload = b"".join(parts)
                reply = await self.client.evalsha_packed(ADMIT, payload, deadline=deadline)
        except BaseException as exc:
            # The script may have run before the reply was lost (timeout, cancel):
            # forgotten here, its hold (if any) is released by reconciliation.
            self._live.discard(hold_id)
            if isinstance(exc, RedisError):
                raise LimiterUnavailableError(str(exc)) from exc
            raise
        held = tuple(charges)
        if reply[0] == 1:
            hold = Hold(hold_id, held, tuple(slots))
            self._open.add(hold_id)
            return Decision(held, tuple(reply[1:]), hold)
        self._live.discard(hold_id)
        _, exhausted, full_slot, retry, never = reply[:5]
        refusal = Refusal(
            None if exhausted < 0 else exhausted,
            None if full_slot < 0 else full_slot,
            None if retry < 0 else retry,
            never == 1,
        )
        return Decision(held, tuple(reply[5:]), None, refusal)

    async def settle(self, hold: Hold, actual_tokens: int, *, now_ms: int | None = None) -> bool:
        """End an admitted request: token buckets get real usage, slots come back.

        Each hold ends once; a second call returns False. If Redis fails (or the
        call is cancelled), the settlement is kept (see :meth:`settle_later`) for
        the heartbeat to retry, which is safe: Redis applies a hold's settlement once.
        """
        if hold.id not in self._open:
            return False
        self._open.discard(hold.id)
        try:
            await self._settle(hold, actual_tokens, now_ms)
        except BaseException:
            self._defer(hold, actual_tokens)
            raise
        self._live.discard(hold.id)
        return True

    def settle_later(self, hold: Hold, actual_tokens: int) -> bool:
        """End a hold without a round trip now: the next heartbeat settles it.

        Up to ``max_pending`` settlements wait; beyond, the hold is given up to
        reconciliation (counted in :attr:`given_up`, logged): its slots still come
        back at the next heartbeat, only its token usage is not settled (the
        reservation counts as used). Returns False if the hold had ended already.
        """
        if hold.id not in self._open:
            return False
        self._open.discard(hold.id)
        self._defer(hold, actual_tokens)
        return True

    def _defer(self, hold: Hold, actual_tokens: int) -> None:
        if len(self._pending) < self.max_pending:
            self._pending.append((hold, actual_tokens))
            return
        self._live.discard(hold.id)
        self.given_up += 1
        if self.given_up == 1 or self.given_up % 1000 == 0:
            log.warning(
                "too many settlements waiting for Redis: slots released without usage",
                extra={"fields": {"given_up": self.given_up, "max_pending": self.max_pending}},
            )

    async def refund(self, hold: Hold, *, now_ms: int | None = None) -> bool:
        """End a request that used nothing (cancelled, failed, timed out)."""
        return await self.settle(hold, 0, now_ms=now_ms)

    async def heartbeat(self) -> None:
        """Renew this replica's lease, retry settlements that failed earlier, then
        release the holds Redis has that this store does not know (reconciliation)."""
        await self._call(("PEXPIRE", self.holds_key, self._lease_ms))
        while self._pending:
            # Taken before the round trip: concurrent heartbeats never retry the same.
            hold, actual = self._pending.popleft()
            try:
                await self._settle(hold, actual, None)
            except BaseException:
                self._pending.appendleft((hold, actual))
                raise
            self._live.discard(hold.id)
        held = await self._call(("HKEYS", self.holds_key))
        stale = [raw for raw in held if int(raw) not in self._live]
        if stale:
            reply = await self._run(RELEASE, [self.holds_key], [self.replica, *stale])
            self.released += reply[0]

    async def warm(self, connections: int) -> None:
        """Open ``connections`` of the client's pool and load the scripts: work that
        otherwise falls to the first admissions, inside their timeout (a replica's
        first burst would be refused for it). Raises LimiterUnavailableError."""
        failed: list[RedisError] = []

        async def ping() -> None:
            try:
                await self.client.execute("PING")
            except RedisError as exc:
                failed.append(exc)

        async with trio.open_nursery() as nursery:
            for _ in range(connections):
                nursery.start_soon(ping)
        if failed:
            raise LimiterUnavailableError(str(failed[0]))
        scripts = [("SCRIPT", "LOAD", s.source) for s in (ADMIT, SETTLE, RELEASE)]
        try:
            replies = await self.client.pipeline(scripts)
        except RedisError as exc:
            raise LimiterUnavailableError(str(exc)) from exc
        for reply in replies:
            if isinstance(reply, RedisError):
                raise LimiterUnavailableError(str(reply))

    async def ping(self) -> bool:
        """Whether Redis answers now (within the client's timeout)."""
        try:
            return await self._call(("PING",)) == [b"PONG"]
        except LimiterUnavailableError:
            return False

    async def deficit(self, limit: Limit, now_ms: int) -> int:
        """A bucket's deficit at ``now_ms`` (0: full), read without changing it."""
        (stored,) = await self._call(("GET", self.bucket_key(limit)))
        if stored is None:
            return 0
        deficit, stamp, _ = _BUCKET.unpack(stored)
        return deficit_at(limit.spec, int(deficit), int(stamp), now_ms)

    async def in_flight(self, slot: ConcurrencyLimit) -> int:
        """Requests in flight on a layer, across replicas (dead ones included)."""
        counts = await self._call(("HVALS", self.slot_key(slot)))
        return sum(int(c) for c in counts)

    async def _settle(self, hold: Hold, actual: int, now_ms: int | None) -> None:
        if not _recorded(hold.charges, hold.slots):
            return  # requests are not refunded: nothing to do, nothing in Redis
        settled = [
            (limit, reserved)
            for limit, reserved in hold.charges
            if limit.unit is Unit.TOKENS and reserved != actual
        ]
        keys = [self.bucket_key(limit) for limit, _ in settled]
        keys += [self.slot_key(slot) for slot in hold.slots]
        keys.append(self.holds_key)
        numbers = [-1 if now_ms is None else now_ms, len(settled), len(hold.slots)]
        for limit, reserved in settled:
            s = limit.spec
            # Only min(|actual - reserved|, capacity) counts: bounded, it stays exact.
            used = max(reserved - s.capacity, min(actual, reserved + s.capacity))
            numbers += (s.per_ms, 2 * s.window_ms, s.capacity, s.per_token, s.full)
            numbers += (reserved, used)
        await self._run(SETTLE, keys, (_doubles(numbers), self.replica, hold.id))

    async def _run(
        self,
        script: Script,
        keys: list[str],
        args: Sequence[str | int | bytes],
        deadline: float | None = None,
    ) -> list[int]:
        try:
            reply = await self.client.evalsha(script, keys, args, deadline=deadline)
        except RedisError as exc:
            raise LimiterUnavailableError(str(exc)) from exc
        return reply if isinstance(reply, list) else [reply]

    async def _call(self, command: tuple[str | int, ...]) -> list[Any]:
        try:
            reply = await self.client.execute(*command)
        except RedisError as exc:
            raise LimiterUnavailableError(str(exc)) from exc
        return reply if isinstance(reply, list) else [reply]
