"""The Redis client's pool: waiting calls carried together, and nobody left hanging."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from ostiary.runtime.redis_client import RedisClient
from ostiary.runtime.redis_connection import Connection
from ostiary.runtime.resp import RedisUnavailableError, Script

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
            data = self.unseen[:size]
            if not flags & socket.MSG_PEEK:
                self.unseen = self.unseen[size:]
            return data
        return super().recv(size, flags)

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        if self.unseen:
            data = self.recv(nbytes or len(buffer), flags)
            buffer[: len(data)] = data
            return len(data)
        return super().recv_into(buffer, nbytes, flags)


def fake_redis(client: RedisClient) -> tuple[_Unseen, socket.socket]:
    """A pooled connection whose other end the test holds: (ours, Redis' end)."""
    ours, theirs = socket.socketpair()
    sock = _Unseen(fileno=ours.detach())
    sock.setblocking(False)
    client._conns.append(Connection(sock, client._conns))
    return sock, theirs


PING = b"*1\r\n$4\r\nPING\r\n"


@asynccontextmanager
async def watched_or_not(
    client: RedisClient, monkeypatch: pytest.MonkeyPatch, *, watched: bool
) -> AsyncIterator[None]:
    """The client's watchdog running (and no call keeping its own deadline), or not
    (each call keeping its own)."""
    if not watched:
        yield
        return

    def unwatched(*_: object) -> None:
        raise AssertionError("a call kept its own deadline while the watchdog ran")

    monkeypatch.setattr(type(client), "_wait_unwatched", unwatched)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        yield
        nursery.cancel_scope.cancel()


WATCHED = pytest.mark.parametrize("watched", [True, False], ids=["watched", "unwatched"])


@WATCHED
@pytest.mark.parametrize("answered", [True, False])
async def test_replies_already_there_when_the_deadlines_pass_are_used(
    mock_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    answered: bool,
    watched: bool,
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

    async with watched_or_not(client, monkeypatch, watched=watched), trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(ping)
        await trio.testing.wait_all_tasks_blocked()
        assert theirs.recv(1024) == PING * 3  # at once, on the one connection
        if answered:
            theirs.sendall(b"+PONG\r\n" * 3)
        mock_clock.jump(2.0)  # every deadline passes before the loop looks again
        await trio.testing.wait_all_tasks_blocked()
        assert len(outcome) == 3
    if answered:
        assert outcome == [b"PONG"] * 3
        assert len(client._conns) == 1 and client.in_flight == 0
    else:
        assert outcome == [RedisUnavailableError] * 3
        assert not client._conns
    await client.aclose()


async def test_a_call_given_up_while_another_waits_for_the_socket_leaves_the_bytes_to_it() -> None:
    """b, cut short from outside while a waits for the socket, does not read: bytes
    it took would be bytes a waits to be told of (here: bytes the event loop cannot
    see). a gets its reply; b's is dropped."""
    client = RedisClient(timeout=GUARD * 10, pool_size=1)
    sock, theirs = fake_redis(client)
    outcome: dict[str, Any] = {}

    async def call(name: str, scope: trio.CancelScope) -> None:
        with scope:
            outcome[name] = await client.execute("ECHO", name)
        outcome.setdefault(name, "given up")

    b = trio.CancelScope()
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, "a", trio.CancelScope())
            await trio.testing.wait_all_tasks_blocked()  # a holds the read turn
            nursery.start_soon(call, "b", b)
            await trio.testing.wait_all_tasks_blocked()
            sock.unseen = b"$1\r\na\r\n"
            b.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert outcome == {"b": "given up"}
            assert sock.unseen  # left where it was
            sock.unseen = b""
            theirs.sendall(b"$1\r\na\r\n$1\r\nb\r\n")
    assert outcome == {"a": b"a", "b": "given up"}
    assert theirs.recv(1024).count(b"ECHO") == 2
    assert client.in_flight == 0
    await client.aclose()


@WATCHED
async def test_a_writer_redis_does_not_read_from_fails_at_its_deadline(
    mock_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch, watched: bool
) -> None:
    """A payload too large for the socket's buffers, and Redis reading none of it:
    the call fails when its deadline passes, and the connection is closed."""
    client = RedisClient(timeout=1.0, pool_size=1)
    _, theirs = fake_redis(client)
    outcome: list[object] = []

    async def big() -> None:
        try:
            await client.execute("SET", "k", b"x" * (8 << 20))
        except RedisUnavailableError as exc:
            outcome.append(type(exc))

    async with watched_or_not(client, monkeypatch, watched=watched), trio.open_nursery() as nursery:
        nursery.start_soon(big)
        await trio.testing.wait_all_tasks_blocked()
        assert client._conns[0].writer is not None  # still writing
        mock_clock.jump(2.0)
        await trio.testing.wait_all_tasks_blocked()
        assert outcome == [RedisUnavailableError]
    assert not client._conns
    theirs.close()
    await client.aclose()


@WATCHED
async def test_a_call_with_a_sooner_deadline_is_watched_to_it(
    mock_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch, watched: bool
) -> None:
    """The watchdog sleeps until the earliest deadline it knows of; a call with a
    sooner one (the admission's own timeout) wakes it sooner (or, unwatched, its
    own scope ends then)."""
    client = RedisClient(timeout=100.0, pool_size=1)
    _, theirs = fake_redis(client)
    script = Script("return 1")
    outcome: dict[str, object] = {}

    async def call(name: str, deadline: float | None) -> None:
        try:
            outcome[name] = await client.evalsha(script, [], [], deadline=deadline)
        except RedisUnavailableError as exc:
            outcome[name] = type(exc)

    async with watched_or_not(client, monkeypatch, watched=watched), trio.open_nursery() as nursery:
        nursery.start_soon(call, "slow", None)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(call, "quick", trio.current_time() + 1.0)
        await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(0.5)
        await trio.testing.wait_all_tasks_blocked()
        assert outcome == {}
        mock_clock.jump(0.6)  # past the quick one's deadline only
        await trio.testing.wait_all_tasks_blocked()
        assert outcome == {"slow": RedisUnavailableError, "quick": RedisUnavailableError}
    assert theirs.recv(1024).count(b"EVALSHA") == 2
    await client.aclose()


@WATCHED
async def test_a_reply_the_reader_has_yet_to_take_at_a_waiting_calls_deadline_is_in_time(
    mock_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch, watched: bool
) -> None:
    """Behind the reader, a call with a sooner deadline: both replies come as that
    deadline passes, and the loop gets round to the call before the reader has read
    them (in some rounds: the order of tasks woken together varies), or after."""
    client = RedisClient(timeout=100.0, pool_size=1)
    script = Script("return 1")
    outcome: dict[str, object] = {}

    async def call(name: str, deadline: float | None) -> None:
        try:
            outcome[name] = await client.evalsha(script, [], [], deadline=deadline)
        except RedisUnavailableError as exc:
            outcome[name] = type(exc)

    async with watched_or_not(client, monkeypatch, watched=watched):
        for _ in range(12):
            _, theirs = fake_redis(client)
            outcome.clear()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(call, "reader", None)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(call, "quick", trio.current_time() + 1.0)
                await trio.testing.wait_all_tasks_blocked()
                assert theirs.recv(1024).count(b"EVALSHA") == 2
                theirs.sendall(b":1\r\n:2\r\n")
                mock_clock.jump(1.0)
                await trio.testing.wait_all_tasks_blocked()
                assert len(outcome) == 2
            assert outcome == {"reader": 1, "quick": 2}
            assert client.in_flight == 0
            client._conns[0].close()
            theirs.close()


async def test_calls_made_with_no_watchdog_keep_their_own_deadlines(
    mock_clock: trio.testing.MockClock,
) -> None:
    """Before the watchdog starts, after it has stopped: no call waits past its
    deadline. Stopped, the watchdog still fails, at its deadline, a call it was
    watching (which has no scope of its own)."""
    client = RedisClient(timeout=1.0, pool_size=2)
    (_, before), (_, watched), (_, after) = (fake_redis(client) for _ in range(3))
    outcome: list[str] = []

    async def ping(name: str) -> None:
        with pytest.raises(RedisUnavailableError, match="within"):
            await client.execute("PING")
        outcome.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ping, "before")
        await trio.testing.wait_all_tasks_blocked()
        watchdog = trio.CancelScope()

        async def watch(task_status: trio.TaskStatus[None]) -> None:
            with watchdog:
                await client.run(task_status=task_status)

        await nursery.start(watch)
        nursery.start_soon(ping, "watched")
        await trio.testing.wait_all_tasks_blocked()
        watchdog.cancel()
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(ping, "after")
        await trio.testing.wait_all_tasks_blocked()
        assert [c.recv(1024) for c in (before, watched, after)] == [PING] * 3
        mock_clock.jump(0.9)
        await trio.testing.wait_all_tasks_blocked()
        assert outcome == []
        mock_clock.jump(0.2)  # every deadline passes
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(outcome) == ["after", "before", "watched"]
        assert not client._conns
    assert client._alarm is None


