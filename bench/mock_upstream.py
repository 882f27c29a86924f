"""A fast mock of an OpenAI-compatible upstream, for benchmarks and tests.

Raw Trio sockets, the least request parsing that works (end of head, content-length,
``connection: close``, pipelining) and response bytes computed once at start, so the
mock costs far less per request than the client under test. Routes (with or without
the ``/v1`` prefix): ``POST /chat/completions`` (JSON, or SSE when the body has
``"stream": true``: N content chunks, the last with ``finish_reason``, then a usage
chunk and ``[DONE]``), ``POST /completions`` (the same for text), ``POST /embeddings``
(one 8-dim vector per input; base64 when asked) and ``GET /models``.

Run it: ``python bench/mock_upstream.py --port 8001 --chunks 20`` (``--port 0``: the
kernel picks; the first line printed, ``listening on <url>``, says which). Tests start
:func:`serve` (or :func:`serve_scripted`, for hand-written misbehaviour) in their own
nursery: ``port = await nursery.start(serve, 0)``.
"""

from __future__ import annotations

import argparse
import base64
import struct
from collections.abc import Awaitable, Callable, Sequence

import orjson
import trio

__all__ = [
    "LAST_CHUNK",
    "MockStats",
    "ScriptedRequest",
    "build_routes",
    "http_response",
    "serve",
    "serve_scripted",
    "sse_chunk",
    "sse_head",
    "sse_response",
]

_MODEL = "mock-model"
_VECTOR = (0.5, -0.25, 0.125, 1.0, 0.0, -1.0, 0.75, 0.0625)


class MockStats:
    """Counters a test can read: connections accepted, open, peak open, requests."""

    __slots__ = ("accepted", "last_request", "open", "peak_open", "requests")

    def __init__(self) -> None:
        self.accepted = 0
        self.open = 0
        self.peak_open = 0
        self.requests = 0
        self.last_request: ScriptedRequest | None = None

    def connected(self) -> None:
        self.accepted += 1
        self.open += 1
        self.peak_open = max(self.peak_open, self.open)


class ScriptedRequest:
    """A parsed request: method, path, lower-cased headers and body."""

    __slots__ = ("body", "headers", "method", "path")

    def __init__(self, method: str, path: str, headers: dict[str, str], body: bytes) -> None:
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body


def http_response(
    status: int,
    body: bytes,
    *,
    content_type: str = "application/json",
    headers: Sequence[tuple[str, str]] = (),
) -> bytes:
    """A complete response with a content-length body."""
    lines = [f"HTTP/1.1 {status} X", f"content-type: {content_type}"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def sse_head(status: int = 200) -> bytes:
    """The head of a chunked ``text/event-stream`` response."""
    return (
        f"HTTP/1.1 {status} X\r\ncontent-type: text/event-stream\r\n"
        "transfer-encoding: chunked\r\n\r\n"
    ).encode()


def sse_chunk(payload: bytes) -> bytes:
    """One ``data:`` event as one HTTP chunk."""
    event = b"data: " + payload + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(event), event)


#: The end of a chunked body.
LAST_CHUNK = b"0\r\n\r\n"


def sse_response(payloads: Sequence[bytes]) -> bytes:
    """A whole SSE response: each payload as an event in its own chunk."""
    return sse_head() + b"".join(sse_chunk(p) for p in payloads) + LAST_CHUNK


def build_routes(chunks: int = 20) -> dict[tuple[str, bool], bytes]:
    """Precomputed responses keyed by (route, stream)."""
    usage = {"prompt_tokens": 7, "completion_tokens": chunks, "total_tokens": 7 + chunks}
    base = {"id": "mock-1", "created": 0, "model": _MODEL}
    text = "tok " * chunks
    chat = {
        **base,
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
        "usage": usage,
    }
    completion = {
        **base,
        "object": "text_completion",
        "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
        "usage": usage,
    }

    def stream(kind: str, piece: Callable[[str], dict[str, object]]) -> list[bytes]:
        events = []
        for i in range(chunks):
            choice = {"index": 0, **piece("tok "), "finish_reason": None}
            if i == chunks - 1:
                choice["finish_reason"] = "stop"
            events.append(orjson.dumps({**base, "object": kind, "choices": [choice]}))
        events.append(orjson.dumps({**base, "object": kind, "choices": [], "usage": usage}))
        events.append(b"[DONE]")
        return events

    models = {"object": "list", "data": [{"id": _MODEL, "object": "model", "owned_by": "mock"}]}
    return {
        ("chat", False): http_response(200, orjson.dumps(chat)),
        ("chat", True): sse_response(
            stream("chat.completion.chunk", lambda t: {"delta": {"content": t}})
        ),
        ("completions", False): http_response(200, orjson.dumps(completion)),
        ("completions", True): sse_response(stream("text_completion", lambda t: {"text": t})),
        ("models", False): http_response(200, orjson.dumps(models)),
        ("missing", False): http_response(
            404,
            orjson.dumps({"error": {"message": "no such route", "type": "invalid_request_error"}}),
        ),
    }


