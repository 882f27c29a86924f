"""A faithful local fake of Ollama's HTTP API, for tests.

Built from Ollama's own API documentation (``docs/api.md`` in the ollama/ollama
repository and docs.ollama.com/api, including its page on errors), not from its
code: ``POST /api/chat``, ``POST /api/generate``, ``POST /api/embed``,
``GET /api/tags`` and ``GET /``, with

- NDJSON streams (``application/x-ndjson``, chunked) whose objects carry the
  documented fields: ``model``, ``created_at``, ``message`` (``role``, ``content``,
  ``tool_calls`` with ``arguments`` as a JSON object) or ``response``, ``done``,
  and on the last object ``done_reason``, ``total_duration``, ``load_duration``,
  ``prompt_eval_count``, ``prompt_eval_duration``, ``eval_count``,
  ``eval_duration``; a single JSON object when the request says ``"stream": false``;
- the documented ``options`` (an unknown option is a 400 here, so that a typo in a
  mapping fails a test), ``num_predict`` (``done_reason`` ``"length"``), ``stop``,
  ``format`` (``"json"`` or a JSON schema), ``tools``, ``images`` (base64),
  ``suffix``, ``raw``, ``keep_alive``, and ``/api/embed``'s ``truncate`` and
  ``dimensions``;
- errors as ``{"error": "..."}``: 400 for a bad body, 404
  ``model "x" not found, try pulling it first`` for an unknown model, Go's plain
  ``404 page not found`` for an unknown route, and an ``{"error": ...}`` line when
  a stream fails after it started.

Everything is deterministic: the reply is :attr:`FakeOllama.reply` cut into
word-sized tokens, token counts are word counts, durations and timestamps are
fixed. :attr:`FakeOllama.fault` injects failures; :attr:`FakeOllama.requests`
records what arrived, so tests can assert the exact bodies a backend sent.

Use it inside a test's nursery::

    fake = await nursery.start(serve_fake_ollama)
    settings = OllamaSettings(..., base_url=fake.base_url)
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from collections.abc import Sequence
from typing import Any

import attrs
import h11
import orjson
import trio

__all__ = ["FakeOllama", "Fault", "RecordedRequest", "serve_fake_ollama"]

JsonObject = dict[str, Any]

CREATED_AT = "2024-07-22T20:33:28.123648Z"
DEFAULT_MODELS = ("llama3.2:latest", "all-minilm:latest")
#: The option names Ollama's Modelfile documentation lists as valid.
VALID_OPTIONS = frozenset(
    {
        "num_keep",
        "seed",
        "num_predict",
        "top_k",
        "top_p",
        "min_p",
        "typical_p",
        "repeat_last_n",
        "temperature",
        "repeat_penalty",
        "presence_penalty",
        "frequency_penalty",
        "mirostat",
        "mirostat_tau",
        "mirostat_eta",
        "penalize_newline",
        "stop",
        "numa",
        "num_ctx",
        "num_batch",
        "num_gpu",
        "main_gpu",
        "low_vram",
        "vocab_only",
        "use_mmap",
        "use_mlock",
        "num_thread",
    }
)
_STATS = {
    "total_duration": 885095291,
    "load_duration": 3753500,
    "prompt_eval_duration": 328493000,
    "eval_duration": 552222000,
}


class Fault(enum.Enum):
    """What goes wrong while set. ``HTTP_ERROR`` and ``HANG_BEFORE_RESPONSE`` hit
    every ``/api/`` request (``/api/tags`` too); the others hit streamed answers."""

    #: Answer ``error_status`` with ``error_body`` (default ``{"error": error_message}``).
    HTTP_ERROR = "http_error"
    #: Stream ``fault_after`` objects, then ``{"error": error_message}``.
    ERROR_MID_STREAM = "error_mid_stream"
    #: Answer 200 with a body that is not NDJSON.
    GARBAGE = "garbage"
    #: Read the request and answer nothing until the client leaves.
    HANG_BEFORE_RESPONSE = "hang_before_response"
    #: Stream ``fault_after`` objects, then nothing until the client leaves.
    HANG_MID_STREAM = "hang_mid_stream"
    #: Stream ``fault_after`` objects, then close the TCP connection.
    CLOSE_MID_STREAM = "close_mid_stream"
    #: Stream ``fault_after`` objects, then end the body without a ``done`` object.
    NO_DONE = "no_done"


@attrs.frozen
class RecordedRequest:
    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    #: The parsed JSON body (None when there was none or it was not JSON).
    json: Any


class _ClientGone(Exception):
    pass


@attrs.define
class FakeOllama:
    """The fake's state: configure it between requests, read it after."""

    port: int = 0
    #: Names as ``/api/tags`` lists them.
    models: list[str] = attrs.Factory(lambda: list(DEFAULT_MODELS))
    reply: str = "The sky is blue because of Rayleigh scattering."
    #: Sent as ``message.tool_calls`` when a chat request has ``tools``.
    tool_calls: list[JsonObject] = attrs.Factory(list)
    embedding_size: int = 8
    #: Words an input may have when ``truncate`` is false.
    context_length: int = 64
    fault: Fault | None = None
    fault_after: int = 1
    error_status: int = 500
    error_message: str = "an error was encountered while running the model"
    error_body: bytes | None = None
    #: When set, a streamed answer's body is exactly these chunks, whatever was asked.
    script: list[bytes] | None = None
    #: False: ignore ``dimensions`` like an Ollama older than the parameter.
    honour_dimensions: bool = True
    requests: list[RecordedRequest] = attrs.Factory(list)
    connections_opened: int = 0
    connections_closed: int = 0
    _closed_event: trio.Event = attrs.Factory(trio.Event)
    _request_event: trio.Event = attrs.Factory(trio.Event)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def last_json(self) -> Any:
        return self.requests[-1].json

    async def wait_closed(self, count: int) -> None:
        """Return once at least ``count`` connections have ended."""
        while self.connections_closed < count:
            await self._closed_event.wait()

    async def wait_requests(self, count: int) -> None:
        """Return once at least ``count`` whole requests have arrived."""
        while len(self.requests) < count:
            await self._request_event.wait()

    # -- connections -----------------------------------------------------------

    async def handle_connection(self, stream: trio.SocketStream) -> None:
        self.connections_opened += 1
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request = await self._read_request(conn, stream)
                if request is None:
                    return
                await self._respond(conn, stream, request)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (_ClientGone, trio.BrokenResourceError, h11.RemoteProtocolError):
            pass
        finally:
            await stream.aclose()
            self.connections_closed += 1
            self._closed_event.set()
            self._closed_event = trio.Event()

    async def _read_request(
        self, conn: h11.Connection, stream: trio.SocketStream
    ) -> RecordedRequest | None:
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                try:
                    parsed = orjson.loads(body) if body else None
                except orjson.JSONDecodeError:
                    parsed = None
                recorded = RecordedRequest(
                    method=head.method.decode(),
                    path=head.target.decode(),
                    headers=tuple((k.decode(), v.decode()) for k, v in head.headers),
                    json=parsed,
                )
                self.requests.append(recorded)
                self._request_event.set()
                self._request_event = trio.Event()
                return recorded
            else:  # ConnectionClosed
                return None

    async def _wait_for_client_to_leave(self, stream: trio.SocketStream) -> None:
        while await stream.receive_some(65536):
            pass
        raise _ClientGone

    # -- responses ---------------------------------------------------------------

    async def _respond(
        self, conn: h11.Connection, stream: trio.SocketStream, request: RecordedRequest
    ) -> None:
        route = (request.method, request.path)
        if route == ("GET", "/"):
            return await _send_whole(conn, stream, 200, b"Ollama is running", "text/plain")
        if self.fault is Fault.HTTP_ERROR:
            data = self.error_body or orjson.dumps({"error": self.error_message})
            return await _send_whole(conn, stream, self.error_status, data, "application/json")
        if self.fault is Fault.HANG_BEFORE_RESPONSE:
            return await self._wait_for_client_to_leave(stream)
        if route == ("GET", "/api/tags"):
            return await _send_json(conn, stream, 200, {"models": self._tags()})
        if route not in (("POST", "/api/chat"), ("POST", "/api/generate"), ("POST", "/api/embed")):
            return await _send_whole(conn, stream, 404, b"404 page not found", "text/plain")
        body = request.json
        if not isinstance(body, dict):
            return await _send_error(conn, stream, 400, "missing request body")
        if not isinstance(body.get("model"), str) or not body["model"]:
            return await _send_error(conn, stream, 400, "model is required")
        if _full_name(body["model"]) not in {_full_name(m) for m in self.models}:
            message = f'model "{body["model"]}" not found, try pulling it first'
            return await _send_error(conn, stream, 404, message)
        problem = _check_options(body)
        if problem:
            return await _send_error(conn, stream, 400, problem)
        if request.path == "/api/embed":
            return await self._embed(conn, stream, body)
        objects = self._chat(body) if request.path == "/api/chat" else self._generate(body)
        if isinstance(objects, str):
            return await _send_error(conn, stream, 400, objects)
        if body.get("stream", True) is False:
            return await _send_json(conn, stream, 200, _merge(objects, request.path))
        await self._stream(conn, stream, objects)

    async def _stream(
        self, conn: h11.Connection, stream: trio.SocketStream, objects: list[JsonObject]
    ) -> None:
        headers = [("content-type", "application/x-ndjson"), ("date", "fake")]
        await _send(conn, stream, h11.Response(status_code=200, headers=headers))
        if self.script is not None:
            for chunk in self.script:
                await _send(conn, stream, h11.Data(data=chunk))
            return await _send(conn, stream, h11.EndOfMessage())
        if self.fault is Fault.GARBAGE:
            await _send(conn, stream, h11.Data(data=b"<html>502 Bad Gateway</html>\n"))
            return await _send(conn, stream, h11.EndOfMessage())
        faulty = self.fault in (
            Fault.ERROR_MID_STREAM,
            Fault.HANG_MID_STREAM,
            Fault.CLOSE_MID_STREAM,
            Fault.NO_DONE,
        )
        for i, obj in enumerate(objects):
            if faulty and i == self.fault_after:
                break
            await _send(conn, stream, h11.Data(data=orjson.dumps(obj) + b"\n"))
        if self.fault is Fault.ERROR_MID_STREAM:
            line = orjson.dumps({"error": self.error_message}) + b"\n"
            await _send(conn, stream, h11.Data(data=line))
        elif self.fault is Fault.HANG_MID_STREAM:
            return await self._wait_for_client_to_leave(stream)
        elif self.fault is Fault.CLOSE_MID_STREAM:
            raise _ClientGone  # closes the socket without ending the chunked body
        await _send(conn, stream, h11.EndOfMessage())

    def _tags(self) -> list[JsonObject]:
        return [
            {
                "name": name,
                "model": name,
                "modified_at": "2024-11-04T14:56:49.277302595-07:00",
                "size": 7365960935,
                "digest": "9f438cb9cd581fc025612d27f7c1a6669ff83a8bb0ed86c94fcf4c5440555697",
                "details": {
                    "format": "gguf",
                    "family": "llama",
                    "families": None,
                    "parameter_size": "3B",
                    "quantization_level": "Q4_0",
                },
            }
            for name in self.models
        ]

    def _tokens(self, options: JsonObject) -> tuple[list[str], str]:
        """The reply's tokens after ``num_predict`` and ``stop``, and the done_reason."""
        limit = options.get("num_predict")
        stops = options.get("stop") or []
        out: list[str] = []
        text = ""
        for i, token in enumerate(re.findall(r"\s*\S+", self.reply)):
            if isinstance(limit, int) and limit >= 0 and i >= limit:
                return out, "length"
            cuts = [(text + token).find(s) for s in stops if s in text + token]
            if cuts:
                if min(cuts) > len(text):
                    out.append((text + token)[len(text) : min(cuts)])
                return out, "stop"
            out.append(token)
            text += token
        return out, "stop"

    def _chat(self, body: JsonObject) -> list[JsonObject] | str:
        messages = body.get("messages")
        if not isinstance(messages, list):
            return "messages must be an array"
        prompt_words = 0
        for message in messages:
            problem = _check_message(message)
            if problem:
                return problem
            prompt_words += len(message.get("content", "").split())
        tools = body.get("tools")
        if tools is not None and not (
            isinstance(tools, list) and all(_valid_tool(t) for t in tools)
        ):
            return "invalid tools"
        base = {"model": body["model"], "created_at": CREATED_AT}
        tokens: list[str]
        if tools and self.tool_calls:
            tokens, reason = [], "stop"
            chunks = [{**base, "message": _assistant("", self.tool_calls), "done": False}]
        else:
            tokens, reason = self._tokens(body.get("options") or {})
            chunks = [{**base, "message": _assistant(t), "done": False} for t in tokens]
        last = {
            **base,
            "message": _assistant(""),
            "done": True,
            "done_reason": reason,
            **_STATS,
            "prompt_eval_count": prompt_words,
            "eval_count": len(tokens) + 5 * len(self.tool_calls if tools else []),
        }
        return [*chunks, last]

    def _generate(self, body: JsonObject) -> list[JsonObject] | str:
        prompt = body.get("prompt", "")
        suffix = body.get("suffix")
        if not isinstance(prompt, str) or not isinstance(suffix, str | None):
            return "prompt and suffix must be strings"
        if body.get("raw") and suffix is not None:
            return "raw mode does not support template, system, or context"
        base = {"model": body["model"], "created_at": CREATED_AT}
        tokens, reason = self._tokens(body.get("options") or {})
        chunks = [{**base, "response": t, "done": False} for t in tokens]
        last = {
            **base,
            "response": "",
            "done": True,
            "done_reason": reason,
            **_STATS,
            "prompt_eval_count": len(prompt.split()) + len((suffix or "").split()),
            "eval_count": len(tokens),
        }
        return [*chunks, last]

    async def _embed(
        self, conn: h11.Connection, stream: trio.SocketStream, body: JsonObject
    ) -> None:
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
            return await _send_error(conn, stream, 400, "invalid input type")
        size = self.embedding_size
        dimensions = body.get("dimensions")
        if dimensions is not None and self.honour_dimensions:
            if not isinstance(dimensions, int) or not 0 < dimensions <= size:
                return await _send_error(conn, stream, 400, "invalid dimensions")
            size = dimensions
        if body.get("truncate") is False and any(
            len(i.split()) > self.context_length for i in inputs
        ):
            return await _send_error(
                conn, stream, 400, "the input length exceeds the context length"
            )
        answer = {
            "model": body["model"],
            "embeddings": [_vector(text, size) for text in inputs],
            "total_duration": 14143917,
            "load_duration": 1019500,
            "prompt_eval_count": sum(len(i.split()) for i in inputs),
        }
        await _send_json(conn, stream, 200, answer)


