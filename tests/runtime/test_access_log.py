"""The access log's fast path: the same lines as ``logging`` would write, redacted,
flushed on size, on a timer and at the end, and bounded when the sink is slow."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
import trio
import trio.lowlevel
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from ostiary.runtime.access_log import AccessLog
from ostiary.runtime.logs import _PATTERNS, REDACTED, redact, setup_logging
from tests.conftest import chat_body

from .test_driver import post, running

NOW = 1_764_590_400.25


@contextlib.contextmanager
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def through_logging(fmt: str, level: str, fields: dict[str, Any], created: float) -> bytes:
    """The line ``setup_logging``'s handler writes for this access record."""
    stream = io.StringIO()
    setup_logging("debug", fmt, stream)
    logger = logging.getLogger("ostiary.access")
    number = logging.getLevelName(level.upper())
    record = logger.makeRecord(
        logger.name, number, "x.py", 1, "request", (), None, extra={"fields": dict(fields)}
    )
    record.created = created
    record.msecs = int((created - int(created)) * 1000) + 0.0
    logger.handle(record)
    return stream.getvalue().encode()


field_values = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["/v1/sk-ABCDEFGH12345678", "ost_0123456789ab_" + "Q" * 43, "Bearer x.y"]),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False),
    st.booleans(),
    st.none(),
)
field_names = st.sampled_from(
    [
        *("request_id", "method", "path", "status", "duration_ms", "key_id", "model"),
        *("prompt_tokens", "api_key", "password", "note"),
    ]
)


@settings(max_examples=150, deadline=None)
@given(
    fmt=st.sampled_from(["json", "text"]),
    level=st.sampled_from(["info", "error", "warning", "debug"]),
    fields=st.dictionaries(field_names, field_values, max_size=8),
    created=st.floats(min_value=1e9, max_value=2e9),
)
def test_lines_are_the_logging_handlers_lines(
    fmt: str, level: str, fields: dict[str, Any], created: float
) -> None:
    writer = AccessLog(io.BytesIO(), fmt=fmt)
    with root_logging():
        expected = through_logging(fmt, level, fields, created)
    assert writer.format(level, fields, created) == expected


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_timestamps_follow_the_clock_across_seconds(fmt: str) -> None:
    writer = AccessLog(io.BytesIO(), fmt=fmt)
    for created in (NOW, NOW + 0.5, NOW + 1.001, NOW + 1.999, NOW + 3600.999, NOW):
        line = writer.format("info", {"status": 200}, created)
        with root_logging():
            assert line == through_logging(fmt, "info", {"status": 200}, created)


def test_client_strings_are_redacted() -> None:
    secret = "ost_0123456789ab_" + "Q" * 43
    writer = AccessLog(io.BytesIO())
    fields = {"method": "sk-ABCDEFGH12345678", "path": f"/v1/models/{secret}", "status": 404}
    line = writer.format("info", fields, NOW)
    assert secret not in line.decode() and b"ABCDEFGH" not in line
    record = orjson.loads(line)
    assert record["path"] == f"/v1/models/{REDACTED}"
    assert record["method"] == REDACTED and record["status"] == 404


def _redact_by_patterns(text: str) -> str:
    for pattern in _PATTERNS:
        text = pattern.sub(REDACTED, text)
    return text


@given(
    st.lists(
        st.one_of(
            st.text(max_size=12),
            st.sampled_from(["ost_", "0123456789ab_", "sk-", "ABCDEFGH123", "BeArEr ", " ", "/"]),
        ),
        max_size=8,
    ).map("".join)
)
def test_redact_skips_only_text_no_pattern_matches(text: str) -> None:
    assert redact(text) == _redact_by_patterns(text)


