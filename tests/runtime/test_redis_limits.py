"""The Redis limit store against the core's math, on a real private redis-server."""

from __future__ import annotations

import itertools
import os
import signal
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hiredis
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from ostiary.protocol.buckets import BucketSpec, ConcurrencyLimit, Limit, Unit
from ostiary.protocol.limits import Decision, Hold, MemoryLimitStore
from ostiary.runtime import redis_limits
from ostiary.runtime.config import RedisSettings
from ostiary.runtime.redis_client import RedisAddress, RedisClient
from ostiary.runtime.redis_limits import ADMIT, LimiterUnavailableError, RedisLimitStore
from ostiary.runtime.resp import RedisReplyError, RedisUnavailableError, Script

from .redis_server import RedisServer, free_port, redis_server

GUARD = 10  # seconds: a guard against hangs, never a timing assertion
T0 = 1_700_000_000_000  # a realistic Redis clock, in ms
PREFIXES = itertools.count()


@pytest.fixture(scope="module")
def shared_redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


def client_for(server: RedisServer, **kwargs: float) -> RedisClient:
    return RedisClient.from_url(server.url, timeout=kwargs.pop("timeout", 2.0), **kwargs)


def same(memory: Decision, redis: Decision) -> None:
    assert redis.allowed == memory.allowed
    assert redis.deficits == memory.deficits
    assert redis.refusal == memory.refusal
    for i in range(len(memory.charges)):
        assert (redis.remaining(i), redis.reset_ms(i)) == (memory.remaining(i), memory.reset_ms(i))


SHAPES = st.lists(
    st.tuples(st.integers(1, 12), st.integers(1, 5000), st.sampled_from(Unit)),
    min_size=1,
    max_size=4,
)
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("advance"), st.one_of(st.integers(0, 50), st.integers(0, 20_000))),
        st.tuples(
            st.just("admit"),
            st.lists(st.integers(0, 3), min_size=1, max_size=4, unique=True),
            st.lists(st.integers(0, 1), max_size=2, unique=True),
            st.integers(0, 14),
        ),
        st.tuples(st.just("settle"), st.integers(0, 100), st.integers(0, 30)),
        st.tuples(st.just("refund"), st.integers(0, 100)),
    ),
    min_size=10,
    max_size=60,
)


@settings(max_examples=100, deadline=None)
@given(shapes=SHAPES, slot_limits=st.lists(st.integers(1, 3), max_size=2), ops=OPS)
async def test_lua_and_python_decide_identically(
    shared_redis: RedisServer,
    shapes: list[tuple[int, int, Unit]],
    slot_limits: list[int],
    ops: list[tuple[object, ...]],
) -> None:
    limits = [
        Limit(f"layer{i % 2}", f"d{i}", BucketSpec(c, w), u) for i, (c, w, u) in enumerate(shapes)
    ]
    slots = [ConcurrencyLimit(f"slot{j}", n) for j, n in enumerate(slot_limits)]
    memory = MemoryLimitStore()
    async with client_for(shared_redis) as client:
        redis = RedisLimitStore(client, prefix=f"t{next(PREFIXES)}:")
        now = T0
        holds: list[tuple[Hold, Hold]] = []
        for op in ops:
            match op:
                case ("advance", int(dt)):
                    now += dt
                case ("admit", list(picks), list(slot_picks), int(tokens)):
                    chosen = sorted({limits[p % len(limits)] for p in picks}, key=str)
                    charges = [(lm, tokens if lm.unit is Unit.TOKENS else 1) for lm in chosen]
                    held = [slots[j % len(slots)] for j in slot_picks] if slots else []
                    held = list(dict.fromkeys(held))
                    m = memory.admit(charges, held, now / 1000)
                    r = await redis.admit(charges, held, now_ms=now)
                    same(m, r)
                    if m.hold is not None and r.hold is not None:
                        holds.append((m.hold, r.hold))
                case ("settle" | "refund", int(k), *actual) if holds:
                    m_hold, r_hold = holds.pop(k % len(holds))
                    used = actual[0] if actual else 0
                    assert isinstance(used, int)
                    assert memory.settle(m_hold, used, now / 1000)
                    assert await redis.settle(r_hold, used, now_ms=now)
                    assert not await redis.settle(r_hold, used, now_ms=now)
        for limit in limits:
            assert await redis.deficit(limit, now) == memory.deficit(limit, now / 1000)
        for m_hold, r_hold in holds:
            memory.refund(m_hold, now / 1000)
            await redis.refund(r_hold, now_ms=now)
        for slot in slots:
            assert await redis.in_flight(slot) == memory.in_flight(slot.layer) == 0
        assert redis.open_holds == 0


