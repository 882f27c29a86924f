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

The connection pool, draining, readiness and the mapping of upstream failures to
:class:`OpenAIError`\\ s (an upstream 429 is a 503 ``upstream_busy``; only a 4xx
about the client's own request passes the upstream's message on) are
:class:`~ostiary.backends.upstream.UpstreamBackend`'s, shared with ``ollama``.
An error the upstream reports inside a stream, bad JSON or a cut stream is a 502,
raised from the iterator.
Finish reasons outside OpenAI's set become ``"stop"``, and so does a missing one
(see :class:`_StreamTranslator`); an answer with no choice, or a choice index
outside the ``n`` asked for (per prompt), is a 502. Logprobs are carried when the
request asks for them, checked and cut to the spec's shape (chat: ``content`` and
``refusal`` lists; completions: the legacy four lists); a shape that does not fit
is a 502 too.
"""

from __future__ import annotations

import base64
import math
import os
import struct
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import orjson

from ostiary.backends.base import Generation
from ostiary.backends.upstream import (
    UpstreamBackend,
    UpstreamSettings,
    ended_early,
    generation_failed,
    invalid_response,
)
from ostiary.protocol.capabilities import Capabilities
from ostiary.protocol.generation import (
    FINISH_REASONS,
    Delta,
    EmbeddingResult,
    Logprobs,
    ToolCallDelta,
    Usage,
)
from ostiary.protocol.requests import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from ostiary.protocol.sse import SseDecoder

__all__ = ["OpenAIBackend", "OpenAISettings"]

JsonObject = dict[str, Any]

_PARSE_ERRORS = (KeyError, TypeError, ValueError, AttributeError)
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


@attrs.frozen(kw_only=True)
class OpenAISettings(UpstreamSettings):
    """A ``[[backends]]`` table with ``kind = "openai"``; the keys it shares with
    other upstreams are :class:`~ostiary.backends.upstream.UpstreamSettings`'."""

    kind: str = attrs.field(default="openai", validator=attrs.validators.in_(("openai",)))
    #: Name of the environment variable holding the upstream API key (never the key).
    api_key_env: str | None = None
    max_connections: int = attrs.field(default=256, validator=attrs.validators.ge(1))
    #: Non-OpenAI parameters passed on to the upstream (``top_k``, ``min_p``...).
    extra_params: tuple[str, ...] = ()

    def capabilities(self, model: str) -> Capabilities:
        # An OpenAI-compatible upstream decides what it accepts.
        return Capabilities.upstream(self.kind_of(model), frozenset(self.extra_params))


class OpenAIBackend(UpstreamBackend):
    """The :class:`~ostiary.backends.base.Backend` for one OpenAI-compatible upstream."""

    _settings: OpenAISettings

    def _default_headers(self) -> list[tuple[str, str]]:
        """Adds the API key from the environment. Raises ValueError if ``api_key_env``
        names a variable that is unset or empty."""
        s = self._settings
        headers = super()._default_headers()
        if s.api_key_env is not None:
            key = os.environ.get(s.api_key_env)
            if not key:
                raise ValueError(
                    f"backend {s.name!r}: api_key_env names the environment variable "
                    f"{s.api_key_env!r}, which is not set"
                )
            headers.append(("authorization", f"Bearer {key}"))
        return headers

    def chat(self, request: ChatCompletionRequest) -> Generation:
        """POST /chat/completions; see the module docstring for the translation."""
        return self._generate("/chat/completions", request, chat=True)

    def complete(self, request: CompletionRequest) -> Generation:
        """POST /completions; see the module docstring for the translation."""
        return self._generate("/completions", request, chat=False)

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        """POST /embeddings; base64 vectors (float32, little-endian) are decoded."""
        body = dict(request.raw) or _embedding_body(request)
        upstream = body["model"] = self._upstream(request.model)
        with self._failures():
            data = await self._call(
                "POST",
                "/embeddings",
                orjson.dumps(body),
                model=request.model,
                aliases=(upstream,),
                max_bytes=self._settings.max_embeddings_response_bytes,
            )
            try:
                answer = orjson.loads(data)
                items = sorted(answer["data"], key=lambda item: int(item.get("index", 0)))
                vectors = tuple(_vector(item["embedding"]) for item in items)
                usage = _usage(answer.get("usage"))
            except (*_PARSE_ERRORS, struct.error) as exc:
                raise invalid_response() from exc
            if len(vectors) != len(request.inputs()):
                raise invalid_response()
        if usage is None:
            usage = Usage(sum(_tokens_in(i) for i in request.inputs()))
        return EmbeddingResult(vectors=vectors, usage=usage)

    async def check_ready(self) -> None:
        """GET /models; ready when the upstream answers 2xx in time."""
        with self._failures():
            await self._ready_body("/models")

    async def _generate(
        self, path: str, request: ChatCompletionRequest | CompletionRequest, *, chat: bool
    ) -> Generation:
        body = dict(request.raw) or _fallback_body(request)
        upstream = body["model"] = self._upstream(request.model)
        aliases = (upstream,)
        choices = _choices(request)
        if not request.stream:
            body.pop("stream", None)
            body.pop("stream_options", None)
            with self._failures():
                data = await self._call(
                    "POST", path, orjson.dumps(body), model=request.model, aliases=aliases
                )
                items = _whole_body(data, request, chat=chat, choices=choices)
            for item in items:
                yield item
            return
        options = body.get("stream_options")
        body["stream"] = True
        body["stream_options"] = {
            **(options if isinstance(options, dict) else {}),
            "include_usage": True,
        }
        translator = _StreamTranslator(chat, choices, _logprobs_reader(request))
        with self._failures():
            async with self._http.stream("POST", path, body=orjson.dumps(body)) as response:
                await self._check_status(response, request.model, aliases)
                content_type = response.header(b"content-type") or b""
                if content_type.startswith(b"application/json"):
                    items = _whole_body(await response.read(), request, chat=chat, choices=choices)
                else:
                    decoder = SseDecoder()
                    chunks = response.iter_bytes()
                    async for chunk in chunks:
                        for delta in translator.feed(decoder.feed(chunk)):
                            yield delta
                        if translator.done:
                            if not response.complete:
                                await self._drain(chunks)
                            break
                    else:
                        for delta in translator.feed(decoder.close()):
                            yield delta
                        for delta in translator.check_finished():
                            yield delta
                    usage = translator.usage or Usage(_estimate_prompt(request), translator.pieces)
                    items = [usage]
        for item in items:
            yield item


