"""The shared-limit runtime on a real private redis-server: decisions within the
timeout or None, settlements that are never lost, restarts, SCRIPT FLUSH, readiness."""

from __future__ import annotations

import itertools
import select
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager

import hiredis
import orjson
import pytest
import trio
import trio.testing

from ostiary.backends.scripted import ScriptedBackend, ScriptedSettings
from ostiary.protocol.access import AccessPolicy
from ostiary.protocol.buckets import BucketSpec, ConcurrencyLimit, Limit, Unit
from ostiary.protocol.exchange import BackendPolicy
from ostiary.protocol.gateway import Gateway, ModelRoute
from ostiary.runtime.driver import Driver
from ostiary.runtime.redis_client import RedisClient
from ostiary.runtime.redis_limits import RedisLimitStore
from ostiary.runtime.shared_limits import SharedLimits
from tests.conftest import key_table
from tests.runtime.inprocess import Connect, in_memory

from . import redis_server as redis_server_module
from .redis_server import RedisServer, free_port, redis_server

PREFIXES = itertools.count()
# Per day, on Redis' clock: nothing refills a whole unit while a test runs.
RPM = Limit("principal:key:a", "rpd", BucketSpec.per(3, 86_400), Unit.REQUESTS)
TPM = Limit("principal:key:a", "tpd", BucketSpec.per(1000, 86_400), Unit.TOKENS)
SLOT = ConcurrencyLimit("principal:key:a", 2)
#: A guard against hangs, never a timing assertion.
GUARD = 10


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


def shared_for(
    server: RedisServer, *, timeout: float = 0.5, queue: int = 100, max_pending: int = 100
) -> SharedLimits:
    client = RedisClient.from_url(server.url, timeout=timeout, backoff_min=1e-3, backoff_max=1e-3)
    store = RedisLimitStore(client, prefix=f"s{next(PREFIXES)}:", max_pending=max_pending)
    return SharedLimits(store, timeout=timeout, settlers=2, queue=queue)


@asynccontextmanager
async def running(shared: SharedLimits) -> AsyncIterator[SharedLimits]:
    async with trio.open_nursery() as nursery:
        await nursery.start(shared.run)
        yield shared
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def watched_if(client: RedisClient, *, watched: bool) -> AsyncIterator[None]:
    """The client's watchdog running, or each call keeping its own deadline."""
    async with trio.open_nursery() as nursery:
        if watched:
            await nursery.start(client.run)
        yield
        nursery.cancel_scope.cancel()


WATCHED = pytest.mark.parametrize("watched", [True, False], ids=["watched", "unwatched"])


async def test_decisions_and_settlements_through_the_settlers(redis: RedisServer) -> None:
    async with running(shared_for(redis)) as shared:
        assert shared.store.client._alarm is not None  # its watchdog runs there
        first = await shared.decide([(RPM, 1), (TPM, 400)], [SLOT])
        second = await shared.decide([(RPM, 1), (TPM, 400)], [SLOT])
        assert first is not None and first.hold is not None and first.remaining(1) == 600
        assert second is not None and second.hold is not None
        full = await shared.decide([(RPM, 1)], [SLOT])
        assert full is not None and full.refusal is not None and full.refusal.full_slot == 0
        shared.settle(first.hold, 100)
        shared.settle(second.hold, 0)
        with trio.fail_after(GUARD):
            await shared.wait_settled()
        assert await shared.store.in_flight(SLOT) == 0
        after = await shared.decide([(TPM, 1)], [])
        assert after is not None and after.remaining(0) == 1000 - 100 - 1
        assert shared.unavailable == 0
    assert shared.store.client._alarm is None


async def test_a_killed_redis_gives_none_then_a_restart_is_recovered(redis: RedisServer) -> None:
    shared = shared_for(redis)
    async with running(shared):
        admitted = await shared.decide([(RPM, 1)], [SLOT])
        assert admitted is not None and admitted.hold is not None
        redis.kill()
        with trio.fail_after(GUARD):
            assert await shared.decide([(RPM, 1)], [SLOT]) is None
            assert await shared.failures() == (("redis", "unreachable"),)
            shared.settle(admitted.hold, 0)  # cannot reach Redis: kept for later
            await shared.wait_settled()
        assert shared.store.pending == 1 and shared.unavailable == 1
        redis.restart()  # empty: no buckets, no scripts
        with trio.fail_after(GUARD):
            again = await shared.decide([(RPM, 1)], [SLOT])
        assert again is not None and again.allowed and again.remaining(0) == 2
        assert await shared.failures() == ()
        await shared.store.heartbeat()
        assert shared.store.pending == 0