async def test_redis_clock_is_used_without_an_explicit_now(shared_redis: RedisServer) -> None:
    rpm = Limit("principal:key:a", "rpm", BucketSpec.per(2, 60), Unit.REQUESTS)
    async with client_for(shared_redis) as client:
        store = RedisLimitStore(client, prefix=f"t{next(PREFIXES)}:")
        assert (await store.admit([(rpm, 1)], [])).allowed
        assert (await store.admit([(rpm, 1)], [])).allowed
        refused = await store.admit([(rpm, 1)], [])
        assert refused.refusal is not None and refused.refusal.retry_after_ms is not None
        assert 0 < refused.refusal.retry_after_ms <= 30_000
        ttl = await client.execute("PTTL", store.bucket_key(rpm))
        assert 61_000 <= ttl <= 62_000  # gone once full again (a second or two)


async def test_a_limit_changed_by_a_reload_is_a_new_bucket_as_in_memory(
    shared_redis: RedisServer,
) -> None:
    before = Limit("principal:key:a", "rpm", BucketSpec.per(7, 60), Unit.REQUESTS)
    after = Limit("principal:key:a", "rpm", BucketSpec.per(6, 60), Unit.REQUESTS)
    memory = MemoryLimitStore()
    async with client_for(shared_redis) as client:
        redis = RedisLimitStore(client, prefix=f"t{next(PREFIXES)}:")
        assert redis.bucket_key(before) != redis.bucket_key(after)
        for limit, passes in ((before, 7), (after, 6)):
            for i in range(passes + 1):
                m = memory.admit([(limit, 1)], [], T0 / 1000)
                r = await redis.admit([(limit, 1)], [], now_ms=T0)
                same(m, r)
                assert m.allowed == (i < passes)


async def test_script_flush_mid_run_reloads_the_scripts(shared_redis: RedisServer) -> None:
    rpm = Limit("p", "rpm", BucketSpec.per(10, 60), Unit.REQUESTS)
    tpm = Limit("p", "tpm", BucketSpec.per(100, 60), Unit.TOKENS)
    slot = ConcurrencyLimit("p", 2)
    async with client_for(shared_redis) as client:
        store = RedisLimitStore(client, prefix=f"t{next(PREFIXES)}:")
        first = await store.admit([(rpm, 1), (tpm, 50)], [slot], now_ms=T0)
        assert first.hold is not None
        assert await client.execute("SCRIPT", "FLUSH") == b"OK"
        assert await store.settle(first.hold, 20, now_ms=T0)
        assert await client.execute("SCRIPT", "FLUSH") == b"OK"
        second = await store.admit([(rpm, 1), (tpm, 50)], [slot], now_ms=T0)
        assert second.allowed and second.remaining(0) == 8 and second.remaining(1) == 30


