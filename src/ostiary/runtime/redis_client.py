"""A thin Trio Redis client over hiredis' sans-IO ``Reader``.

Chosen by measurement: coredis 6 took about 300 µs per EVALSHA on loopback here; a
client that packs commands with ``hiredis.pack_command``, writes them in one
``send_all`` and parses replies with ``hiredis.Reader`` takes about a sixth of that.
It does what the limit store needs and no more:

- one round trip per call, several commands per round trip (:meth:`pipeline`);
- a small pool of connections (``pool_size``), reused in LIFO order; when every one
  is busy, callers wait in line and the newest of them, given the next free
  connection, carries all the waiting calls in one write (up to :data:`MAX_BATCH`),
  reading their replies in order: a burst costs a few round trips, not one per call,
  and no background task is needed (each batch is carried by one of its own callers;
  the newest has the latest deadline, so a carrier's timeout takes down no call that
  still had time);
- a deadline on every call (``timeout``, pool wait and connect included): when it
  passes, the call raises :class:`RedisUnavailableError` and its connection, whose
  state is then unknown, is closed;
- reconnection with exponential backoff: after a failed connect, calls fail at once
  until the backoff has passed, so a dead Redis costs no time and gets no storm;
- a connection found dead on reuse (Redis restarted) is replaced once, at once, and
  every other idle connection is dropped with it;
- :class:`Script`: EVALSHA, and on ``NOSCRIPT`` (after ``SCRIPT FLUSH`` or a restart)
  SCRIPT LOAD and EVALSHA again in the same round trip.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import socket
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any, cast

import attrs
import hiredis
import trio
from trio.lowlevel import wait_readable

__all__ = [
    "Arg",
    "RedisAddress",
    "RedisClient",
    "RedisError",
    "RedisReplyError",
    "RedisUnavailableError",
    "Script",
]

#: What a command argument may be.
Arg = str | int | float | bytes
_MISSING = object()
#: Calls carried in one write at most.
MAX_BATCH = 64
# hiredis' stub types the argument as a 1-tuple; it takes any tuple of arguments.
_pack = cast(Callable[[tuple[Arg, ...]], bytes], hiredis.pack_command)


class RedisError(Exception):
    """Anything that went wrong talking to Redis."""


class RedisUnavailableError(RedisError):
    """Redis could not be reached, or did not answer within the timeout."""


class RedisReplyError(RedisError):
    """Redis answered with an error reply (``-ERR ...``)."""


@attrs.frozen
class RedisAddress:
    """Where Redis listens: ``redis://[[user]:password@]host[:port][/db]``."""

    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = None

    @classmethod
    def from_url(cls, url: str) -> RedisAddress:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "redis":
            raise ValueError(f"a Redis URL starts with redis://, not {parts.scheme}://")
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ValueError(f"the database in a Redis URL is a number, not {path!r}")
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 6379,
            db=int(path or 0),
            username=urllib.parse.unquote(parts.username) if parts.username else None,
            password=urllib.parse.unquote(parts.password) if parts.password else None,
        )


@attrs.frozen
class Script:
    """A Lua script known by its SHA1, loaded into Redis when Redis does not know it."""

    source: str
    sha: str = attrs.field(init=False)

    @sha.default
    def _sha(self) -> str:
        return hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest()


@attrs.define(eq=False)
class _Call:
    """One caller's commands, waiting for a connection or carried by another caller."""

    payload: bytes
    count: int
    done: trio.Event = attrs.field(factory=trio.Event)
    replies: list[Any] = attrs.field(factory=list)
    error: RedisError | None = None
    #: In the line of waiting calls (not yet carried, nor handed a connection).
    queued: bool = False
    #: Handed a connection by the caller that finished with it: carry a batch.
    lead: bool = False


#: What a lost connection raises.
_LOST = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, hiredis.ProtocolError)