async def test_start_up_opens_the_pool_and_loads_the_scripts(redis: RedisServer) -> None:
    """A replica's first burst finds its connections open and the scripts in Redis:
    neither falls inside the first admissions' timeout (a fresh replica answered
    its first requests 503 for it)."""
    from ostiary.runtime.redis_limits import ADMIT, RELEASE, SETTLE

    async with RedisClient.from_url(redis.url) as admin:
        assert await admin.execute("SCRIPT", "FLUSH") == b"OK"
        shared = shared_for(redis)
        assert not shared.store.client._conns
        with trio.fail_after(GUARD):
            async with running(shared):
                assert len(shared.store.client._conns) >= shared.settlers
                shas = [s.sha for s in (ADMIT, SETTLE, RELEASE)]
                assert await admin.execute("SCRIPT", "EXISTS", *shas) == [1, 1, 1]


async def test_start_up_goes_on_without_redis(redis: RedisServer) -> None:
    redis.kill()
    shared = shared_for(redis)
    with trio.fail_after(GUARD):
        async with running(shared):
            assert not shared._up
            assert await shared.decide([(RPM, 1)], []) is None


async def test_undecided_admissions_are_logged_at_most_every_ten_seconds(
    redis: RedisServer, caplog: pytest.LogCaptureFixture, mock_clock: trio.testing.MockClock
) -> None:
    shared = shared_for(redis)
    redis.kill()
    with trio.fail_after(GUARD):
        for _ in range(3):
            assert await shared.decide([(RPM, 1)], []) is None
    said = [r for r in caplog.records if "did not decide" in r.getMessage()]
    assert len(said) == 1 and said[0].fields["undecided"] == 1  # type: ignore[attr-defined]
    mock_clock.jump(10)
    assert await shared.decide([(RPM, 1)], []) is None
    said = [r for r in caplog.records if "did not decide" in r.getMessage()]
    assert len(said) == 2 and said[1].fields["undecided"] == 3  # type: ignore[attr-defined]
    await shared.store.client.aclose()


async def test_script_flush_costs_no_decision(redis: RedisServer) -> None:
    shared = shared_for(redis)
    assert await shared.decide([(RPM, 1)], []) is not None
    async with RedisClient.from_url(redis.url) as admin:
        assert await admin.execute("SCRIPT", "FLUSH") == b"OK"
    decision = await shared.decide([(RPM, 1)], [])
    assert decision is not None and decision.remaining(0) == 1
    await shared.store.client.aclose()


@WATCHED
async def test_a_hung_redis_gives_none_within_the_timeout_and_the_lost_hold_is_released(
    redis: RedisServer, watched: bool
) -> None:
    shared = shared_for(redis, timeout=0.2)
    assert await shared.decide([], [SLOT]) is not None  # a pooled connection
    async with watched_if(shared.store.client, watched=watched):
        with redis.paused(), trio.fail_after(GUARD):
            assert await shared.decide([], [SLOT]) is None
            assert await shared.failures() == (("redis", "unreachable"),)
    # Redis, resumed, may run the admission it had read: nobody holds that slot.
    await shared.store.heartbeat()
    assert await shared.store.in_flight(SLOT) == 1  # the first one's, still open
    assert shared.store.open_holds == 1
    await shared.store.client.aclose()


def hold_loop_until_answered(sock: socket.socket, replies: int) -> None:
    """Block (the event loop with this thread, as a busy loop would stall) until
    ``replies`` replies are waiting in ``sock``, read by peeking."""
    guard = time.monotonic() + GUARD
    while True:
        assert time.monotonic() < guard, "Redis did not answer"
        select.select([sock], [], [], GUARD)
        reader = hiredis.Reader()
        reader.feed(sock.recv(1 << 20, socket.MSG_PEEK))
        waiting = 0
        while reader.gets() is not False:
            waiting += 1
        if waiting >= replies:
            return