async def test_a_dead_replicas_slots_are_reclaimed_once_its_lease_expires(
    shared_redis: RedisServer,
) -> None:
    slot = ConcurrencyLimit("principal:key:a", 1)
    async with client_for(shared_redis) as client:
        prefix = f"t{next(PREFIXES)}:"
        dead = RedisLimitStore(client, prefix=prefix, replica="dead", lease=60.0)
        alive = RedisLimitStore(client, prefix=prefix, replica="alive", lease=60.0)
        held = await dead.admit([], [slot], now_ms=T0)
        assert held.hold is not None
        assert (await alive.admit([], [slot], now_ms=T0)).refusal is not None
        await dead.heartbeat()  # a heartbeat renews the lease: still refused
        assert (await alive.admit([], [slot], now_ms=T0)).refusal is not None
        await client.execute("DEL", dead.holds_key)  # as when its lease runs out
        reclaimed = await alive.admit([], [slot], now_ms=T0)
        assert reclaimed.hold is not None
        assert await alive.in_flight(slot) == 1
        # The dead replica, back after all, settles without eating alive's slot.
        assert await dead.settle(held.hold, 0, now_ms=T0)
        assert await alive.in_flight(slot) == 1
        assert await alive.settle(reclaimed.hold, 0, now_ms=T0)
        assert await alive.in_flight(slot) == 0


async def test_a_replica_whose_own_lease_lapsed_drops_its_stale_counts(
    shared_redis: RedisServer,
) -> None:
    """Its own admission finds its holds hash gone: the counts it had are dropped
    (their holds were reclaimed), the new hold is counted and leased again."""
    slot = ConcurrencyLimit("principal:key:a", 1)
    async with client_for(shared_redis) as client:
        store = RedisLimitStore(client, prefix=f"t{next(PREFIXES)}:", lease=60.0)
        old = await store.admit([], [slot], now_ms=T0)
        assert old.hold is not None
        assert (await store.admit([], [slot], now_ms=T0)).refusal is not None  # renews
        assert 0 < await client.execute("PTTL", store.holds_key) <= 60_000
        await client.execute("DEL", store.holds_key)  # as when its lease runs out
        new = await store.admit([], [slot], now_ms=T0)
        assert new.hold is not None
        assert await store.in_flight(slot) == 1
        assert 0 < await client.execute("PTTL", store.holds_key) <= 60_000
        assert await store.settle(old.hold, 0, now_ms=T0)  # reclaimed: changes nothing
        assert await store.in_flight(slot) == 1
        assert await store.settle(new.hold, 0, now_ms=T0)
        assert await store.in_flight(slot) == 0


async def test_a_hold_of_request_buckets_alone_is_not_kept_in_redis(
    shared_redis: RedisServer,
) -> None:
    rpm = Limit("principal:key:a", "rpm", BucketSpec.per(10, 60), Unit.REQUESTS)
    tpm = Limit("principal:key:a", "tpm", BucketSpec.per(100, 60), Unit.TOKENS)
    async with client_for(shared_redis) as client:
        store = RedisLimitStore(client, prefix=f"t{next(PREFIXES)}:")
        requests = await store.admit([(rpm, 1)], [], now_ms=T0)
        assert requests.hold is not None
        assert await client.execute("HLEN", store.holds_key) == 0
        tokens = await store.admit([(rpm, 1), (tpm, 10)], [], now_ms=T0)
        assert tokens.hold is not None
        assert await client.execute("HLEN", store.holds_key) == 1
        assert await store.settle(requests.hold, 0, now_ms=T0)
        assert not await store.settle(requests.hold, 0, now_ms=T0)
        assert await store.settle(tokens.hold, 4, now_ms=T0)
        assert await client.execute("HLEN", store.holds_key) == 0
        assert await store.deficit(rpm, T0) == 2 * rpm.spec.per_token  # not refunded
        assert await store.deficit(tpm, T0) == 4 * tpm.spec.per_token