async def test_async_with_runs_the_watchdog_in_a_nursery_of_its_own(
    mock_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside ``async with``, calls are watched; on leaving, the watchdog stops and
    what the body raised comes out as it was raised."""
    client = RedisClient(timeout=1.0, pool_size=1)
    with pytest.raises(KeyError, match="mine"):
        async with client:
            assert client._alarm is not None
            with pytest.raises(RuntimeError, match="already"):
                await client.run()
            with pytest.raises(RuntimeError, match="already"):
                await client.__aenter__()
            monkeypatch.setattr(RedisClient, "_wait_unwatched", None)  # not called
            _, theirs = fake_redis(client)
            failed: list[object] = []

            async def ping() -> None:
                with pytest.raises(RedisUnavailableError, match="within") as raised:
                    await client.execute("PING")
                failed.append(raised.type)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(ping)
                await trio.testing.wait_all_tasks_blocked()
                assert theirs.recv(1024) == PING
                mock_clock.jump(1.0)
                await trio.testing.wait_all_tasks_blocked()
                assert failed == [RedisUnavailableError]
            raise KeyError("mine")
    assert client._alarm is None
    monkeypatch.undo()
    async with client:  # again
        assert client._alarm is not None


@WATCHED
async def test_a_failure_judging_a_deadline_closes_the_connection_and_nothing_more(
    mock_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    watched: bool,
) -> None:
    """A bug in judging lateness leaves no call hanging past its deadline, and does
    not end the watchdog (nor its owner's nursery)."""
    client = RedisClient(timeout=1.0, pool_size=1)
    _, theirs = fake_redis(client)

    def broken(*_: object) -> float:
        raise ZeroDivisionError

    failed: list[str] = []

    async def ping() -> None:
        with pytest.raises(RedisUnavailableError, match="closed") as raised:
            await client.execute("PING")
        failed.append(str(raised.value))

    async with watched_or_not(client, monkeypatch, watched=watched):
        monkeypatch.setattr(Connection, "expire", broken)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ping)
            await trio.testing.wait_all_tasks_blocked()
            assert theirs.recv(1024) == PING
            mock_clock.jump(1.0)
            await trio.testing.wait_all_tasks_blocked()
            assert len(failed) == 1
        assert not client._conns
        assert (client._alarm is not None) is watched
    assert "closing the connection" in caplog.text