def _embeddings(body: bytes) -> bytes:
    try:
        request = orjson.loads(body)
        inputs = request["input"]
        count = len(inputs) if isinstance(inputs, list) and not isinstance(inputs[0], int) else 1
        b64 = request.get("encoding_format") == "base64"
    except (ValueError, KeyError, TypeError, IndexError):
        count, b64 = 1, False
    vector: object = (
        base64.b64encode(struct.pack("<8f", *_VECTOR)).decode() if b64 else list(_VECTOR)
    )
    data = [{"object": "embedding", "index": i, "embedding": vector} for i in range(count)]
    usage = {"prompt_tokens": 3 * count, "total_tokens": 3 * count}
    reply = {"object": "list", "data": data, "model": _MODEL, "usage": usage}
    return http_response(200, orjson.dumps(reply))


def _split_request(buffer: bytes) -> tuple[bytes, bytes, bytes] | None:
    """(head, body, rest) if ``buffer`` holds a complete request, else None."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buffer[:end]
    lower = head.lower()
    length = 0
    at = lower.find(b"\r\ncontent-length:")
    if at >= 0:
        stop = lower.find(b"\r\n", at + 2)
        length = int(lower[at + 17 : stop if stop >= 0 else len(lower)])
    start = end + 4
    if len(buffer) < start + length:
        return None
    return head, buffer[start : start + length], buffer[start + length :]


def _route(head: bytes, body: bytes, routes: dict[tuple[str, bool], bytes]) -> bytes:
    line_end = head.find(b"\r\n")
    path = head[: line_end if line_end >= 0 else len(head)].split(b" ")[1].split(b"?")[0]
    if path.endswith(b"/chat/completions"):
        return routes["chat", b'"stream":true' in body or b'"stream": true' in body]
    if path.endswith(b"/completions"):
        return routes["completions", b'"stream":true' in body or b'"stream": true' in body]
    if path.endswith(b"/embeddings"):
        return _embeddings(body)
    if path.endswith(b"/models"):
        return routes["models", False]
    return routes["missing", False]


async def _send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = await sock.send(view)
        view = view[sent:]


async def _serve_connection(
    sock: trio.socket.SocketType, routes: dict[tuple[str, bool], bytes], stats: MockStats | None
) -> None:
    buffer = b""
    with sock:
        try:
            while True:
                replies = []
                close = False
                while (request := _split_request(buffer)) is not None:
                    head, body, buffer = request
                    replies.append(_route(head, body, routes))
                    close = b"\r\nconnection: close" in head.lower()
                    if stats is not None:
                        stats.requests += 1
                if replies:
                    await _send_all(sock, b"".join(replies))
                if close:
                    return
                data = await sock.recv(65536)
                if not data:
                    return
                buffer += data
        except OSError:
            return
        finally:
            if stats is not None:
                stats.open -= 1


async def _listen(host: str, port: int) -> trio.socket.SocketType:
    listener = trio.socket.socket()
    listener.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
    await listener.bind((host, port))
    listener.listen(4096)
    return listener


async def serve(
    port: int = 0,
    *,
    host: str = "127.0.0.1",
    chunks: int = 20,
    stats: MockStats | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the mock until cancelled; reports the bound port via ``task_status``."""
    routes = build_routes(chunks)
    listener = await _listen(host, port)
    with listener:
        task_status.started(listener.getsockname()[1])
        async with trio.open_nursery() as nursery:
            while True:
                sock, _ = await listener.accept()
                sock.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
                if stats is not None:
                    stats.connected()
                nursery.start_soon(_serve_connection, sock, routes, stats)


#: A scripted handler writes whatever bytes it likes to the stream; it returns True
#: to read the next request on the same connection, False to close it.
Handler = Callable[[ScriptedRequest, trio.SocketStream], Awaitable[bool]]


async def serve_scripted(
    handler: Handler,
    *,
    stats: MockStats | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A loopback server whose every answer is written by ``handler`` (for tests of
    garbage, truncation, stalls and errors). Reports the bound port."""
    listener = await _listen("127.0.0.1", 0)
    with listener:
        task_status.started(listener.getsockname()[1])
        async with trio.open_nursery() as nursery:
            while True:
                sock, _ = await listener.accept()
                if stats is not None:
                    stats.connected()
                nursery.start_soon(_scripted_connection, trio.SocketStream(sock), handler, stats)


async def _scripted_connection(
    stream: trio.SocketStream, handler: Handler, stats: MockStats | None
) -> None:
    buffer = b""
    async with stream:
        try:
            while True:
                while (request := _split_request(buffer)) is None:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buffer += data
                head, body, buffer = request
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                pairs = (line.split(":", 1) for line in lines[1:] if ":" in line)
                headers = {name.lower(): value.strip() for name, value in pairs}
                parsed = ScriptedRequest(method.upper(), path, headers, body)
                if stats is not None:
                    stats.requests += 1
                    stats.last_request = parsed
                if not await handler(parsed, stream):
                    return
        except trio.BrokenResourceError:
            return
        finally:
            if stats is not None:
                stats.open -= 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001, help="0: the kernel picks")
    parser.add_argument("--chunks", type=int, default=20, help="content chunks per stream")
    args = parser.parse_args()
    from serving import announce  # beside this script; tests import this module alone

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                lambda task_status: serve(
                    args.port, host=args.host, chunks=args.chunks, task_status=task_status
                )
            )
            announce(args.host, port)

    trio.run(run)


if __name__ == "__main__":
    main()