async def test_a_killed_redis_raises_the_limiter_error_then_recovers(
    own_redis: RedisServer,
) -> None:
    rpm = Limit("p", "rpm", BucketSpec.per(10, 60), Unit.REQUESTS)
    slot = ConcurrencyLimit("p", 5)
    async with client_for(own_redis, timeout=0.5, backoff_min=1e-6, backoff_max=1e-6) as client:
        store = RedisLimitStore(client, prefix="k:")
        held = await store.admit([(rpm, 1)], [slot], now_ms=T0)
        assert held.hold is not None
        own_redis.kill()
        with trio.fail_after(5):  # a guard against a hang, not a timing assertion
            with pytest.raises(LimiterUnavailableError):
                await store.admit([(rpm, 1)], [slot], now_ms=T0)
            with pytest.raises(LimiterUnavailableError):
                await store.settle(held.hold, 0, now_ms=T0)
        own_redis.start()  # an empty Redis, without the scripts
        again = await store.admit([(rpm, 1)], [slot], now_ms=T0)
        assert again.allowed and again.remaining(0) == 9
        await store.heartbeat()  # retries the settlement that failed
        assert await store.in_flight(slot) == 1
        assert again.hold is not None and await store.refund(again.hold)
        assert await store.in_flight(slot) == 0


async def test_a_hung_redis_times_out_with_the_limiter_error(own_redis: RedisServer) -> None:
    rpm = Limit("p", "rpm", BucketSpec.per(10, 60), Unit.REQUESTS)
    async with client_for(own_redis, timeout=0.1) as client:
        store = RedisLimitStore(client, prefix="h:")
        assert (await store.admit([(rpm, 1)], [], now_ms=T0)).allowed
        assert own_redis.process is not None
        os.kill(own_redis.process.pid, signal.SIGSTOP)
        try:
            with trio.fail_after(5), pytest.raises(LimiterUnavailableError, match="within"):
                await store.admit([(rpm, 1)], [], now_ms=T0)
        finally:
            os.kill(own_redis.process.pid, signal.SIGCONT)
        assert (await store.admit([(rpm, 1)], [], now_ms=T0)).allowed


async def test_a_refused_connect_backs_off_before_trying_again() -> None:
    client = RedisClient(RedisAddress(port=free_port()), backoff_min=30.0)
    with pytest.raises(RedisUnavailableError, match="cannot connect"):
        await client.execute("PING")
    with pytest.raises(RedisUnavailableError, match="waiting to reconnect"):
        await client.execute("PING")


async def test_pipelines_scripts_and_error_replies(shared_redis: RedisServer) -> None:
    async with client_for(shared_redis) as client:
        replies = await client.pipeline([("SET", "p:x", 41), ("INCR", "p:x"), ("LPOP", "p:x")])
        assert replies[:2] == [b"OK", 42] and isinstance(replies[2], RedisReplyError)
        with pytest.raises(RedisReplyError, match="WRONGTYPE"):
            await client.execute("LPOP", "p:x")
        script = Script("return {KEYS[1], ARGV[1] + 1}")
        assert await client.evalsha(script, ["k"], [1]) == [b"k", 2]
        with pytest.raises(RedisReplyError, match=r"Unknown (Redis )?command"):
            await client.evalsha(Script("return redis.call('NOPE')"), [], [])
        async with trio.open_nursery() as nursery:  # more callers than connections
            for i in range(12):
                nursery.start_soon(client.execute, "INCR", f"p:n{i % 3}")
        assert await client.execute("MGET", "p:n0", "p:n1", "p:n2") == [b"4", b"4", b"4"]


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("redis://127.0.0.1:6380/2", RedisAddress("127.0.0.1", 6380, 2)),
        ("redis://:s%40cret@db.local", RedisAddress("db.local", 6379, 0, None, "s@cret")),
        ("redis://me:pw@h:1/0", RedisAddress("h", 1, 0, "me", "pw")),
        ("unix:///run/redis.sock", RedisAddress(path="/run/redis.sock")),
        (
            "unix://:pw@/run/redis%20x.sock?db=3",
            RedisAddress(db=3, password="pw", path="/run/redis x.sock"),
        ),
        (
            "redis+unix://me:pw@/r.sock?db=0",
            RedisAddress(username="me", password="pw", path="/r.sock"),
        ),
    ],
)
def test_urls(url: str, address: RedisAddress) -> None:
    assert RedisAddress.from_url(url) == address
    assert RedisSettings(url=url).url == url  # the config takes what the client takes


