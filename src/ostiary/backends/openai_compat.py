"""The ``openai`` backend: any OpenAI-compatible upstream (vLLM, llama.cpp's server,
LM Studio, OpenAI itself), spoken to with :class:`~ostiary.backends.httpclient.HttpClient`.

Requests are forwarded as the client sent them (``request.raw``, already validated)
with ``model`` replaced by the upstream's id. A streaming request asks the upstream
to stream with ``stream_options.include_usage``; each upstream chunk becomes
:class:`Delta` pieces (text, tool-call pieces, finish reason, per choice). A
non-streaming request is answered upstream in one JSON body, which becomes one
Delta per choice. Either way the generation ends with exactly one :class:`Usage`:
the upstream's own when it sends one, otherwise an *estimate* (prompt: characters
/ 4; completion: one token per streamed piece, or characters / 4) so that token
limits still settle on something real rather than on zero.

Upstream failures become :class:`OpenAIError`\\ s with messages safe for a client;
what the upstream said rides along as the ``__cause__`` (:class:`OpenAIUpstreamError`)
for logs. Only a 4xx about the client's own request passes the upstream's message on
(400/404/422 -> InvalidRequestError with its param and code, 413 -> RequestTooLarge).
401/403 are our misconfiguration (BackendError); 429 -> RateLimitError with the
upstream's retry-after; 503 -> BackendUnavailableError and 408/504 ->
BackendTimeoutError (they say more than 502); other statuses -> BackendError.
Refused connections -> BackendUnavailableError; timeouts -> BackendTimeoutError;
garbage, bad JSON or a cut stream -> BackendError, raised from the iterator.
Finish reasons outside OpenAI's set become ``"stop"``; logprobs are not carried.
"""

from __future__ import annotations

import base64
import contextlib
import math
import os
import struct
from collections.abc import AsyncIterator, Sequence
from typing import Any

import attrs
import orjson
import trio

from ostiary.backends.base import BackendSettings, ConfiguredBackend, Generation
from ostiary.backends.httpclient import (
    ConnectError,
    ConnectTimeout,
    HttpClient,
    HttpClientError,
    ReadTimeout,
)
from ostiary.protocol.capabilities import Capabilities
from ostiary.protocol.errors import (
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    InvalidRequestError,
    OpenAIError,
    RateLimitError,
    RequestTooLargeError,
)
from ostiary.protocol.generation import (
    FINISH_REASONS,
    Delta,
    EmbeddingResult,
    ToolCallDelta,
    Usage,
)
from ostiary.protocol.requests import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from ostiary.protocol.sse import SseDecoder

__all__ = ["OpenAIBackend", "OpenAISettings", "OpenAIUpstreamError"]

JsonObject = dict[str, Any]

_READY_TIMEOUT = 5.0
#: After ``[DONE]``, how long to wait for the end of the HTTP body so that the
#: connection can be pooled; past it the connection is closed instead.
_DRAIN_SECONDS = 1.0
_DRAIN_MAX_BYTES = 64 * 1024
_RETRY_AFTER_DEFAULT = 1.0
_MAX_UPSTREAM_MESSAGE = 500
_MALFORMED = "The upstream model server sent a malformed response."
_SAMPLING_KEYS = (
    "max_tokens",
    "max_completion_tokens",
    "n",
    "temperature",
    "top_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "user",
)