def _full_name(name: str) -> str:
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


def _assistant(content: str, tool_calls: Sequence[JsonObject] = ()) -> JsonObject:
    message: JsonObject = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = list(tool_calls)
    return message


def _vector(text: str, size: int) -> list[float]:
    seed = sum(text.encode())
    return [((seed + 7 * i) % 100) / 100 for i in range(size)]


def _merge(objects: list[JsonObject], path: str) -> JsonObject:
    """The single object Ollama answers with when ``stream`` is false."""
    last = dict(objects[-1])
    if path == "/api/generate":
        last["response"] = "".join(o["response"] for o in objects)
    else:
        calls = [c for o in objects for c in o["message"].get("tool_calls", [])]
        last["message"] = _assistant("".join(o["message"]["content"] for o in objects), calls)
    return last


def _check_options(body: JsonObject) -> str | None:
    options = body.get("options")
    if options is not None:
        if not isinstance(options, dict):
            return "options must be an object"
        unknown = sorted(set(options) - VALID_OPTIONS)
        if unknown:
            return f"invalid options: {', '.join(unknown)}"
        if "stop" in options and not isinstance(options["stop"], list):
            return "stop must be an array of strings"
    fmt = body.get("format")
    if fmt is not None and fmt != "json" and not isinstance(fmt, dict):
        return "invalid format"
    return None