@pytest.mark.parametrize(
    "url",
    [
        "http://h",
        "redis://h/x",
        "unix://run/redis.sock",  # a host, not a path
        "unix:///r.sock?db=x",
        "unix:///r.sock?timeout=1",
        "unix:///r.sock?db=1&db=2",
    ],
)
def test_bad_urls(url: str) -> None:
    with pytest.raises(ValueError, match="Redis URL"):
        RedisAddress.from_url(url)
    with pytest.raises(ValueError, match="url must look like"):
        RedisSettings(url=url)


async def test_a_unix_socket_is_spoken_to_as_tcp_is(tmp_path: Path) -> None:
    """Database and password carried over a Unix socket as over TCP; a socket
    nobody listens on is Redis being down."""
    sock = str(tmp_path / "redis.sock")
    with redis_server(unix_socket=sock) as server:
        async with RedisClient.from_url(server.unix_url, timeout=GUARD) as client:
            await client.execute("CONFIG", "SET", "requirepass", "pw")
        async with RedisClient.from_url(f"unix://:pw@{sock}?db=2", timeout=GUARD) as client:
            assert await client.execute("SET", "u", 1) == b"OK"
            info = (await client.execute("CLIENT", "INFO")).decode()
            assert f"addr={sock}:" in info and " db=2 " in info
        async with RedisClient.from_url(f"redis://:pw@127.0.0.1:{server.port}/2") as client:
            assert await client.execute("GET", "u") == b"1"  # the same database
    async with RedisClient.from_url(f"unix://{sock}", timeout=GUARD) as client:
        with pytest.raises(RedisUnavailableError, match="cannot connect"):
            await client.execute("PING")


async def test_a_password_is_sent_on_connect(own_redis: RedisServer) -> None:
    async with client_for(own_redis) as client:
        await client.execute("CONFIG", "SET", "requirepass", "pw")
    url = f"redis://:pw@127.0.0.1:{own_redis.port}/3"
    async with RedisClient.from_url(url) as client:
        assert await client.execute("SET", "a", 1) == b"OK"
    async with client_for(own_redis) as client:
        with pytest.raises(RedisReplyError, match="NOAUTH"):
            await client.execute("GET", "a")


async def test_calls_whose_replies_were_lost_are_reconciled_once(own_redis: RedisServer) -> None:
    """A timed-out admission may have taken its slot, a timed-out settlement may have
    been applied: the heartbeat undoes the one and retries the other, exactly once.
    (On Redis' clock, as the heartbeat is: a day's bucket refills no whole token here.)"""
    tpd = Limit("p", "tpd", BucketSpec.per(100, 86_400), Unit.TOKENS)
    slot = ConcurrencyLimit("p", 1)
    assert own_redis.process is not None
    pid = own_redis.process.pid
    async with client_for(own_redis, timeout=0.2) as client:
        store = RedisLimitStore(client, prefix="r:")
        settled = await store.admit([(tpd, 60)], [slot])
        assert settled.hold is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(LimiterUnavailableError):
                await store.settle(settled.hold, 10)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert await client.execute("PING") == b"PONG"
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(LimiterUnavailableError):
                await store.admit([(tpd, 5)], [slot])
        finally:
            os.kill(pid, signal.SIGCONT)
        assert await client.execute("PING") == b"PONG"
        await store.heartbeat()
        assert await store.in_flight(slot) == 0
        assert await client.execute("HLEN", store.holds_key) == 0
        # 60 reserved, 10 used: 50 back, once; a lost admission's 5 may stay debited.
        again = await store.admit([(tpd, 1)], [slot])
        assert again.allowed and again.remaining(0) in (100 - 11, 100 - 16)