@WATCHED
async def test_admissions_the_loop_gets_back_to_late_are_decided_if_redis_answered(
    redis: RedisServer, mock_clock: trio.testing.MockClock, watched: bool
) -> None:
    """Twenty admissions pipelined at once; the event loop gets round to them only
    after their deadline, Redis having answered each in time: each is decided."""
    client = RedisClient.from_url(redis.url, timeout=0.05, pool_size=1)
    shared = SharedLimits(RedisLimitStore(client, prefix=f"s{next(PREFIXES)}:"), timeout=0.05)
    many = Limit("principal:key:b", "rpd", BucketSpec.per(1000, 86_400), Unit.REQUESTS)
    assert await shared.decide([(many, 1)], []) is not None  # the pooled connection
    decisions: list[object] = []

    async def admit() -> None:
        decisions.append(await shared.decide([(many, 1)], []))

    async with watched_if(client, watched=watched), trio.open_nursery() as nursery:
        with redis.paused():
            for _ in range(20):
                nursery.start_soon(admit)
            await trio.testing.wait_all_tasks_blocked()
            assert client.in_flight == 20  # every one written, none waiting in line
        hold_loop_until_answered(client._conns[0].sock, 20)
        mock_clock.jump(1.0)  # every deadline has passed when the loop looks again
    assert len(decisions) == 20 and None not in decisions
    assert shared.unavailable == 0
    await client.aclose()


async def test_an_admission_cancelled_mid_flight_takes_no_slot_for_good(
    redis: RedisServer,
) -> None:
    """The client went away while Redis had the admission but had not answered."""
    shared = shared_for(redis, timeout=5.0)
    # A pooled connection, and a hold in Redis (it has token usage to settle).
    assert await shared.decide([(TPM, 10)], []) is not None
    with redis.paused():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(shared.decide, [], [SLOT])
            # Cancelled once the admission is written and waits for its reply (a
            # real-clock deadline could pass, on a busy machine, before the write).
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    async with RedisClient.from_url(redis.url) as admin:
        assert await admin.execute("PING") == b"PONG"  # after the buffered admission
        assert await admin.execute("HLEN", shared.store.holds_key) == 2  # it ran
        assert shared.store.open_holds == 1
        await shared.store.heartbeat()
        assert await shared.store.in_flight(SLOT) == 0
        assert shared.store.released == 1
        assert await admin.execute("HLEN", shared.store.holds_key) == 1  # the first
    await shared.store.client.aclose()


async def test_a_short_stall_of_redis_costs_a_slot_about_a_second_not_a_third_of_the_lease(
    redis: RedisServer, mock_clock: trio.testing.MockClock
) -> None:
    """Redis stalls while a request ends: its settlement fails and waits in the
    store. The heartbeat, asleep for a third of the lease (100 s here), beats
    within a second instead; so does it after an admission whose reply was lost."""
    client = RedisClient.from_url(redis.url, timeout=0.05, backoff_min=1e-3, backoff_max=1e-3)
    store = RedisLimitStore(client, prefix=f"s{next(PREFIXES)}:", lease=300.0)
    shared = SharedLimits(store, timeout=0.05, settlers=1)

    async def until(done: Callable[[], object]) -> None:
        # The beat talks to a real Redis: let the loop run until it has (the mock
        # clock stands still, so a deadline would never fire: bounded instead).
        for _ in range(100_000):
            if done():
                return
            await trio.testing.wait_all_tasks_blocked()
        raise AssertionError("never happened")

    async def napping() -> trio.CancelScope:
        await until(lambda: shared._nap is not None)
        assert shared._nap is not None
        return shared._nap

    async with running(shared):
        decision = await shared.decide([], [SLOT])
        assert decision is not None and decision.hold is not None
        assert (await napping()).deadline == trio.current_time() + 100
        with redis.paused():
            shared.settle(decision.hold, 0)
            await trio.testing.wait_all_tasks_blocked()  # written, waiting for Redis
            mock_clock.jump(0.06)  # past the timeout: the settlement fails
            await until(lambda: store.pending)
            assert (await napping()).deadline == trio.current_time() + 1
        mock_clock.jump(1)  # the beat settles it
        await until(lambda: not store.pending)
        assert await store.in_flight(SLOT) == 0
        assert (await napping()).deadline == trio.current_time() + 100  # calm again
        with redis.paused():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(shared.decide, [], [SLOT])
                await trio.testing.wait_all_tasks_blocked()
                mock_clock.jump(0.06)  # its reply is lost: Redis may have the hold
        assert shared.unavailable == 1
        assert (await napping()).deadline == trio.current_time() + 1
        mock_clock.jump(1)  # the beat releases the hold the admission left
        await until(lambda: store.released)
        assert await store.in_flight(SLOT) == 0