class _Connection:
    """A non-blocking socket and its reply parser.

    A round trip writes at once (a few hundred bytes always fit in the socket
    buffer; a larger payload waits for room) and then waits for the socket to be
    readable: one trip through the scheduler per call, which is what a reply costs
    anyway, where a :class:`trio.SocketStream` takes two (it yields after sending).
    """

    __slots__ = ("reader", "sock", "used")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = hiredis.Reader(replyError=RedisReplyError, notEnoughData=_MISSING)
        self.used = False

    async def roundtrip(self, payload: bytes, count: int) -> list[Any]:
        sock = self.sock
        try:
            sent = sock.send(payload)
        except BlockingIOError:
            sent = 0
        if sent < len(payload):
            await self._send_rest(memoryview(payload)[sent:])
        replies: list[Any] = []
        reader = self.reader
        while True:
            await wait_readable(sock)
            try:
                data = sock.recv(65536)
            except BlockingIOError:  # woken spuriously
                continue
            if not data:
                raise trio.BrokenResourceError("Redis closed the connection")
            reader.feed(data)
            reply = reader.gets()
            while reply is not _MISSING:
                replies.append(reply)
                if len(replies) == count:
                    return replies
                reply = reader.gets()

    async def _send_rest(self, rest: memoryview) -> None:
        while rest:
            await trio.lowlevel.wait_writable(self.sock)
            with contextlib.suppress(BlockingIOError):
                rest = rest[self.sock.send(rest) :]

    def close(self) -> None:
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()


