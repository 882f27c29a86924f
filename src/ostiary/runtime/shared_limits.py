"""Carrying out the core's shared-limit actions against Redis.

:class:`SharedLimits` is what the driver holds when ``[redis]`` is configured:

- :meth:`decide` answers a ``CheckLimits`` in the request's own task, within
  ``[redis] timeout``: a :class:`~ostiary.protocol.limits.Decision`, or None when
  Redis is down, too slow, or failed (the gateway then applies ``on_failure``).
  Never an exception; never longer than the timeout plus the event loop's own
  lateness (a reply already received when the time is up counts as in time). An
  admission cut short may still have taken its hold in Redis; the heartbeat's
  reconciliation releases it.
- :meth:`settle` takes a ``SettleLimits`` without awaiting anything: the core emits
  it from whichever event ended the request (another request's, a timer's, the
  client going away in a task being cancelled), so the driver cannot await it
  where it appears, and awaiting it in the ending request's task would hold that
  task (and its connection) on Redis after the response is done. It goes into a
  bounded channel read by ``pool_size`` settler tasks. If the channel is full, the
  settlement waits in the store for the heartbeat (bounded too); beyond that the
  store gives the hold up to reconciliation, which still returns its slots and
  counts its reservation as used. Each step is counted and logged: none is lost
  silently, and memory is bounded by ``max_pending_settlements`` twice.
- :meth:`run` is the replica's heartbeat (renews its lease, retries settlements
  that failed, reconciles holds; every third of the lease, and within a second
  once something waits for it), the settlers and the Redis client's watchdog
  (which keeps every call's deadline without a cancel scope per call), in the
  server's nursery.
  Outages and recoveries are logged once each, not per request.
- :meth:`count_failure` takes a ``ShareFailedAuth`` the same way (never awaits): a
  401 charged to the client address' failed-authentication bucket in Redis by a
  settler, and that bucket's shared deficit reported back to the core, so that an
  address guessing keys across replicas is refused by each replica once it fails
  there after the shared budget is spent. Bounded by the same channel; when it is
  full the 401 is counted in this replica only.
- :meth:`failures` says whether Redis answers, for ``/readyz`` (its ``redis`` entry).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence

import attrs
import trio

from ostiary.protocol.buckets import Charge, ConcurrencyLimit, Limit
from ostiary.protocol.limits import Decision, Hold

from .redis_client import RedisClient
from .redis_limits import LimiterUnavailableError, RedisLimitStore

__all__ = ["SharedLimits"]

log = logging.getLogger("ostiary.limits")

#: Seconds between heartbeats while settlements wait or Redis is away.
_RETRY_EVERY = 1.0
#: Seconds the settlements left at shutdown may take.
_FLUSH_TIMEOUT = 2.0
#: Seconds between two records of admissions Redis did not decide in time.
_UNDECIDED_LOG_EVERY = 10.0
#: Seconds start-up waits for Redis' connections and scripts (:meth:`SharedLimits._warm`).
_WARM_TIMEOUT = 2.0


#: What the settlers carry: a settlement (hold, tokens used), or a failed
#: authentication to count (its bucket, and whom to tell the shared deficit).
_Work = tuple[Hold, int] | tuple[Limit, Callable[[Limit, int], None]]


@attrs.define(eq=False)
class SharedLimits:
    """A Redis limit store as the driver uses it (see the module docstring)."""

    store: RedisLimitStore
    #: Seconds one admission may take (``[redis] timeout``).
    timeout: float = 0.05
    #: Settler tasks (``[redis] pool_size``: one per connection).
    settlers: int = 4
    #: Settlements queued for the settlers (``[redis] max_pending_settlements``).
    queue: int = 10_000
    #: Admissions answered None (Redis down, slow or failing).
    unavailable: int = attrs.field(default=0, init=False)
    _up: bool = attrs.field(default=True, init=False)
    #: When undecided admissions were last logged, and the count then.
    _undecided_logged: float = attrs.field(default=-math.inf, init=False)
    _undecided_count: int = attrs.field(default=0, init=False)
    #: Settlements handed to the settlers and not yet tried.
    _queued: int = attrs.field(default=0, init=False)
    _idle: trio.Event = attrs.field(factory=trio.Event, init=False)
    _send: trio.MemorySendChannel[_Work] = attrs.field(init=False)
    _receive: trio.MemoryReceiveChannel[_Work] = attrs.field(init=False)
    #: The timeout is shorter than the client's: admissions carry their own deadline.
    _sooner: bool = attrs.field(init=False)
    #: The heartbeat's sleep between beats, while it sleeps.
    _nap: trio.CancelScope | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[_Work](self.queue)
        self._sooner = self.timeout < self.store.client.timeout

    @classmethod
    def from_settings(
        cls,
        url: str,
        *,
        timeout: float,
        prefix: str,
        lease: float,
        pool_size: int,
        max_pending: int,
    ) -> SharedLimits:
        client = RedisClient.from_url(url, timeout=timeout, pool_size=pool_size)
        store = RedisLimitStore(client, prefix=prefix, lease=lease, max_pending=max_pending)
        return cls(store, timeout=timeout, settlers=pool_size, queue=max_pending)

    async def decide(
        self, charges: Sequence[Charge], slots: Sequence[ConcurrencyLimit]
    ) -> Decision | None:
        """The store's decision, or None if it has none within the timeout."""
        deadline = None  # the client's own timeout, the usual case
        if self._sooner:
            deadline = trio.current_time() + self.timeout
        try:
            return await self.store.admit(charges, slots, deadline=deadline)
        except LimiterUnavailableError as exc:
            self.unavailable += 1
            self._beat_soon()  # Redis may have admitted it: a hold to reconcile
            self._undecided(exc)
            return None
        except BaseException:
            self._beat_soon()  # cut short (the client left): the same
            raise

    def _undecided(self, exc: LimiterUnavailableError) -> None:
        """Say that admissions went undecided (on_failure applies to them), at most
        once every ``_UNDECIDED_LOG_EVERY`` seconds, with how many since last said:
        a timeout while the connection holds is no outage the heartbeat would see."""
        now = trio.current_time()
        if now < self._undecided_logged + _UNDECIDED_LOG_EVERY:
            return
        fields = {"undecided": self.unavailable - self._undecided_count, "error": str(exc)}
        log.warning("Redis did not decide admissions in time", extra={"fields": fields})
        self._undecided_logged = now
        self._undecided_count = self.unavailable

    def settle(self, hold: Hold, actual_tokens: int) -> None:
        """Queue a settlement for the settlers, or for the heartbeat if they lag."""
        if not self._queue((hold, actual_tokens)):
            self.store.settle_later(hold, actual_tokens)
            self._beat_soon()

    def count_failure(self, limit: Limit, report: Callable[[Limit, int], None]) -> None:
        """Queue a failed authentication for the settlers: charged to ``limit`` in
        Redis, then ``report(limit, deficit)`` with the bucket's shared deficit.
        Dropped (counted here only) when the queue is full or Redis is away."""
        self._queue((limit, report))

    def _queue(self, work: _Work) -> bool:
        try:
            self._send.send_nowait(work)
        except trio.WouldBlock:
            return False
        if not self._queued:
            self._idle = trio.Event()
        self._queued += 1
        return True

    async def wait_settled(self) -> None:
        """Until every settlement queued so far has been tried once (done, or left
        to the heartbeat)."""
        if self._queued:
            await self._idle.wait()

    async def failures(self) -> tuple[tuple[str, str], ...]:
        """What ``/readyz`` reports about Redis: nothing, or that it is unreachable."""
        with trio.move_on_after(self.timeout):
            if await self.store.ping():
                return ()
        return (("redis", "unreachable"),)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The client's watchdog, heartbeat and settlers until cancelled; then settle
        what is left, briefly."""
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.store.client.run)
                await self._warm()
                for _ in range(self.settlers):
                    nursery.start_soon(self._settler)
                nursery.start_soon(self._heartbeat)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(_FLUSH_TIMEOUT):
                await self._flush()
            await self.store.client.aclose()

    async def _warm(self) -> None:
        """Before the first request: the pool open and the scripts loaded, within
        ``_WARM_TIMEOUT``. Redis unreachable, the server starts all the same (and
        ``on_failure`` applies until Redis is back)."""
        with trio.move_on_after(_WARM_TIMEOUT):
            try:
                await self.store.warm(self.settlers)
            except LimiterUnavailableError as exc:
                self._went(up=False, why=str(exc))

    async def _settler(self) -> None:
        async for work in self._receive:
            try:
                if isinstance(work[0], Hold):
                    hold, actual = work
                    try:
                        await self.store.settle(hold, actual)
                    except LimiterUnavailableError:
                        self._beat_soon()  # the store keeps it for the heartbeat
                else:
                    await self._count_failure(*work)
            finally:
                self._done_one()

    async def _count_failure(self, limit: Limit, report: Callable[[Limit, int], None]) -> None:
        decision = await self.decide(((limit, 1),), ())
        if decision is None:
            return
        if decision.hold is not None:  # a debit, not a request in flight
            with contextlib.suppress(LimiterUnavailableError):
                await self.store.settle(decision.hold, 1)
        report(limit, decision.deficits[0])

    def _done_one(self) -> None:
        self._queued -= 1
        if not self._queued:
            self._idle.set()

    async def _heartbeat(self) -> None:
        while True:
            try:
                await self.store.heartbeat()
            except LimiterUnavailableError as exc:
                self._went(up=False, why=str(exc))
            else:
                self._went(up=True)
            calm = self._up and not self.store.pending
            with trio.move_on_after(self.store.lease / 3 if calm else self._retry) as nap:
                self._nap = nap
                await trio.sleep_forever()
            self._nap = None

    def _beat_soon(self) -> None:
        """Something waits for the heartbeat (a settlement to retry, a hold Redis may
        have that this replica lost track of): the next beat comes within
        ``_RETRY_EVERY``, not a third of the lease later, so a slot that a short
        stall of Redis left taken comes back within about a second."""
        nap = self._nap
        if nap is not None:
            nap.deadline = min(nap.deadline, trio.current_time() + self._retry)

    @property
    def _retry(self) -> float:
        """Seconds between beats while something waits for one."""
        return min(_RETRY_EVERY, self.store.lease / 3)

    def _went(self, *, up: bool, why: str = "") -> None:
        if up == self._up:
            return
        self._up = up
        fields: dict[str, object] = {"pending": self.store.pending}
        if up:
            log.warning("Redis is back: limits are shared again", extra={"fields": fields})
        else:
            fields["error"] = why
            log.warning("Redis is unavailable", extra={"fields": fields})

    async def _flush(self) -> None:
        while True:
            try:
                work = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            if isinstance(work[0], Hold):
                self.store.settle_later(*work)
            self._done_one()
        try:
            await self.store.heartbeat()
        except LimiterUnavailableError:
            log.warning(
                "settlements left unsent at shutdown; the lease returns their slots",
                extra={"fields": {"pending": self.store.pending}},
            )