async def test_overflowing_settlements_are_bounded_and_still_return_their_slots(
    redis: RedisServer,
) -> None:
    shared = shared_for(redis, queue=1, max_pending=1)
    slot = ConcurrencyLimit("principal:key:b", 10)
    holds = []
    for _ in range(4):
        decision = await shared.decide([(TPM, 100)], [slot])
        assert decision is not None and decision.hold is not None
        holds.append(decision.hold)
    for hold in holds[:3]:  # no settler runs: one queued, one pending, one given up
        shared.settle(hold, 10)
    assert shared.store.pending == 1 and shared.store.given_up == 1
    async with running(shared):
        with trio.fail_after(GUARD):
            await shared.wait_settled()
        # The run's own heartbeat may be half-way through the same work: beat until
        # the given-up hold is released (by either), then check it was released once.
        with trio.fail_after(GUARD):
            while shared.store.pending or shared.store.released < 1:
                await shared.store.heartbeat()
        assert shared.store.pending == 0 and shared.store.released == 1
        assert await shared.store.in_flight(slot) == 1  # the fourth, still open
        shared.settle(holds[3], 0)
        with trio.fail_after(GUARD):
            await shared.wait_settled()
        assert await shared.store.in_flight(slot) == 0
    # Two settled with usage (90 back each), one given up (its 100 count as used).
    probe = await shared.decide([(TPM, 1)], [])
    assert probe is not None and probe.remaining(0) == 1000 - 100 - 10 - 10 - 0 - 1
    await shared.store.client.aclose()


async def test_settlements_left_at_shutdown_are_flushed(redis: RedisServer) -> None:
    shared = shared_for(redis)
    decision = await shared.decide([], [SLOT])
    assert decision is not None and decision.hold is not None
    async with trio.open_nursery() as nursery:
        await nursery.start(shared.run)
        shared.settle(decision.hold, 0)
        nursery.cancel_scope.cancel()  # before any settler ran
    store = RedisLimitStore(RedisClient.from_url(redis.url), prefix=shared.store.prefix)
    assert await store.in_flight(SLOT) == 0
    await store.client.aclose()


async def test_a_taken_port_is_replaced_by_a_free_one(monkeypatch: pytest.MonkeyPatch) -> None:
    with redis_server() as first:
        ports = iter([first.port])
        monkeypatch.setattr(redis_server_module, "free_port", lambda: next(ports, free_port()))
        server = RedisServer()
        assert server.port == first.port
        server.start()
        try:
            assert server.port != first.port and server.running
            async with RedisClient.from_url(server.url) as client:
                assert await client.execute("PING") == b"PONG"
        finally:
            server.kill()
        assert not server.running


def test_a_fixed_port_that_stays_taken_is_an_error() -> None:
    with redis_server() as first:
        server = RedisServer(first.port)
        with pytest.raises(RuntimeError, match="no free port"):
            server.start()