# Validated once, at construction: no __setattr__ hook on the hot path's counters.
@attrs.define(eq=False, on_setattr=attrs.setters.NO_OP)
class RedisClient:
    """A pooled Redis client; every call ends within ``timeout`` seconds.

    Call :meth:`aclose` (or use ``async with``) to close the pooled connections.
    """

    address: RedisAddress = attrs.field(factory=RedisAddress)
    #: Seconds one call may take, connecting included (``[redis] timeout``).
    timeout: float = attrs.field(default=0.05, validator=attrs.validators.gt(0))
    #: Connections at most (``[redis] pool_size``).
    pool_size: int = attrs.field(default=4, validator=attrs.validators.ge(1))
    #: First and longest wait after a failed connect, in seconds.
    backoff_min: float = attrs.field(default=0.05, validator=attrs.validators.gt(0))
    backoff_max: float = attrs.field(default=2.0, validator=attrs.validators.gt(0))
    _idle: list[_Connection] = attrs.field(factory=list, init=False)
    #: Connections in use (at most ``pool_size``), and the calls waiting for one
    #: (only while all ``pool_size`` are in use).
    _busy: int = attrs.field(default=0, init=False)
    _waiting: collections.deque[_Call] = attrs.field(factory=collections.deque, init=False)
    _backoff: float = attrs.field(default=0.0, init=False)
    _down_until: float = attrs.field(default=float("-inf"), init=False)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RedisClient:
        return cls(RedisAddress.from_url(url), **kwargs)

    async def __aenter__(self) -> RedisClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._drop_idle()
        await trio.lowlevel.checkpoint()

    def _drop_idle(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    async def execute(self, *args: Arg) -> Any:
        """One command; an error reply raises :class:`RedisReplyError`."""
        (reply,) = await self._call(_pack(args), 1)
        if isinstance(reply, RedisReplyError):
            raise reply
        return reply

    async def pipeline(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """Several commands in one round trip; error replies come back in place."""
        return await self._call(b"".join(_pack(tuple(c)) for c in commands), len(commands))

    async def evalsha(self, script: Script, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        """Run ``script``, loading it first if Redis does not know it (any more);
        both round trips together within the timeout."""
        payload = _pack(("EVALSHA", script.sha, len(keys), *keys, *args))
        with trio.CancelScope(deadline=trio.current_time() + self.timeout) as scope:
            (reply,) = await self._roundtrip(payload, 1)
            if isinstance(reply, RedisReplyError) and str(reply).startswith("NOSCRIPT"):
                load = _pack(("SCRIPT", "LOAD", script.source))
                _, reply = await self._roundtrip(load + payload, 2)
            if isinstance(reply, RedisReplyError):
                raise reply
            return reply
        assert scope.cancelled_caught
        raise self._late()

    async def _call(self, payload: bytes, count: int) -> list[Any]:
        with trio.CancelScope(deadline=trio.current_time() + self.timeout) as scope:
            return await self._roundtrip(payload, count)
        assert scope.cancelled_caught
        raise self._late()

    def _late(self) -> RedisUnavailableError:
        return RedisUnavailableError(f"Redis did not answer within {self.timeout} s")

    async def _roundtrip(self, payload: bytes, count: int) -> list[Any]:
        await trio.lowlevel.checkpoint_if_cancelled()  # nothing is sent once cut short
        if self._busy < self.pool_size:  # the usual case: a connection is free
            self._busy += 1
            try:
                return await self._roundtrip_held(payload, count)
            finally:
                self._hand_off()
        call = _Call(payload, count, queued=True)
        self._waiting.append(call)
        try:
            await call.done.wait()
        except BaseException:  # timed out or cancelled while waiting
            if call.lead:
                self._hand_off()
            elif call.queued:
                self._waiting.remove(call)
            raise
        if not call.lead:  # carried by another caller
            if call.error is not None:
                raise call.error
            return call.replies
        try:
            return await self._carry(call)
        finally:
            self._hand_off()

    def _hand_off(self) -> None:
        """A connection is free: give it to the newest waiting call, or to the pool.

        The newest has the most time left (every call has the same timeout), so the
        batch it carries (the oldest calls) is not cut short by its deadline while
        the others still had time; each carried call keeps its own deadline.
        """
        if self._waiting:
            call = self._waiting.pop()
            call.queued = False
            call.lead = True
            call.done.set()
        else:
            self._busy -= 1

    async def _carry(self, own: _Call) -> list[Any]:
        """Send ``own`` and the calls waiting before it in one write."""
        batch = [own]
        while self._waiting and len(batch) < MAX_BATCH:
            call = self._waiting.popleft()
            call.queued = False
            batch.append(call)
        if len(batch) == 1:
            return await self._roundtrip_held(own.payload, own.count)
        payload = b"".join(c.payload for c in batch)
        try:
            replies = await self._roundtrip_held(payload, sum(c.count for c in batch))
        except BaseException as exc:
            why = str(exc) if isinstance(exc, RedisError) else "the call carrying it was cut short"
            for call in batch[1:]:
                call.error = RedisUnavailableError(why)
                call.done.set()
            raise
        at = own.count
        for call in batch[1:]:
            call.replies = replies[at : at + call.count]
            at += call.count
            call.done.set()
        return replies[: own.count]

    async def _roundtrip_held(self, payload: bytes, count: int) -> list[Any]:
        conn = await self._checkout()
        try:
            replies = await conn.roundtrip(payload, count)
        except _LOST as exc:
            conn.close()
            if not conn.used:
                raise RedisUnavailableError(f"Redis connection lost: {exc}") from exc
            # A pooled connection that died while idle (Redis restarted): the
            # command never reached a live server, so try a fresh connection once.
            self._drop_idle()
            conn = await self._checkout()
            try:
                replies = await conn.roundtrip(payload, count)
            except _LOST as again:
                conn.close()
                raise RedisUnavailableError(f"Redis connection lost: {again}") from again
            except BaseException:
                conn.close()
                raise
        except BaseException:
            conn.close()
            raise
        conn.used = True
        self._idle.append(conn)
        return replies

    async def _checkout(self) -> _Connection:
        if self._idle:
            return self._idle.pop()
        if trio.current_time() < self._down_until:
            raise RedisUnavailableError("Redis is unreachable (waiting to reconnect)")
        try:
            conn = await self._connect()
        except (*_LOST, RedisReplyError) as exc:
            now = trio.current_time()
            if now >= self._down_until:  # callers failing together back off once
                self._backoff = min(self.backoff_max, max(self.backoff_min, 2 * self._backoff))
                self._down_until = now + self._backoff
            raise RedisUnavailableError(f"cannot connect to Redis: {exc}") from exc
        self._backoff = 0.0
        return conn

    async def _connect(self) -> _Connection:
        address = self.address
        stream = await trio.open_tcp_stream(address.host, address.port)
        # The stream has set TCP_NODELAY; the connection keeps only the socket.
        sock = socket.socket(fileno=stream.socket.detach())
        sock.setblocking(False)
        conn = _Connection(sock)
        setup: list[tuple[Arg, ...]] = []
        if address.password is not None:
            user = () if address.username is None else (address.username,)
            setup.append(("AUTH", *user, address.password))
        if address.db:
            setup.append(("SELECT", address.db))
        if setup:
            try:
                payload = b"".join(_pack(c) for c in setup)
                for reply in await conn.roundtrip(payload, len(setup)):
                    if isinstance(reply, RedisReplyError):
                        raise reply
            except BaseException:
                conn.close()
                raise
        return conn