class LossyClient(RedisClient):
    """Runs scripts, then loses the reply once (as a timeout after the fact would)."""

    lose_next = False

    async def evalsha_packed(
        self, script: Script, payload: bytes, *, deadline: float | None = None, resend: bool = True
    ) -> Any:
        reply = await super().evalsha_packed(script, payload, deadline=deadline, resend=resend)
        if self.lose_next:
            self.lose_next = False
            raise RedisUnavailableError("the reply was lost")
        return reply


async def test_an_admission_whose_reply_was_lost_gives_its_slots_back(
    shared_redis: RedisServer,
) -> None:
    # Layer values may hold any character, the record's own separators included.
    slot = ConcurrencyLimit("p", 1)
    odd = ConcurrencyLimit("model:é:12:}{x}\n", 1)
    client = LossyClient(RedisAddress(port=shared_redis.port), timeout=2.0)
    async with client:
        store = RedisLimitStore(client, prefix=f"t{next(PREFIXES)}:")
        client.lose_next = True
        with pytest.raises(LimiterUnavailableError):
            await store.admit([], [slot, odd], now_ms=T0)
        assert await store.in_flight(slot) == await store.in_flight(odd) == 1  # taken
        assert (await store.admit([], [slot], now_ms=T0)).refusal is not None
        await store.heartbeat()
        assert await store.in_flight(slot) == await store.in_flight(odd) == 0
        assert store.released == 1
        assert (await store.admit([], [odd, slot], now_ms=T0)).allowed


async def test_a_redis_restart_between_calls_costs_no_failed_call(own_redis: RedisServer) -> None:
    """The pooled connections died with the old server; the scripts are unknown to the
    new one: the next call reconnects and reloads them, and succeeds."""
    rpm = Limit("p", "rpm", BucketSpec.per(10, 60), Unit.REQUESTS)
    async with client_for(own_redis) as client:
        store = RedisLimitStore(client, prefix="s:")
        async with trio.open_nursery() as nursery:  # several pooled connections
            for _ in range(3):
                nursery.start_soon(store.admit, [(rpm, 1)], [])
        own_redis.kill()
        own_redis.start()
        decision = await store.admit([(rpm, 1)], [], now_ms=T0)
        assert decision.allowed and decision.remaining(0) == 9
        assert await client.execute("PING") == b"PONG"