async def test_readyz_names_redis_while_it_is_unreachable(redis: RedisServer) -> None:
    backend = ScriptedBackend(ScriptedSettings(models=("s",)))
    gateway = Gateway(
        routes=[ModelRoute("s", "scripted", capabilities=backend._settings.capabilities("s"))],
        keys=key_table(),
        backends=[BackendPolicy(name="scripted")],
    )
    shared = shared_for(redis, timeout=0.2)
    driver = Driver(gateway, {"scripted": backend}, ready_cache=0.0, shared_limits=shared)
    async with in_memory(driver) as connect, running(shared):
        client = await connect()
        await client.request(method="GET", target="/readyz")
        assert (await client.response())[0] == 200
        redis.kill()
        with trio.fail_after(GUARD):
            await client.request(method="GET", target="/readyz")
            status, headers, body = await client.response()
        assert status == 503
        # Named as what it is (not a backend), without its error's text.
        assert orjson.loads(body) == {"status": "unavailable", "redis": "unavailable"}
        assert int(headers[b"retry-after"]) >= 1 and int(headers[b"retry-after-ms"]) >= 1
        redis.restart()
        await client.request(method="GET", target="/readyz")
        assert (await client.response())[0] == 200


async def test_readyz_polled_while_redis_is_down_logs_the_change_once(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A load balancer polls /readyz (uncached here); with "local" and Redis down
    every answer is 200 degraded, and the change is logged once each way."""
    backend = ScriptedBackend(ScriptedSettings(models=("s",)))
    gateway = Gateway(
        routes=[ModelRoute("s", "scripted", capabilities=backend._settings.capabilities("s"))],
        keys=key_table(),
        backends=[BackendPolicy(name="scripted")],
        shared_limits=True,
        on_limits_failure="local",
    )
    shared = shared_for(redis, timeout=0.2)
    driver = Driver(gateway, {"scripted": backend}, ready_cache=0.0, shared_limits=shared)

    def readiness_logs() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "ostiary.driver"]

    caplog.set_level("INFO", logger="ostiary.driver")
    async with in_memory(driver) as connect, running(shared):
        client = await connect()
        redis.kill()
        for _ in range(5):
            with trio.fail_after(GUARD):
                await client.request(method="GET", target="/readyz")
                status, _, body = await client.response()
            assert status == 200
            assert orjson.loads(body)["status"] == "degraded"
        assert readiness_logs() == ["redis unavailable; limits counted locally"]
        redis.restart()
        for _ in range(3):
            await client.request(method="GET", target="/readyz")
            assert (await client.response())[0] == 200
        assert readiness_logs() == ["redis unavailable; limits counted locally", "ready again"]


async def test_failed_authentications_are_counted_across_replicas(redis: RedisServer) -> None:
    """Two replicas sharing Redis, a budget of 3 failed authentications per address:
    after 3 on one replica, the other refuses the address as soon as it fails there
    once (it learns the shared deficit from that 401), not after 3 more."""
    prefix = f"s{next(PREFIXES)}:"

    def replica() -> tuple[Driver, SharedLimits]:
        backend = ScriptedBackend(ScriptedSettings(models=("s",)))
        gateway = Gateway(
            routes=[ModelRoute("s", "scripted", capabilities=backend._settings.capabilities("s"))],
            keys=key_table(),
            backends=[BackendPolicy(name="scripted")],
            access=AccessPolicy(failed_auth_per_minute=3),
            shared_limits=True,
        )
        client = RedisClient.from_url(redis.url, timeout=0.5)
        shared = SharedLimits(RedisLimitStore(client, prefix=prefix), timeout=0.5, settlers=2)
        return Driver(gateway, {"scripted": backend}, shared_limits=shared), shared

    (one, one_shared), (two, two_shared) = replica(), replica()

    async def attempt(connect: Connect, shared: SharedLimits) -> int:
        client = await connect("198.51.100.7")
        await client.request("GET", "/v1/models", authorization="Bearer ost_wrong")
        status = (await client.response())[0]
        with trio.fail_after(GUARD):
            await shared.wait_settled()  # the 401 counted in Redis, its deficit back
        return status

    async with (
        in_memory(one) as connect_one,
        in_memory(two) as connect_two,
        running(one_shared),
        running(two_shared),
    ):
        assert [await attempt(connect_one, one_shared) for _ in range(3)] == [401] * 3
        assert await attempt(connect_one, one_shared) == 429
        assert await attempt(connect_two, two_shared) == 401  # its first here...
        assert await attempt(connect_two, two_shared) == 429  # ...and the budget is spent
        # Another address is unaffected on either replica.
        client = await connect_two("203.0.113.9")
        await client.request("GET", "/v1/models", authorization="Bearer ost_wrong")
        assert (await client.response())[0] == 401
