"""The access log's fast path: one line per request, without :mod:`logging`.

``ostiary serve`` writes one access-log record per request. Through ``logging`` that
line costs a ``LogRecord``, a handler lock, the redacting filter, ``strftime`` and
one write to stderr per line: a fifth of the server's throughput. :class:`AccessLog`
writes the same line (the same JSON object, or the same text line, as
:func:`~ostiary.runtime.logs.setup_logging`'s handler would) at a fraction of that:

- the fields are the core's ``Log`` fields, which hold no secrets by construction;
  the strings among them that a client chooses (the path, the method, the model)
  still go through the same :func:`~ostiary.runtime.logs.redact_value`;
- the timestamp's text is computed once per second (milliseconds appended);
- lines are gathered in a buffer, written out by :meth:`AccessLog.run` (a task in
  the server's nursery) every ``interval`` seconds, or sooner once ``flush_bytes``
  are waiting; the write happens in a worker thread, so a slow stderr never stalls
  the event loop;
- the buffer is bounded (``max_bytes``): while the sink cannot keep up, or after it
  failed, records are dropped and counted, and a warning says how many.

Embedders and tests that install no ``AccessLog`` keep the ``logging`` path
(``Driver(access_log=True)``), where caplog and custom handlers see every record.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import orjson
import trio

from .logs import redact_value, secret_field

__all__ = ["AccessLog", "BinarySink"]

log = logging.getLogger("ostiary.logs")

_LOGGER = "ostiary.access"
_MESSAGE = "request"
_JSON_MILLIS = tuple(f".{n:03d}Z" for n in range(1000))
_TEXT_MILLIS = tuple(f",{n:03d}" for n in range(1000))
#: Field names known to need no redaction (learnt as they come; bounded).
_MAX_PLAIN_NAMES = 1024


class BinarySink(Protocol):
    """Where lines go: ``sys.stderr.buffer``, a file opened ``"wb"``, a BytesIO."""

    def write(self, data: bytes, /) -> Any: ...

    def flush(self) -> Any: ...


class AccessLog:
    """Formats access-log records and writes them to ``sink`` in batches.

    ``fmt`` is ``"json"`` or ``"text"``, as ``[server] log_format``. ``wall`` gives the
    records' time (Unix seconds); ``run_sync`` runs a write off the event loop (a
    worker thread). Tests pass their own of both.
    """

    def __init__(
        self,
        sink: BinarySink,
        *,
        fmt: str = "json",
        flush_bytes: int = 64 * 1024,
        max_bytes: int = 1024 * 1024,
        interval: float = 0.1,
        wall: Callable[[], float] = time.time,
        run_sync: Callable[[Callable[[], None]], Awaitable[None]] = trio.to_thread.run_sync,
    ) -> None:
        if fmt not in ("json", "text"):
            raise ValueError(f"unknown log format {fmt!r}")
        if not 0 < flush_bytes <= max_bytes:
            raise ValueError("need 0 < flush_bytes <= max_bytes")
        self._sink = sink
        self._json = fmt == "json"
        self._plain_names: set[str] = set()
        self._flush_bytes = flush_bytes
        self._max_bytes = max_bytes
        self._interval = interval
        self._wall = wall
        self._run_sync = run_sync
        self._lines: list[bytes] = []
        self._size = 0
        #: Set to wake the flusher: the first line of an idle buffer, or a full one.
        self._wake: trio.Event | None = None
        self._idle = False
        self._second = -1
        self._stamp = ""
        self._millis = _JSON_MILLIS if self._json else _TEXT_MILLIS
        #: Records dropped since the last warning, and in all.
        self._dropped = 0
        self.dropped_total = 0

    # -- formatting ------------------------------------------------------------------

    def _timestamp(self, now: float) -> str:
        second = int(now)
        if second != self._second:
            self._second = second
            if self._json:
                self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
            else:
                self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
        return self._stamp + self._millis[int((now - second) * 1000)]

    def format(self, level: str, fields: Mapping[str, Any], now: float) -> bytes:
        """One record's line, newline included, exactly as the ``logging`` handler of
        :func:`~ostiary.runtime.logs.setup_logging` would write it.

        The line is made from the fields as they are; only if a field's name is
        credential-like, or the line holds what a key pattern starts with (or a
        nested dict), are the fields redacted and the line made again."""
        ts = self._timestamp(now)
        line = self._line(ts, level, fields)
        if (
            not (fields.keys() <= self._plain_names or self._names_are_plain(fields))
            or b"ost_" in line
            or b"sk-" in line
            or b"bearer" in line.lower()
            or line.find(b"{", 1) >= 0
        ):
            line = self._line(ts, level, {k: redact_value(k, v) for k, v in fields.items()})
        return line

    def _names_are_plain(self, fields: Mapping[str, Any]) -> bool:
        if any(secret_field(name) for name in fields):
            return False
        if len(self._plain_names) < _MAX_PLAIN_NAMES:
            self._plain_names.update(fields)
        return True

    def _line(self, ts: str, level: str, fields: Mapping[str, Any]) -> bytes:
        if self._json:
            out = {"ts": ts, "level": level, "logger": _LOGGER, "msg": _MESSAGE, **fields}
            return orjson.dumps(out, default=str, option=orjson.OPT_APPEND_NEWLINE)
        line = f"{ts} {level.upper()} {_LOGGER}: {_MESSAGE}"
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return (line + "\n").encode()

    # -- buffering -------------------------------------------------------------------

    def record(self, level: str, fields: Mapping[str, Any]) -> None:
        """Log one request (``level`` as in the core's ``Log``); never blocks."""
        try:
            line = self.format(level, fields, self._wall())
        except orjson.JSONEncodeError as exc:  # as the logging handler does: say so, go on
            log.error("cannot format an access-log record", extra={"fields": {"error": str(exc)}})
            return
        size = self._size + len(line)
        if size > self._max_bytes:
            self._dropped += 1
            self.dropped_total += 1
            return
        self._lines.append(line)
        self._size = size
        wake = self._wake
        if wake is not None and (self._idle or size >= self._flush_bytes):
            self._wake = None
            wake.set()

    @property
    def buffered(self) -> int:
        """Bytes waiting to be written."""
        return self._size

    def _take(self) -> tuple[bytes, int]:
        lines, self._lines, self._size = self._lines, [], 0
        return b"".join(lines), len(lines)

    def _write(self, data: bytes) -> None:
        self._sink.write(data)
        self._sink.flush()

    def _failed(self, count: int, exc: OSError) -> None:
        self._dropped += count
        self.dropped_total += count
        log.error("cannot write the access log", extra={"fields": {"error": repr(exc)}})

    def _report(self) -> None:
        if self._dropped:
            dropped, self._dropped = self._dropped, 0
            log.warning("access log records dropped", extra={"fields": {"dropped": dropped}})

    def flush(self) -> None:
        """Write what is buffered now, in this thread (used at shutdown)."""
        if not self._lines:
            return
        data, count = self._take()
        try:
            self._write(data)
        except OSError as exc:
            self._failed(count, exc)
        self._report()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The flusher: write buffered lines every ``interval`` seconds (sooner when
        ``flush_bytes`` are waiting), off the event loop; flush the rest when
        cancelled. Sleeps without waking while nothing is logged."""
        try:
            task_status.started()
            while True:
                if not self._lines:
                    self._idle = True
                    self._wake = trio.Event()
                    await self._wake.wait()
                self._idle = False
                if self._size < self._flush_bytes:
                    self._wake = wake = trio.Event()
                    with trio.move_on_after(self._interval):
                        await wake.wait()
                self._wake = None
                data, count = self._take()
                try:
                    await self._run_sync(functools.partial(self._write, data))
                except OSError as exc:
                    self._failed(count, exc)
                self._report()
        finally:
            self._wake = None
            self.flush()