class ReplyDroppingProxy:
    """A TCP relay to Redis that, when told, lets Redis carry out the next command
    and then breaks the client's connection instead of passing the reply on (as a
    link that fails at the worst moment)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.drop_next = False
        self.dropped = 0

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._relay, listeners)

    async def _relay(self, client: trio.SocketStream) -> None:
        redis = await trio.open_tcp_stream("127.0.0.1", self.target)
        async with client, redis, trio.open_nursery() as nursery:

            async def up() -> None:
                async for data in client:
                    await redis.send_all(data)
                nursery.cancel_scope.cancel()

            async def down() -> None:
                async for data in redis:
                    if self.drop_next:
                        self.drop_next = False
                        self.dropped += 1
                        break  # Redis has answered; the client never hears it
                    await client.send_all(data)
                nursery.cancel_scope.cancel()

            nursery.start_soon(up)
            nursery.start_soon(down)


@pytest.mark.parametrize("kept", [True, False])
async def test_an_admission_sent_again_after_a_broken_link_counts_once(
    shared_redis: RedisServer, kept: bool
) -> None:
    """A pooled connection breaks after Redis admitted the request: the client sends
    it again on a fresh one, and a kept hold (its slot) is not taken twice. A hold of
    request buckets alone has no record to find: its request may count twice."""
    rpm = Limit("p", "rpm", BucketSpec.per(10, 60), Unit.REQUESTS)
    slot = ConcurrencyLimit("p", 5)
    proxy = ReplyDroppingProxy(shared_redis.port)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(proxy.serve)
        async with RedisClient(RedisAddress(port=port), timeout=2.0, pool_size=1) as client:
            store = RedisLimitStore(client, prefix=f"t{next(PREFIXES)}:")
            warm = await store.admit([], [ConcurrencyLimit("other", 1)], now_ms=T0)
            assert warm.hold is not None  # the script is loaded, the connection used
            assert await store.refund(warm.hold, now_ms=T0)
            proxy.drop_next = True
            decision = await store.admit([(rpm, 1)], [slot] if kept else [], now_ms=T0)
            assert proxy.dropped == 1
            assert decision.allowed and decision.hold is not None
            assert decision.remaining(0) == (9 if kept else 8)
            if kept:
                assert await store.in_flight(slot) == 1
                assert await store.refund(decision.hold, now_ms=T0)
                assert await store.in_flight(slot) == 0
            await store.heartbeat()  # nothing is left to reconcile
            assert store.released == 0
        nursery.cancel_scope.cancel()


class PayloadClient(RedisClient):
    """Keeps the admission commands as packed, and answers as if admitted."""

    def __init__(self) -> None:
        super().__init__(RedisAddress(), timeout=1.0)
        self.payloads: list[bytes] = []

    async def evalsha_packed(
        self, script: Script, payload: bytes, *, deadline: float | None = None, resend: bool = True
    ) -> Any:
        self.payloads.append(payload)
        return [1, 0, 0, 0]


async def test_the_admission_is_packed_as_hiredis_would_pack_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The command is assembled from pieces kept per limit (a few only, here, so
    that they are dropped and packed afresh too): it is the command the script's
    arguments make, byte for byte, whatever the layers' names hold."""
    monkeypatch.setattr(redis_limits, "_PACKED", 2)
    limits = [
        Limit("principal:key:é", "rpm", BucketSpec.per(10, 60), Unit.REQUESTS),
        Limit("ip:::1", "tpm", BucketSpec.per(1000, 60), Unit.TOKENS),
        Limit("model:日本", "tpd", BucketSpec.per(7, 86_400), Unit.TOKENS),
    ]
    slots = [ConcurrencyLimit("principal:key:é", 2), ConcurrencyLimit("global", 5)]
    client = PayloadClient()
    store = RedisLimitStore(client, prefix="p:", replica="r1", lease=2.5)
    shapes = [(limits, slots), (limits[:1], []), (limits[1:], slots[1:]), ([], slots)]
    for charges_of, slots_of in shapes * 2:
        charges = [(limit, 900) for limit in charges_of]  # too many for the last
        decision = await store.admit(charges, slots_of, now_ms=T0)
        assert decision.hold is not None
        keys = [store.bucket_key(limit) for limit in charges_of]
        keys += [store.slot_key(slot) for slot in slots_of]
        keys.append(store.holds_key)
        recorded = bool(slots_of) or any(lm.unit is Unit.TOKENS for lm in charges_of)
        numbers = [T0, len(charges), len(slots_of), int(recorded), -1]
        for i, (limit, cost) in enumerate(charges):
            spec = limit.spec
            debit = cost * spec.per_token
            if cost > spec.capacity:
                numbers[4] = i if numbers[4] == -1 else numbers[4]
                debit = 0
            numbers += [spec.per_ms, 2 * spec.window_ms, spec.full, debit]
        numbers += [slot.limit for slot in slots_of]
        record = "".join(f"{len(k.encode())}:{k}" for k in keys[len(charges) : -1])
        blob = struct.pack(f"<{len(numbers)}d", *numbers)
        args = (blob, decision.hold.id, record, "r1", 2500, "p:holds:{")
        command: Any = ("EVALSHA", ADMIT.sha, len(keys), *keys, *args)
        expected = hiredis.pack_command(command)
        assert client.payloads.pop() == expected
