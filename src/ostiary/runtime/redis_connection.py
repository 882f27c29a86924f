"""One pooled connection of the Redis client (:mod:`.redis_client`): a non-blocking
socket, its reply parser and the calls pipelined on it, each waiting for its replies.
"""

from __future__ import annotations

import collections
import contextlib
import math
import socket
from collections.abc import Callable
from typing import Any

import hiredis
import trio
from trio.lowlevel import (
    Abort,
    Task,
    current_task,
    reschedule,
    wait_readable,
    wait_task_rescheduled,
)

from .resp import RedisError, RedisReplyError, RedisUnavailableError

__all__ = ["LOST", "Call", "Connection", "LostError"]

_MISSING = object()
#: What one read takes at most (a reply is a few dozen bytes).
_READ_SIZE = 65536


class Call:
    """One caller's commands, written to a connection, waiting for their replies."""

    __slots__ = ("abandoned", "count", "deadline", "done", "error", "replies", "task", "turn")

    def __init__(self, count: int, deadline: float) -> None:
        self.count = count
        #: When the watchdog judges Redis down if the replies are not in.
        self.deadline = deadline
        self.replies: list[Any] = []
        self.error: RedisError | None = None
        self.done = False
        #: Holds the connection's read turn: it reads the replies of every call.
        self.turn = False
        #: Given up by its caller (cancelled from outside): its replies are dropped.
        self.abandoned = False
        #: The caller's task while it waits for another call to read its replies.
        self.task: Task | None = None

    async def park(self) -> None:
        """Until :meth:`wake` (or a cancellation)."""
        self.task = current_task()
        await wait_task_rescheduled(self._abort)

    def _abort(self, _: object) -> Abort:
        self.task = None
        return Abort.SUCCEEDED

    def wake(self) -> None:
        task = self.task
        if task is not None:
            self.task = None
            reschedule(task)


#: What a lost connection raises.
LOST = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, hiredis.ProtocolError)


class LostError(RedisUnavailableError):
    """The connection broke under the call."""