class Sink:
    """A binary sink that records each write (and may be made to fail)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.fail = False

    def write(self, data: bytes) -> int:
        if self.fail:
            raise OSError(32, "Broken pipe")
        self.writes.append(data)
        return len(data)

    def flush(self) -> None:
        pass

    def lines(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in b"".join(self.writes).splitlines()]


async def inline(fn: Callable[[], None]) -> None:
    """Runs a write at once, in the event loop: deterministic under a MockClock."""
    await trio.lowlevel.checkpoint()
    fn()


class Gate:
    """Runs writes only once opened: a sink that is stuck for a while."""

    def __init__(self) -> None:
        self.open = trio.Event()

    async def __call__(self, fn: Callable[[], None]) -> None:
        await self.open.wait()
        fn()


async def test_flushes_on_the_timer(autojump_clock: trio.testing.MockClock) -> None:
    sink = Sink()
    writer = AccessLog(sink, interval=0.1, wall=lambda: NOW, run_sync=inline)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        writer.record("info", {"status": 200})
        writer.record("info", {"status": 201})
        await trio.sleep(0.05)
        assert sink.writes == []
        await trio.sleep(0.1)
        assert [r["status"] for r in sink.lines()] == [200, 201]
        assert len(sink.writes) == 1  # one write for the batch
        await trio.sleep(10)
        assert len(sink.writes) == 1  # nothing logged: nothing written
        nursery.cancel_scope.cancel()


async def test_flushes_once_the_size_bound_is_passed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sink = Sink()
    writer = AccessLog(sink, flush_bytes=1000, interval=60.0, wall=lambda: NOW, run_sync=inline)
    line = len(writer.format("info", {"path": "/x"}, NOW))
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        start = trio.current_time()
        for _ in range(1000 // line + 1):
            writer.record("info", {"path": "/x"})
        while not sink.writes:
            await trio.lowlevel.checkpoint()
        assert trio.current_time() == start  # not the minute's timer
        assert len(sink.lines()) == 1000 // line + 1
        nursery.cancel_scope.cancel()


async def test_flushes_what_is_left_when_cancelled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sink = Sink()
    writer = AccessLog(sink, interval=60.0, wall=lambda: NOW, run_sync=inline)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        writer.record("error", {"status": 503})
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert sink.lines() == [
        {"ts": "2025-12-01T12:00:00.250Z", "level": "error", "logger": "ostiary.access"}
        | {"msg": "request", "status": 503}
    ]


async def test_a_stuck_sink_drops_records_past_the_bound(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    sink, gate = Sink(), Gate()
    writer = AccessLog(
        sink, flush_bytes=100, max_bytes=1000, interval=0.1, wall=lambda: NOW, run_sync=gate
    )
    line = len(writer.format("info", {"n": 0}, NOW))
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        writer.record("info", {"n": 0})
        await trio.sleep(0.2)  # the flusher is now stuck in the write
        for n in range(1, 200):
            writer.record("info", {"n": n})
        assert writer.buffered <= 1000
        held = 1000 // line
        assert writer.dropped_total == 199 - held
        gate.open.set()
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert [r["n"] for r in sink.lines()] == list(range(held + 1))
    warnings = [r for r in caplog.records if r.getMessage() == "access log records dropped"]
    assert [r.fields for r in warnings] == [{"dropped": 199 - held}]  # type: ignore[attr-defined]


async def test_a_failing_sink_counts_what_it_lost(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    sink = Sink()
    sink.fail = True
    writer = AccessLog(sink, interval=0.1, wall=lambda: NOW, run_sync=inline)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        writer.record("info", {"n": 1})
        writer.record("info", {"n": 2})
        await trio.sleep(0.5)
        assert writer.dropped_total == 2
        sink.fail = False
        writer.record("info", {"n": 3})
        await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    assert [r["n"] for r in sink.lines()] == [3]
    assert "cannot write the access log" in caplog.text
    assert "access log records dropped" in caplog.text


def test_a_record_that_cannot_be_encoded_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    sink = Sink()
    writer = AccessLog(sink)
    writer.record("info", {"n": 2**64})
    writer.record("info", {"n": 1})
    writer.flush()
    assert [r["n"] for r in sink.lines()] == [1]
    assert "cannot format an access-log record" in caplog.text


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        AccessLog(io.BytesIO(), fmt="xml")
    with pytest.raises(ValueError):
        AccessLog(io.BytesIO(), flush_bytes=10, max_bytes=5)


async def test_the_driver_writes_through_it(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    sink = Sink()
    writer = AccessLog(sink)
    async with running(access_log=writer) as (connect, _, _):
        client = await connect()
        await post(client, "/v1/chat/completions", chat_body(model="s"))
        await post(client, "/v1/chat/completions", chat_body(model="s"), secret=False)
        writer.flush()
    assert [(r["status"], r["path"]) for r in sink.lines()] == [
        (200, "/v1/chat/completions"),
        (401, "/v1/chat/completions"),
    ]
    assert not [r for r in caplog.records if r.name == "ostiary.access"]
