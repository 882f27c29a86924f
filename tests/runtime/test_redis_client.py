"""The Redis client's pool: waiting calls carried together, and nobody left hanging."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio

from ostiary.runtime.redis_client import RedisClient, RedisUnavailableError

from .redis_server import RedisServer, redis_server

GUARD = 10  # seconds: a guard against hangs, never a timing assertion


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


async def clients(client: RedisClient) -> int:
    info = (await client.execute("INFO", "clients")).decode()
    return int(info.split("connected_clients:")[1].split()[0])


async def test_more_callers_than_connections_each_get_their_own_reply(
    redis: RedisServer,
) -> None:
    replies: list[int] = []
    async with RedisClient.from_url(redis.url, timeout=GUARD, pool_size=2) as client:

        async def incr() -> None:
            replies.append(await client.execute("INCR", "n"))
            (many,) = await client.pipeline([("INCRBY", "m", 2)])
            replies.append(-many)

        async with trio.open_nursery() as nursery:
            for _ in range(150):  # more than MAX_BATCH wait at once
                nursery.start_soon(incr)
        assert sorted(r for r in replies if r > 0) == list(range(1, 151))
        assert sorted(-r for r in replies if r < 0) == list(range(2, 301, 2))
        assert await clients(client) <= 2 + 1  # the pool, and the one asking


async def test_a_batch_cut_short_fails_the_calls_it_carried(redis: RedisServer) -> None:
    """The newest waiting call carries the others; each carried call keeps its own
    deadline, and those still waiting when the carrier is cut short fail."""
    async with RedisClient.from_url(redis.url, timeout=GUARD, pool_size=1) as client:
        assert await client.execute("PING") == b"PONG"
        outcome: dict[str, object] = {}

        async def call(name: str, within: float, started: trio.Event) -> None:
            with trio.move_on_after(within) as scope:
                started.set()
                try:
                    outcome[name] = await client.execute("PING")
                except RedisUnavailableError as exc:
                    outcome[name] = str(exc)
            if scope.cancelled_caught:
                outcome[name] = "timed out"

        with redis.paused(), trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                # a holds the connection; b, d, c wait in that order; c is the newest.
                for name, within in (("a", 0.2), ("b", 0.4), ("d", GUARD), ("c", 0.6)):
                    started = trio.Event()
                    nursery.start_soon(call, name, within, started)
                    await started.wait()
        # a timed out; c was handed the connection and carried b and d; b timed out on
        # its own deadline, then c timed out, and d (with time left) failed with it.
        assert outcome == {"a": "timed out", "b": "timed out", "c": "timed out", "d": outcome["d"]}
        assert "cut short" in str(outcome["d"])
        assert await client.execute("PING") == b"PONG"


@pytest.mark.parametrize("callers", [5, 40])
async def test_waiting_calls_that_time_out_leave_the_line(redis: RedisServer, callers: int) -> None:
    """Deadlines that pass together: a call handed the connection (or a batch) after
    its deadline passed, but before it ran, passes both on; nothing is leaked."""
    async with RedisClient.from_url(redis.url, timeout=0.2, pool_size=1) as client:
        failures: list[str] = []

        async def ping() -> None:
            try:
                await client.execute("PING")
            except RedisUnavailableError as exc:
                failures.append(str(exc))

        for _ in range(3):
            assert await client.execute("PING") == b"PONG"
            failures.clear()
            with redis.paused(), trio.fail_after(GUARD):
                async with trio.open_nursery() as nursery:
                    for _ in range(callers):
                        nursery.start_soon(ping)
            assert len(failures) == callers
            assert client._busy == 0 and not client._waiting
        assert await client.execute("PING") == b"PONG"