def _check_message(message: Any) -> str | None:
    if not isinstance(message, dict):
        return "messages must be objects"
    if message.get("role") not in ("system", "user", "assistant", "tool"):
        return f"invalid role: {message.get('role')}"
    if not isinstance(message.get("content", ""), str):
        return "content must be a string"
    for image in message.get("images") or []:
        try:
            base64.b64decode(image, validate=True)
        except (binascii.Error, TypeError):
            return "illegal base64 data in image"
    for call in message.get("tool_calls") or []:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("arguments"), dict):
            return "tool call arguments must be an object"
    return None


def _valid_tool(tool: Any) -> bool:
    return (
        isinstance(tool, dict)
        and tool.get("type") == "function"
        and isinstance(tool.get("function"), dict)
        and isinstance(tool["function"].get("name"), str)
    )


async def _send(conn: h11.Connection, stream: trio.SocketStream, event: Any) -> None:
    data = conn.send(event)
    if data:
        await stream.send_all(data)


async def _send_whole(
    conn: h11.Connection, stream: trio.SocketStream, status: int, data: bytes, content_type: str
) -> None:
    headers = [("content-type", content_type), ("content-length", str(len(data)))]
    await _send(conn, stream, h11.Response(status_code=status, headers=headers))
    await _send(conn, stream, h11.Data(data=data))
    await _send(conn, stream, h11.EndOfMessage())


async def _send_json(
    conn: h11.Connection, stream: trio.SocketStream, status: int, value: Any
) -> None:
    await _send_whole(conn, stream, status, orjson.dumps(value), "application/json; charset=utf-8")


async def _send_error(
    conn: h11.Connection, stream: trio.SocketStream, status: int, message: str
) -> None:
    await _send_json(conn, stream, status, {"error": message})


async def serve_fake_ollama(
    *,
    task_status: trio.TaskStatus[FakeOllama] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve a :class:`FakeOllama` on a free loopback port until cancelled; the
    value passed to ``task_status.started`` (what ``nursery.start`` returns) is it."""
    fake = FakeOllama()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    fake.port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        task_status.started(fake)
        await trio.serve_listeners(fake.handle_connection, listeners, handler_nursery=nursery)