class _StreamTranslator:
    """Upstream chunk objects in, Delta pieces out; remembers usage and progress.

    A choice index outside the ``choices`` the request asked for is an invalid
    response, as it is in a whole body. A stream that ends (``[DONE]``, or a body
    that ends after a finish reason) with a choice that began but never got a
    finish reason has ``"stop"`` made up for it, as a whole body's choice without
    one reads: the upstream said the output was complete, it only left out why it
    stopped (a cut stream, with neither, is an error). A stream that ends with no
    choice at all answered nothing: an invalid response, as ``"choices": []`` is."""

    __slots__ = (
        "chat",
        "choices",
        "done",
        "finished",
        "logprobs",
        "open",
        "pieces",
        "seen",
        "usage",
    )

    def __init__(self, chat: bool, choices: int = 1, logprobs: _LogprobsReader = None) -> None:
        self.chat = chat
        self.choices = choices
        #: Reads a choice's ``logprobs`` (None: the request asked for none).
        self.logprobs = logprobs
        self.done = False
        self.finished = False
        self.pieces = 0
        self.usage: Usage | None = None
        #: Choices that began and have no finish reason yet.
        self.open: set[int] = set()
        self.seen = False

    def feed(self, payloads: list[str]) -> list[Delta]:
        deltas: list[Delta] = []
        for payload in payloads:
            if payload == "[DONE]":
                self.done = True
                self._close(deltas)
                break
            try:
                self._translate(orjson.loads(payload), deltas)
            except _PARSE_ERRORS as exc:
                raise invalid_response() from exc
        return deltas

    def check_finished(self) -> list[Delta]:
        """The body ended without a ``[DONE]`` event: fine if a finish reason came
        (some servers omit the sentinel), else the stream was cut short. Returns
        the finish reasons still owed."""
        if not (self.finished or self.done):
            raise ended_early()
        deltas: list[Delta] = []
        if not self.done:
            self._close(deltas)
        return deltas

    def _close(self, deltas: list[Delta]) -> None:
        if not self.seen:
            raise invalid_response()
        deltas.extend(Delta(choice=i, finish_reason="stop") for i in sorted(self.open))
        self.open.clear()

    def _translate(self, chunk: JsonObject, deltas: list[Delta]) -> None:
        if chunk.get("error") or chunk.get("object") == "error":
            raise generation_failed(str(chunk.get("error") or chunk))
        usage = chunk.get("usage")
        if usage:
            self.usage = _usage(usage)
        for choice in chunk.get("choices") or ():
            index = _index(choice, self.choices)
            self.seen = True
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
            read = self.logprobs
            logprobs = None if read is None else read(choice.get("logprobs"))
            if text or calls:
                self.pieces += 1
            elif reason is None and logprobs is None:
                self.open.add(index)
                continue
            if reason is not None:
                reason = _finish_reason(reason)
                self.finished = True
                self.open.discard(index)
            else:
                self.open.add(index)
            deltas.append(Delta(text, index, calls, reason, logprobs))