def _http_url(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not value.startswith(("http://", "https://")):
        raise ValueError(f"{attribute.name} must start with http:// or https://, got {value!r}")


@attrs.frozen(kw_only=True)
class OpenAISettings(BackendSettings):
    """A ``[[backends]]`` table with ``kind = "openai"``."""

    kind: str = attrs.field(default="openai", validator=attrs.validators.in_(("openai",)))
    #: The upstream's API root, e.g. ``http://127.0.0.1:8001/v1``.
    base_url: str = attrs.field(validator=_http_url)
    #: Name of the environment variable holding the upstream API key (never the key).
    api_key_env: str | None = None
    connect_timeout: float = attrs.field(default=5.0, validator=attrs.validators.gt(0))
    #: Longest wait for any bytes from the upstream.
    read_timeout: float = attrs.field(default=600.0, validator=attrs.validators.gt(0))
    max_connections: int = attrs.field(default=256, validator=attrs.validators.ge(1))
    #: Our model id -> the upstream's model id; unlisted ids are sent unchanged.
    upstream_models: dict[str, str] = attrs.field(factory=dict, hash=False)
    #: Non-OpenAI parameters passed on to the upstream (``top_k``, ``min_p``...).
    extra_params: tuple[str, ...] = ()

    def capabilities(self, model: str) -> Capabilities:
        # An OpenAI-compatible upstream decides what it accepts.
        return Capabilities.upstream(self.kind_of(model), frozenset(self.extra_params))


class OpenAIUpstreamError(Exception):
    """What the upstream said, kept as the ``__cause__`` of a client-facing error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"upstream HTTP {status}: {message}")
        self.status = status
        self.upstream_message = message


class OpenAIBackend(ConfiguredBackend):
    """The :class:`~ostiary.backends.base.Backend` for one OpenAI-compatible upstream."""

    _settings: OpenAISettings

    def __init__(self, settings: OpenAISettings) -> None:
        self._settings = settings
        self._client: HttpClient | None = None

    async def __aenter__(self) -> OpenAIBackend:
        """Read the API key from the environment and open the connection pool.
        Raises ValueError if ``api_key_env`` names a variable that is unset or empty."""
        s = self._settings
        headers = [("content-type", "application/json"), ("user-agent", "ostiary")]
        if s.api_key_env is not None:
            key = os.environ.get(s.api_key_env)
            if not key:
                raise ValueError(
                    f"backend {s.name!r}: api_key_env names the environment variable "
                    f"{s.api_key_env!r}, which is not set"
                )
            headers.append(("authorization", f"Bearer {key}"))
        self._client = HttpClient(
            s.base_url,
            max_connections=s.max_connections,
            connect_timeout=s.connect_timeout,
            read_timeout=s.read_timeout,
            default_headers=headers,
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def chat(self, request: ChatCompletionRequest) -> Generation:
        """POST /chat/completions; see the module docstring for the translation."""
        return self._generate("/chat/completions", request, chat=True)

    def complete(self, request: CompletionRequest) -> Generation:
        """POST /completions; see the module docstring for the translation."""
        return self._generate("/completions", request, chat=False)

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        """POST /embeddings; base64 vectors (float32, little-endian) are decoded."""
        body = dict(request.raw) or _embedding_body(request)
        body["model"] = self._upstream(request.model)
        status, headers, data = await self._request("POST", "/embeddings", orjson.dumps(body))
        if not 200 <= status < 300:
            raise _status_error(status, headers, data, request.model, body["model"])
        try:
            answer = orjson.loads(data)
            items = sorted(answer["data"], key=lambda item: int(item.get("index", 0)))
            vectors = tuple(_vector(item["embedding"]) for item in items)
            usage = _usage(answer.get("usage"))
        except (KeyError, TypeError, ValueError, AttributeError, struct.error) as exc:
            raise BackendError(_MALFORMED) from exc
        if len(vectors) != len(request.inputs()):
            raise BackendError(_MALFORMED)
        if usage is None:
            usage = Usage(sum(_tokens_in(i) for i in request.inputs()))
        return EmbeddingResult(vectors=vectors, usage=usage)

    async def check_ready(self) -> None:
        """GET /models within a few seconds; ready when the upstream answers 2xx."""
        try:
            with trio.fail_after(min(_READY_TIMEOUT, self._settings.read_timeout)):
                status, headers, data = await self._request("GET", "/models", b"")
        except trio.TooSlowError:
            raise BackendTimeoutError("The upstream model server did not answer in time.") from None
        if not 200 <= status < 300:
            raise _status_error(status, headers, data, "", "")

    async def _generate(
        self, path: str, request: ChatCompletionRequest | CompletionRequest, *, chat: bool
    ) -> Generation:
        body = dict(request.raw) or _fallback_body(request)
        upstream = body["model"] = self._upstream(request.model)
        if not request.stream:
            body.pop("stream", None)
            body.pop("stream_options", None)
            status, headers, data = await self._request("POST", path, orjson.dumps(body))
            if not 200 <= status < 300:
                raise _status_error(status, headers, data, request.model, upstream)
            for item in _whole_body(data, request, chat=chat):
                yield item
            return
        options = body.get("stream_options")
        body["stream"] = True
        body["stream_options"] = {
            **(options if isinstance(options, dict) else {}),
            "include_usage": True,
        }
        client = self._require_client()
        translator = _StreamTranslator(chat)
        whole: bytes | None = None
        try:
            async with client.stream("POST", path, body=orjson.dumps(body)) as response:
                if not 200 <= response.status < 300:
                    data = await response.read()
                    raise _status_error(
                        response.status, response.headers, data, request.model, upstream
                    )
                content_type = response.header(b"content-type") or b""
                if content_type.startswith(b"application/json"):
                    whole = await response.read()
                else:
                    decoder = SseDecoder()
                    chunks = response.iter_bytes()
                    async for chunk in chunks:
                        for delta in translator.feed(decoder.feed(chunk)):
                            yield delta
                        if translator.done:
                            if not response.complete:
                                await _drain(chunks)
                            break
                    else:
                        for delta in translator.feed(decoder.close()):
                            yield delta
                        translator.check_finished()
        except HttpClientError as exc:
            raise _transport_error(exc) from exc
        if whole is not None:
            for item in _whole_body(whole, request, chat=chat):
                yield item
            return
        yield translator.usage or Usage(_estimate_prompt(request), translator.pieces)

    async def _request(
        self, method: str, path: str, body: bytes
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        client = self._require_client()
        try:
            return await client.request(method, path, body=body)
        except HttpClientError as exc:
            raise _transport_error(exc) from exc

    def _require_client(self) -> HttpClient:
        if self._client is None:
            raise RuntimeError("OpenAIBackend used outside 'async with backend:'")
        return self._client

    def _upstream(self, model: str) -> str:
        return self._settings.upstream_models.get(model, model)


async def _drain(chunks: AsyncIterator[bytes]) -> None:
    """Read what follows ``[DONE]`` (normally just the end of the chunked body) so
    the connection can be pooled; give up quietly (the connection is then closed)
    after a short while, too many bytes, or a broken ending: the generation itself
    is complete."""
    seen = 0
    with trio.move_on_after(_DRAIN_SECONDS), contextlib.suppress(HttpClientError):
        async for chunk in chunks:
            seen += len(chunk)
            if seen > _DRAIN_MAX_BYTES:
                return


class _StreamTranslator:
    """Upstream chunk objects in, Delta pieces out; remembers usage and progress."""

    __slots__ = ("chat", "done", "finished", "pieces", "usage")

    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self.done = False
        self.finished = False
        self.pieces = 0
        self.usage: Usage | None = None

    def feed(self, payloads: list[str]) -> list[Delta]:
        deltas: list[Delta] = []
        for payload in payloads:
            if payload == "[DONE]":
                self.done = True
                break
            try:
                self._translate(orjson.loads(payload), deltas)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise BackendError(_MALFORMED) from exc
        return deltas

    def check_finished(self) -> None:
        """The body ended without a ``[DONE]`` event: fine if a finish reason came
        (some servers omit the sentinel), else the stream was cut short."""
        if not (self.finished or self.done):
            raise BackendError("The upstream model server ended its stream early.")

    def _translate(self, chunk: JsonObject, deltas: list[Delta]) -> None:
        if chunk.get("error") or chunk.get("object") == "error":
            raise BackendError(
                "The upstream model server failed during generation."
            ) from OpenAIUpstreamError(200, str(chunk)[:_MAX_UPSTREAM_MESSAGE])
        usage = chunk.get("usage")
        if usage:
            self.usage = _usage(usage)
        for choice in chunk.get("choices") or ():
            if self.chat:
                delta = choice.get("delta") or {}
                text = delta.get("content") or ""
                calls = _tool_calls(delta.get("tool_calls"))
            else:
                text = choice.get("text") or ""
                calls = ()
            if not isinstance(text, str):
                raise TypeError("text is not a string")
            reason = choice.get("finish_reason")
            if text or calls:
                self.pieces += 1
            elif reason is None:
                continue
            if reason is not None:
                reason = _finish_reason(reason)
                self.finished = True
            deltas.append(
                Delta(text=text, choice=_index(choice), tool_calls=calls, finish_reason=reason)
            )


def _whole_body(
    data: bytes, request: ChatCompletionRequest | CompletionRequest, *, chat: bool
) -> list[Delta | Usage]:
    """A non-streamed answer: one Delta per choice (in index order), then Usage."""
    try:
        answer = orjson.loads(data)
        out: list[Delta | Usage] = []
        chars = 0
        for choice in sorted(answer["choices"], key=_index):
            if chat:
                message = choice.get("message") or {}
                text = message.get("content") or ""
                calls = _tool_calls(message.get("tool_calls"))
            else:
                text = choice.get("text") or ""
                calls = ()
            if not isinstance(text, str):
                raise TypeError("text is not a string")
            chars += len(text) + sum(len(c.arguments) for c in calls)
            reason = _finish_reason(choice.get("finish_reason") or "stop")
            out.append(
                Delta(text=text, choice=_index(choice), tool_calls=calls, finish_reason=reason)
            )
        usage = _usage(answer.get("usage"))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BackendError(_MALFORMED) from exc
    out.append(usage or Usage(_estimate_prompt(request), math.ceil(chars / 4)))
    return out


def _index(choice: JsonObject) -> int:
    index = choice.get("index", 0)
    if type(index) is not int or index < 0:
        raise TypeError("choice index is not a non-negative integer")
    return index


def _tool_calls(calls: Sequence[JsonObject] | None) -> tuple[ToolCallDelta, ...]:
    """Tool-call pieces from a stream delta or a whole message (whose calls carry
    no ``index``: their position is their index)."""
    if not calls:
        return ()
    out = []
    for position, call in enumerate(calls):
        function = call.get("function") or {}
        index = call.get("index", position)
        call_id = call.get("id")
        name = function.get("name")
        arguments = function.get("arguments") or ""
        if (
            type(index) is not int
            or not isinstance(arguments, str)
            or not isinstance(call_id, str | None)
            or not isinstance(name, str | None)
        ):
            raise TypeError("malformed tool call")
        out.append(ToolCallDelta(index=index, id=call_id, name=name, arguments=arguments))
    return tuple(out)


def _finish_reason(reason: object) -> str:
    if not isinstance(reason, str):
        raise TypeError("finish_reason is not a string")
    return reason if reason in FINISH_REASONS else "stop"


def _usage(usage: object) -> Usage | None:
    if not usage:
        return None
    if not isinstance(usage, dict):
        raise TypeError("usage is not an object")
    prompt = usage.get("prompt_tokens", 0)
    completion = usage.get("completion_tokens") or 0
    if type(prompt) is not int or type(completion) is not int or prompt < 0 or completion < 0:
        raise TypeError("usage counts are not non-negative integers")
    return Usage(prompt, completion)


def _vector(embedding: object) -> tuple[float, ...]:
    if isinstance(embedding, str):
        raw = base64.b64decode(embedding, validate=True)
        return struct.unpack(f"<{len(raw) // 4}f", raw)
    if not isinstance(embedding, list) or not all(
        isinstance(x, int | float) and not isinstance(x, bool) for x in embedding
    ):
        raise TypeError("embedding is not a list of numbers")
    return tuple(float(x) for x in embedding)


def _tokens_in(value: str | tuple[int, ...]) -> int:
    return math.ceil(len(value) / 4) if isinstance(value, str) else len(value)


def _estimate_prompt(request: ChatCompletionRequest | CompletionRequest) -> int:
    """Rough prompt tokens for upstreams that report no usage: characters / 4."""
    if isinstance(request, ChatCompletionRequest):
        return sum(_tokens_in(m.text()) + 4 for m in request.messages)
    return sum(_tokens_in(p) for p in request.prompts())


def _fallback_body(request: ChatCompletionRequest | CompletionRequest) -> JsonObject:
    """A request body rebuilt from typed fields, for requests made without ``raw``
    (the decoder always sets it; this keeps hand-built requests working)."""
    body: JsonObject = {"model": request.model}
    if isinstance(request, ChatCompletionRequest):
        body["messages"] = [{"role": m.role, "content": m.text()} for m in request.messages]
    else:
        prompt = request.prompt
        body["prompt"] = (
            prompt
            if isinstance(prompt, str)
            else [p if isinstance(p, str | int) else list(p) for p in prompt]
        )
    for key in _SAMPLING_KEYS:
        value = getattr(request, key, None)
        if value is not None:
            body[key] = value
    if request.stop is not None:
        body["stop"] = list(request.stop)
    return body


def _embedding_body(request: EmbeddingRequest) -> JsonObject:
    inputs = [i if isinstance(i, str) else list(i) for i in request.inputs()]
    body: JsonObject = {"model": request.model, "input": inputs}
    body["encoding_format"] = request.encoding_format
    if request.dimensions is not None:
        body["dimensions"] = request.dimensions
    return body


def _upstream_error(data: bytes) -> tuple[str | None, str | None, str | None]:
    """``(message, param, code)`` from an OpenAI-style error body (also vLLM's older
    top-level form); Nones when the body is something else."""
    try:
        answer = orjson.loads(data)
    except ValueError:
        return None, None, None
    if not isinstance(answer, dict):
        return None, None, None
    error = answer.get("error")
    if isinstance(error, str):
        return error[:_MAX_UPSTREAM_MESSAGE], None, None
    source = error if isinstance(error, dict) else answer
    message, param, code = source.get("message"), source.get("param"), source.get("code")
    return (
        message[:_MAX_UPSTREAM_MESSAGE] if isinstance(message, str) and message else None,
        param if isinstance(param, str) else None,
        str(code) if isinstance(code, str | int) and not isinstance(code, bool) else None,
    )


def _retry_after(headers: list[tuple[bytes, bytes]], default: float) -> float:
    """Seconds from ``retry-after-ms`` or ``retry-after``; ``default`` when neither
    holds a number (an HTTP date is not worth parsing here)."""
    values = dict(headers)
    for name, scale in ((b"retry-after-ms", 0.001), (b"retry-after", 1.0)):
        value = values.get(name)
        if value is not None:
            try:
                seconds = float(value) * scale
            except ValueError:
                continue
            if math.isfinite(seconds) and seconds >= 0:
                return seconds
    return default


def _status_error(
    status: int, headers: list[tuple[bytes, bytes]], data: bytes, model: str, upstream: str
) -> OpenAIError:
    """The client-facing error for an upstream's non-2xx answer."""
    message, param, code = _upstream_error(data)
    if message and upstream and upstream != model:
        message = message.replace(upstream, model)
    error: OpenAIError
    if status in (400, 404, 422):
        error = InvalidRequestError(
            message or f"The upstream model server rejected the request (HTTP {status}).",
            param=param,
            code=code,
        )
    elif status == 413:
        error = RequestTooLargeError(
            message or "The request is too large for the upstream model server.", param=param
        )
    elif status in (401, 403):
        error = BackendError("The upstream model server rejected our credentials.")
    elif status == 429:
        error = RateLimitError(
            "The upstream model server is rate limiting requests; try again later.",
            retry_after=_retry_after(headers, _RETRY_AFTER_DEFAULT),
        )
    elif status == 503:
        error = BackendUnavailableError(
            "The upstream model server is unavailable; try again later.",
            retry_after=_retry_after(headers, _RETRY_AFTER_DEFAULT),
        )
    elif status in (408, 504):
        error = BackendTimeoutError("The upstream model server timed out.")
    elif status >= 500:
        error = BackendError(f"The upstream model server failed (HTTP {status}).")
    else:
        error = BackendError(f"The upstream model server answered with HTTP {status}.")
    error.__cause__ = OpenAIUpstreamError(status, message or data[:200].decode(errors="replace"))
    return error


def _transport_error(exc: HttpClientError) -> OpenAIError:
    if isinstance(exc, ConnectTimeout):
        return BackendTimeoutError("Connecting to the upstream model server timed out.")
    if isinstance(exc, ConnectError):
        return BackendUnavailableError(
            "The upstream model server is not reachable.", retry_after=_RETRY_AFTER_DEFAULT
        )
    if isinstance(exc, ReadTimeout):
        return BackendTimeoutError("The upstream model server did not answer in time.")
    return BackendError("The upstream model server sent an invalid response.")
