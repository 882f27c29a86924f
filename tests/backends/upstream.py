"""Helpers shared by the tests of the HTTP client and of the ``openai`` backend: the
fast mock upstream from ``bench/`` (everything it serves is precomputed) or a
hand-scripted one, started in the test's own nursery on a free loopback port."""

from __future__ import annotations

import socket
import struct
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import attrs
import trio

from ostiary.backends.upstream import UpstreamSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from mock_upstream import (
    LAST_CHUNK,
    MockStats,
    ScriptedRequest,
    http_response,
    serve,
    serve_scripted,
    sse_chunk,
    sse_head,
    sse_response,
)

__all__ = [
    "LAST_CHUNK",
    "Handler",
    "MockStats",
    "ScriptedRequest",
    "abort",
    "http_response",
    "replies",
    "reply",
    "serve",
    "serve_scripted",
    "sse_chunk",
    "sse_head",
    "sse_response",
    "start_mock",
    "start_scripted",
]

Handler = Callable[[ScriptedRequest, trio.SocketStream], Awaitable[bool]]


async def start_mock(nursery: trio.Nursery, stats: MockStats | None = None) -> str:
    """The mock upstream's base URL (``http://127.0.0.1:<port>/v1``)."""
    port = await nursery.start(lambda task_status: serve(0, stats=stats, task_status=task_status))
    return f"http://127.0.0.1:{port}/v1"


async def start_scripted(
    nursery: trio.Nursery, handler: Handler, stats: MockStats | None = None
) -> str:
    """The base URL of an upstream whose every request ``handler`` answers."""
    port = await nursery.start(
        lambda task_status: serve_scripted(handler, stats=stats, task_status=task_status)
    )
    return f"http://127.0.0.1:{port}/v1"


def abort(stream: trio.SocketStream) -> None:
    """Make the coming close send an RST instead of a FIN."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def reply(data: bytes, keep_alive: bool = True) -> Handler:
    """A handler that answers every request with ``data``."""

    async def handler(request: ScriptedRequest, stream: trio.SocketStream) -> bool:
        await stream.send_all(data)
        return keep_alive

    return handler


def replies(*answers: bytes) -> Handler:
    """A handler that answers the n-th request with ``answers[n]`` and keeps the
    connection open, whatever the answer says."""
    remaining = iter(answers)

    async def handler(request: ScriptedRequest, stream: trio.SocketStream) -> bool:
        await stream.send_all(next(remaining))
        return True

    return handler


#: How long an upstream backend drains a body after its last useful byte, by default.
DRAIN_SECONDS = float(attrs.fields(UpstreamSettings).response_drain_timeout.default or 0.0)