def _whole_body(
    data: bytes | bytearray,
    request: ChatCompletionRequest | CompletionRequest,
    *,
    chat: bool,
    choices: int,
) -> list[Delta | Usage]:
    """A non-streamed answer: one Delta per choice (in index order), then Usage.
    No choice at all, or one outside the ``choices`` asked for, is invalid."""
    read = _logprobs_reader(request)
    try:
        answer = orjson.loads(data)
        out: list[Delta | Usage] = []
        chars = 0
        given = answer["choices"]
        if not given:
            raise ValueError("no choices")
        indexed = sorted(((_index(c, choices), c) for c in given), key=lambda pair: pair[0])
        for index, choice in indexed:
            if chat:
                message = choice.get("message") or {}
                text = message.get("content") or ""
                calls = _tool_calls(message.get("tool_calls"), whole=True)
            else:
                text = choice.get("text") or ""
                calls = ()
            if not isinstance(text, str):
                raise TypeError("text is not a string")
            chars += len(text) + sum(len(c.arguments) for c in calls)
            reason = _finish_reason(choice.get("finish_reason") or "stop")
            logprobs = None if read is None else read(choice.get("logprobs"))
            out.append(Delta(text, index, calls, reason, logprobs))
        usage = _usage(answer.get("usage"))
    except _PARSE_ERRORS as exc:
        raise invalid_response() from exc
    out.append(usage or Usage(_estimate_prompt(request), math.ceil(chars / 4)))
    return out


_LogprobsReader = Callable[[object], Logprobs | None] | None


def _logprobs_reader(request: ChatCompletionRequest | CompletionRequest) -> _LogprobsReader:
    """What reads a choice's ``logprobs``: None unless the request asked for them
    (what an upstream sends unasked is not looked at)."""
    if isinstance(request, ChatCompletionRequest):
        return _chat_logprobs if request.logprobs else None
    return _text_logprobs if request.logprobs is not None else None


def _chat_logprobs(value: object) -> Logprobs | None:
    """A chat choice's logprobs, in the spec's shape: both lists present (or
    None), each token's ``token``, ``logprob``, ``bytes`` and ``top_logprobs``,
    nothing else. TypeError or KeyError for anything that does not fit."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TypeError("logprobs is not an object")
    out: Logprobs = {}
    for key in ("content", "refusal"):
        tokens = value.get(key)
        if tokens is not None and not isinstance(tokens, list):
            raise TypeError(f"logprobs.{key} is not a list")
        out[key] = None if tokens is None else [_token_logprob(t, top=True) for t in tokens]
    return out


def _token_logprob(entry: JsonObject, *, top: bool) -> JsonObject:
    token, logprob, raw = entry["token"], entry["logprob"], entry.get("bytes")
    if not isinstance(token, str) or type(logprob) not in (int, float):
        raise TypeError("malformed token logprob")
    if raw is not None and (
        not isinstance(raw, list) or not all(type(b) is int and 0 <= b < 256 for b in raw)
    ):
        raise TypeError("token bytes are not a list of bytes")
    out: JsonObject = {"token": token, "logprob": logprob, "bytes": raw}
    if top:
        alternatives = _list(entry.get("top_logprobs"))
        out["top_logprobs"] = [_token_logprob(t, top=False) for t in alternatives]
    return out


def _text_logprobs(value: object) -> Logprobs | None:
    """A completion choice's legacy logprobs: the four lists (empty when absent),
    typed as the spec has them, except that ``token_logprobs`` and ``top_logprobs``
    may hold null where the upstream has none (vLLM's first echoed prompt token)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TypeError("logprobs is not an object")
    tokens = _list(value.get("tokens"))
    numbers = _list(value.get("token_logprobs"))
    tops = _list(value.get("top_logprobs"))
    offsets = _list(value.get("text_offset"))
    if (
        not all(isinstance(t, str) for t in tokens)
        or not all(n is None or type(n) in (int, float) for n in numbers)
        or not all(type(o) is int for o in offsets)
        or not all(top is None or _alternatives(top) for top in tops)
    ):
        raise TypeError("malformed completion logprobs")
    return {
        "tokens": tokens,
        "token_logprobs": numbers,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def _alternatives(top: object) -> bool:
    return isinstance(top, dict) and all(type(n) in (int, float) for n in top.values())


def _list(value: object) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise TypeError("not a list")
    return value


def _choices(request: ChatCompletionRequest | CompletionRequest) -> int:
    """How many choices the answer may have: ``n`` per prompt."""
    n = request.n or 1
    return n if isinstance(request, ChatCompletionRequest) else n * len(request.prompts())


def _index(choice: JsonObject, choices: int) -> int:
    index = choice.get("index", 0)
    if type(index) is not int or not 0 <= index < choices:
        raise TypeError("choice index is not one of the choices asked for")
    return index


def _tool_calls(
    calls: Sequence[JsonObject] | None, *, whole: bool = False
) -> tuple[ToolCallDelta, ...]:
    """Tool-call pieces from a stream delta or (``whole``) a message, whose calls
    carry no ``index``: there each entry is one call, its position its index. A
    streamed piece without an index gets none (positions within one delta say
    nothing about which call a piece continues): the normalizer goes by ids,
    names and complete arguments instead."""
    if not calls:
        return ()
    out = []
    for position, call in enumerate(calls):
        function = call.get("function") or {}
        index = call.get("index", position if whole else None)
        call_id = call.get("id")
        name = function.get("name")
        arguments = function.get("arguments") or ""
        if (
            not (type(index) is int or index is None)
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