class Connection:
    """A non-blocking socket, its reply parser, and the calls written to it.

    Calls are pipelined: each writes its commands at once (a few hundred bytes
    always fit in the socket buffer; a larger payload is queued and flushed by its
    writer) and waits for its replies, which come in the order written. One waiting
    call at a time holds the read turn: it waits for the socket to be readable, reads
    whatever is there and hands every complete reply to its call; once its own are
    in, it passes the turn to the oldest call still waiting. So nobody waits in line
    to write, and a burst of replies costs one read. Only the reader reads while it
    waits for the socket (``waiting``): anyone else reading then would take bytes
    the reader is waiting to be told of.
    """

    __slots__ = (
        "buffer",
        "closed",
        "fd",
        "outbuf",
        "pending",
        "pool",
        "reader",
        "reading",
        "sock",
        "used",
        "waiting",
        "writer",
    )

    def __init__(self, sock: socket.socket, pool: list[Connection]) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        #: The client's open connections: this one leaves it when it closes.
        self.pool = pool
        self.reader = hiredis.Reader(replyError=RedisReplyError, notEnoughData=_MISSING)
        self.buffer = bytearray(_READ_SIZE)
        #: Has answered a call (so a failure on reuse may mean Redis restarted).
        self.used = False
        self.closed = False
        #: Calls written (or queued in ``outbuf``) whose replies are not all in.
        self.pending: collections.deque[Call] = collections.deque()
        #: A call holds (or has been handed) the read turn.
        self.reading = False
        #: The reader is waiting for the socket to become readable.
        self.waiting = False
        #: Bytes not yet written, and the call that found it empty and flushes it.
        self.outbuf = bytearray()
        self.writer: Call | None = None

    def send(self, payload: bytes, count: int, deadline: float) -> Call:
        """Write ``payload``, or queue what does not fit (the call is then the
        ``writer`` and must :meth:`flush`)."""
        call = Call(count, deadline)
        if self.closed:
            call.error = LostError("the Redis connection was closed")
            call.done = True
            return call
        self.pending.append(call)
        if not self.reading:
            self.reading = call.turn = True
        if self.outbuf:  # someone is flushing: behind their bytes
            self.outbuf += payload
            return call
        try:
            sent = self.sock.send(payload)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.fail(LostError(f"Redis connection lost: {exc}"))
            return call
        if sent < len(payload):
            self.outbuf += payload[sent:]
            self.writer = call
        return call

    async def flush(self, own: trio.CancelScope | None) -> None:
        """Write the queued bytes; cut short (but by ``own``: see :meth:`wait`), the
        connection cannot be used again."""
        try:
            while self.outbuf and not self.closed:
                await trio.lowlevel.wait_writable(self.fd)
                with contextlib.suppress(BlockingIOError):
                    del self.outbuf[: self.sock.send(self.outbuf)]
            self.writer = None
        except LOST as exc:
            self.fail(LostError(f"Redis connection lost: {exc}"))
        except BaseException:
            if own is None or not own.cancel_called:
                self.fail(RedisUnavailableError("a write to Redis was cut short"))
            raise

    async def wait(self, call: Call, own: trio.CancelScope | None = None) -> list[Any]:
        """``call``'s replies; an error reply is returned in place.

        Cut short from outside, the call takes its replies if they are already there
        (read without blocking, unless the reader is waiting for the socket: then
        they are the reader's to take); the cancellation is raised again at the
        caller's next checkpoint. If not, the call is given up and its replies are
        dropped when they come. Its deadline is the watchdog's business
        (:meth:`expire`), or, with no watchdog, its caller's: ``own``, the scope
        keeping it, is let through with the call kept as it was, for the caller to
        judge as the watchdog would (or to give up, if it was cut short from
        outside too).
        """
        if self.writer is call:
            await self.flush(own)
        try:
            while not call.done:
                if call.turn:
                    self.waiting = True
                    try:
                        await wait_readable(self.fd)
                    finally:
                        self.waiting = False
                    self.read(call)
                else:
                    await call.park()
        except trio.Cancelled:
            if not self.waiting:
                self.read(call, until_empty=True)
            if not call.done:
                if own is None or not own.cancel_called:
                    self.give_up(call)
                raise
        except LOST as exc:  # closed under the reader by another call, or broke
            self.fail(LostError(f"Redis connection lost: {exc}"))
        if call.turn:
            if self.pending:
                self._pass_turn()
            else:
                self.reading = False
        if call.error is not None:
            raise call.error
        return call.replies

    def read(self, by: Call | None, *, until_empty: bool = False) -> None:
        """Read what the socket has, without blocking, and hand out the replies
        (``by``: the call reading, if a call)."""
        if self.closed:
            return
        reader, pending = self.reader, self.pending
        try:
            while True:
                try:
                    size = self.sock.recv_into(self.buffer)
                except BlockingIOError:  # woken spuriously, or nothing more
                    return
                if not size:
                    raise trio.BrokenResourceError("Redis closed the connection")
                reader.feed(self.buffer, 0, size)  # type: ignore[arg-type]  # a buffer
                reply = reader.gets()
                while reply is not _MISSING:
                    if not pending:
                        raise hiredis.ProtocolError("a reply nobody asked for")
                    call = pending[0]
                    replies = call.replies
                    replies.append(reply)
                    if len(replies) == call.count:
                        pending.popleft()
                        call.done = True
                        self.used = True
                        # The reader is not waiting for the socket while anyone
                        # reads: it reads itself, or writes, or has been handed the
                        # turn and will run.
                        if call is not by:
                            call.wake()
                    reply = reader.gets()
                if not until_empty:
                    return
        except LOST as exc:
            self.fail(LostError(f"Redis connection lost: {exc}"))

    def give_up(self, call: Call) -> None:
        """``call`` is cut short from outside: its replies are dropped when they come."""
        if call.done or call.abandoned:
            return
        call.abandoned = True
        if self.writer is call:  # its bytes are half written
            self.fail(RedisUnavailableError("a write to Redis was cut short"))
        elif call.turn:
            call.turn = False
            self._pass_turn()

    def _pass_turn(self) -> None:
        for call in self.pending:
            if not call.abandoned:
                call.turn = True
                call.wake()
                return
        self.reading = False

    def expire(self, now: float, late: Callable[[], RedisError]) -> float:
        """The watchdog's look at the connection at ``now`` (or an unwatched call's,
        at its deadline): if a call's deadline has passed unanswered and no reply
        waits in the socket, Redis did not answer in time: the connection is closed,
        failing every call on it with ``late()``. Returns when to look again
        (``now``: at once, the reader having replies to take)."""
        overdue = any(c.deadline <= now for c in self.pending if not c.abandoned)
        if overdue and not self.waiting:
            self.read(None, until_empty=True)  # nobody else would read them now
            overdue = any(c.deadline <= now for c in self.pending if not c.abandoned)
        if overdue:
            if self.waiting and self._readable():
                return now  # the reader has been told, or is about to be
            self.fail(late())
        return self.next_deadline()

    def next_deadline(self) -> float:
        return min((c.deadline for c in self.pending if not c.abandoned), default=math.inf)

    def _readable(self) -> bool:
        try:
            self.sock.recv(1, socket.MSG_PEEK)  # b"" (the end) is news too
        except BlockingIOError:
            return False
        except OSError:
            pass  # the reader will find out
        return True

    def fail(self, error: RedisError) -> None:
        """Close the connection; every call still waiting on it fails with ``error``."""
        if self.closed:
            return
        self.closed = True
        pending, self.pending = self.pending, collections.deque()
        for call in pending:
            call.error = error
            call.done = True
            call.wake()
        self.reading = False
        self.outbuf.clear()
        if self in self.pool:
            self.pool.remove(self)
        trio.lowlevel.notify_closing(self.fd)
        self.sock.close()

    def close(self) -> None:
        self.fail(RedisUnavailableError("the Redis client was closed"))
