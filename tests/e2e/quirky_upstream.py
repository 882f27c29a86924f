"""A fake OpenAI-compatible upstream that makes two parallel tool calls in the
broken shapes real servers send, one shape per model id (see :data:`QUIRKS`), and
answers :data:`LOGPROBS_MODEL` with logprobs.

It runs in a thread of the test process (``http.server``, loopback, port 0) so that
a real Ostiary process can relay to it; every answer is computed in advance from
the calls below, streamed or whole as the request asks.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson

#: The calls every quirk must come out as, in order.
CALLS = (("get_weather", {"city": "Oslo", "days": 2}), ("get_time", {"zone": "CET"}))
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city", "days"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}},
        },
    },
]


def _args(i: int) -> str:
    return orjson.dumps(CALLS[i][1]).decode()


def _name(i: int) -> str:
    return CALLS[i][0]


def _thirds(text: str) -> list[str]:
    k = len(text) // 3
    return [text[:k], text[k : 2 * k], text[2 * k :]]


def _piece(
    index: int | None,
    *,
    id: str | None = None,
    name: str | None = None,
    arguments: str | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {} if index is None else {"index": index}
    if id is not None:
        out["id"] = id
        out["type"] = "function"
    function: dict[str, Any] = {}
    if name is not None:
        function["name"] = name
    if arguments is not None:
        function["arguments"] = arguments
    out["function"] = function
    return out


def _regular(i: int, *, ids: bool = True) -> list[dict[str, Any]]:
    first = _piece(i, id=f"up_{i}" if ids else None, name=_name(i), arguments="")
    return [first, *(_piece(i, arguments=p) for p in _thirds(_args(i)))]


def _interleaved(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    out = []
    for k in range(max(len(a), len(b))):
        out.append([p[k] for p in (a, b) if k < len(p)])
    return out


def _quirks() -> dict[str, tuple[list[list[dict[str, Any]]], str]]:
    """Per model id: each chunk's tool-call pieces, and the final finish reason."""
    q: dict[str, tuple[list[list[dict[str, Any]]], str]] = {}
    q["regular"] = (_interleaved(_regular(0), _regular(1)), "tool_calls")
    q["empty-fragments"] = (
        [
            [p, _piece(p.get("index"), arguments="")]
            for chunk in _interleaved(_regular(0), _regular(1))
            for p in chunk
        ],
        "tool_calls",
    )
    q["whole-at-end"] = (
        [
            *_interleaved(_regular(0), _regular(1)),
            [_piece(0, arguments=_args(0)), _piece(1, arguments=_args(1))],
        ],
        "tool_calls",
    )
    q["name-repeated"] = (
        [
            [{**p, "function": {**p["function"], "name": _name(p["index"])}} for p in chunk]
            for chunk in _interleaved(_regular(0), _regular(1))
        ],
        "tool_calls",
    )
    q["no-ids"] = (_interleaved(_regular(0, ids=False), _regular(1, ids=False)), "tool_calls")
    q["repeated-ids"] = (
        [
            [{**p, "id": "same"} if "id" in p else p for p in chunk]
            for chunk in _interleaved(_regular(0), _regular(1))
        ],
        "tool_calls",
    )
    late = []
    for i in (0, 1):
        pieces = _regular(i, ids=False)
        pieces[-1] = {**pieces[-1], "id": f"late_{i}", "type": "function"}
        late.append(pieces)
    q["ids-last"] = (_interleaved(*late), "tool_calls")
    q["no-index"] = (
        [[{k: v for k, v in p.items() if k != "index"}] for i in (0, 1) for p in _regular(i)],
        "tool_calls",
    )
    q["no-index-no-ids"] = (
        [
            [{k: v for k, v in p.items() if k != "index"}]
            for i in (0, 1)
            for p in _regular(i, ids=False)
        ],
        "tool_calls",
    )
    q["stop-after-calls"] = (_interleaved(_regular(0), _regular(1)), "stop")
    return q


QUIRKS = _quirks()
#: The model of every POST the upstream received (tests check what reached it).
RECEIVED: list[str] = []


def _chunk(model: str, choice: dict[str, Any]) -> bytes:
    body = {
        "id": "chatcmpl-up",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": model,
        "choices": [choice],
    }
    return b"data: " + orjson.dumps(body) + b"\n\n"


