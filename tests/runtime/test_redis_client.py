"""The Redis client's pool: waiting calls carried together, and nobody left hanging."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio.testing

from ostiary.runtime.redis_client import RedisClient, RedisUnavailableError, _Connection

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
            for _ in range(150):  # far more than connections
                nursery.start_soon(incr)
        assert sorted(r for r in replies if r > 0) == list(range(1, 151))
        assert sorted(-r for r in replies if r < 0) == list(range(2, 301, 2))
        assert await clients(client) <= 2 + 1  # the pool, and the one asking


async def test_calls_given_up_from_outside_leave_the_connection_to_the_others(
    redis: RedisServer,
) -> None:
    """Calls pipelined on one connection, cancelled from outside while Redis does not
    answer: their replies are dropped when they come, in order, and the call that
    kept waiting gets its own."""
    async with RedisClient.from_url(redis.url, timeout=GUARD, pool_size=1) as client:
        assert await client.execute("PING") == b"PONG"
        outcome: dict[str, object] = {}
        ended = {name: trio.Event() for name in "abcd"}

        async def call(name: str, within: float, started: trio.Event) -> None:
            with trio.move_on_after(within) as scope:
                started.set()
                outcome[name] = await client.execute("ECHO", name)
            if scope.cancelled_caught:
                outcome[name] = "given up"
            ended[name].set()

        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                with redis.paused():
                    # a reads; b, d, c wait behind it, all on the one connection.
                    for name, within in (("a", 0.2), ("b", 0.3), ("d", GUARD), ("c", 0.4)):
                        started = trio.Event()
                        nursery.start_soon(call, name, within, started)
                        await started.wait()
                    for name in "abc":
                        await ended[name].wait()
                    assert not ended["d"].is_set()
        assert outcome == {"a": "given up", "b": "given up", "c": "given up", "d": b"d"}
        assert await client.execute("ECHO", "e") == b"e"
        assert client.in_flight == 0


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
            assert client.in_flight == 0
        assert await client.execute("PING") == b"PONG"


class _Unseen(socket.socket):
    """A socket holding bytes the event loop cannot see: already received, as when
    another task has just read them."""

    unseen = b""

    def recv(self, size: int, flags: int = 0) -> bytes:
        if self.unseen:
            data, self.unseen = self.unseen[:size], self.unseen[size:]
            return data
        return super().recv(size, flags)


def fake_redis(client: RedisClient) -> tuple[_Unseen, socket.socket]:
    """A pooled connection whose other end the test holds: (ours, Redis' end)."""
    ours, theirs = socket.socketpair()
    sock = _Unseen(fileno=ours.detach())
    sock.setblocking(False)
    client._conns.append(_Connection(sock, client._conns))
    return sock, theirs


PING = b"*1\r\n$4\r\nPING\r\n"


@pytest.mark.parametrize("answered", [True, False])
async def test_replies_already_there_when_the_deadlines_pass_are_used(
    mock_clock: trio.testing.MockClock, answered: bool
) -> None:
    """The event loop gets round to three pipelined calls only after their deadlines:
    if Redis had answered by then, each gets its reply; if not, each fails, and the
    connection is closed."""
    client = RedisClient(timeout=1.0, pool_size=1)
    _, theirs = fake_redis(client)
    outcome: list[Any] = []

    async def ping() -> None:
        try:
            outcome.append(await client.execute("PING"))
        except RedisUnavailableError as exc:
            outcome.append(type(exc))

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(ping)
        await trio.testing.wait_all_tasks_blocked()
        assert theirs.recv(1024) == PING * 3  # at once, on the one connection
        if answered:
            theirs.sendall(b"+PONG\r\n" * 3)
        mock_clock.jump(2.0)  # every deadline passes before the loop looks again
    if answered:
        assert outcome == [b"PONG"] * 3
        assert len(client._conns) == 1 and client.in_flight == 0
    else:
        assert outcome == [RedisUnavailableError] * 3
        assert not client._conns
    await client.aclose()


async def test_a_call_that_finds_the_replies_wakes_the_one_reading() -> None:
    """b, cut short from outside, finds both replies and takes its own; a, waiting for
    a socket that will not become readable again, is woken with its reply."""
    client = RedisClient(timeout=GUARD * 10, pool_size=1)
    sock, theirs = fake_redis(client)
    outcome: dict[str, Any] = {}

    async def call(name: str, scope: trio.CancelScope) -> None:
        with scope:
            outcome[name] = await client.execute("ECHO", name)

    b = trio.CancelScope()
    with trio.move_on_after(GUARD) as guard:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, "a", trio.CancelScope())
            await trio.testing.wait_all_tasks_blocked()  # a holds the read turn
            nursery.start_soon(call, "b", b)
            await trio.testing.wait_all_tasks_blocked()
            sock.unseen = b"$1\r\na\r\n$1\r\nb\r\n"
            b.cancel()
    assert not guard.cancel_called  # a was woken, not rescued by the guard
    assert outcome == {"a": b"a", "b": b"b"}
    assert theirs.recv(1024).count(b"ECHO") == 2
    assert client.in_flight == 0
    await client.aclose()