def stream_body(model: str) -> bytes:
    chunks, reason = QUIRKS[model]
    out = [_chunk(model, {"index": 0, "delta": {"role": "assistant"}, "finish_reason": None})]
    for pieces in chunks:
        delta = {"tool_calls": pieces}
        out.append(_chunk(model, {"index": 0, "delta": delta, "finish_reason": None}))
    out.append(_chunk(model, {"index": 0, "delta": {}, "finish_reason": reason}))
    usage = {"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12}
    tail = {"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1}
    out.append(b"data: " + orjson.dumps({**tail, "model": model, "choices": [], "usage": usage}))
    out.append(b"\n\ndata: [DONE]\n\n")
    return b"".join(out)


def whole_body(model: str) -> bytes:
    """A non-streamed answer in the broken shape: calls without ids, ``stop``."""
    calls = [
        {"type": "function", "function": {"name": _name(i), "arguments": _args(i)}} for i in (0, 1)
    ]
    reason = "stop" if model == "stop-after-calls" else "tool_calls"
    message = {"role": "assistant", "content": None, "tool_calls": calls}
    return orjson.dumps(
        {
            "id": "chatcmpl-up",
            "object": "chat.completion",
            "created": 1,
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": reason}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12},
        }
    )


#: The model id whose answers carry logprobs, chat's and the legacy completions'.
LOGPROBS_MODEL = "logprobs"
#: Its tokens: (text, logprob); each offers itself and one alternative.
LOGPROBS_TOKENS = (("Hel", -0.25), ("lo", -0.5), ("!", -1.5))


def _chat_token(text: str, logprob: float) -> dict[str, Any]:
    top = [(text, logprob), ("~", logprob - 3)]
    return {
        "token": text,
        "logprob": logprob,
        "bytes": list(text.encode()),
        "top_logprobs": [{"token": t, "logprob": p, "bytes": list(t.encode())} for t, p in top],
    }


def _legacy(tokens: tuple[tuple[str, float], ...], offset: int) -> dict[str, Any]:
    offsets = []
    for text, _ in tokens:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": [t for t, _ in tokens],
        "token_logprobs": [p for _, p in tokens],
        "top_logprobs": [{t: p, "~": p - 3} for t, p in tokens],
        "text_offset": offsets,
    }


def logprobs_body(chat: bool, stream: bool) -> bytes:
    """An answer with logprobs (with a field the spec lacks, which must not pass)."""
    text = "".join(t for t, _ in LOGPROBS_TOKENS)
    usage = {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    head = {"id": "up", "created": 1, "model": LOGPROBS_MODEL}
    if not stream:
        if chat:
            content = [{**_chat_token(*t), "extra": 1} for t in LOGPROBS_TOKENS]
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": {"content": content, "refusal": None},
                "finish_reason": "stop",
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": _legacy(LOGPROBS_TOKENS, 0)}
            choice["finish_reason"] = "stop"
        kind = "chat.completion" if chat else "text_completion"
        return orjson.dumps({**head, "object": kind, "choices": [choice], "usage": usage})
    events: list[dict[str, Any]] = []
    offset = 0
    for text, logprob in LOGPROBS_TOKENS:
        if chat:
            delta = {"content": text}
            lp: dict[str, Any] = {"content": [_chat_token(text, logprob)], "refusal": None}
            choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": None}
        else:
            lp = _legacy(((text, logprob),), offset)
            choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": None}
        offset += len(text)
        events.append({**head, "choices": [choice]})
    end: dict[str, Any] = {"index": 0, "finish_reason": "stop", "logprobs": None}
    if chat:
        end["delta"] = {}
    else:
        end["text"] = ""
    events += [{**head, "choices": [end]}, {**head, "choices": [], "usage": usage}]
    return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        data = orjson.dumps({"object": "list", "data": []})
        self._send(200, "application/json", data)

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", "0"))
        request = orjson.loads(self.rfile.read(length))
        model = request.get("model", "")
        RECEIVED.append(model)
        if model == LOGPROBS_MODEL:
            stream = bool(request.get("stream"))
            kind = "text/event-stream" if stream else "application/json"
            self._send(200, kind, logprobs_body(self.path.endswith("/chat/completions"), stream))
        elif model not in QUIRKS or not request.get("tools"):
            self._send(400, "application/json", b'{"error":{"message":"no such quirk"}}')
        elif request.get("stream"):
            self._send(200, "text/event-stream", stream_body(model))
        else:
            self._send(200, "application/json", whole_body(model))

    def _send(self, status: int, content_type: str, data: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        return


@contextmanager
def quirky_upstream() -> Iterator[int]:
    """Serve on a free loopback port (yielded) until the block ends."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="quirky-upstream")
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
