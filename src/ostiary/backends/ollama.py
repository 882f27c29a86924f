"""The ``ollama`` backend: Ollama's native API (``/api/chat``, ``/api/generate``,
``/api/embed``, ``/api/tags``) behind OpenAI's contract.

Generation always asks Ollama to stream (``"stream": true``) and translates each
NDJSON line into :class:`Delta` pieces as it arrives; the line with ``"done": true``
gives the finish reason and the :class:`Usage`. Every OpenAI parameter is either
mapped to an Ollama field or refused with an :class:`InvalidRequestError` that
names it: a client is never answered as if Ollama had honoured something it
ignored. The connection pool, draining, readiness and the mapping of Ollama's
errors to :class:`OpenAIError`\\ s are
:class:`~ostiary.backends.upstream.UpstreamBackend`'s, shared with ``openai``.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from typing import Any

import attrs
import orjson

from ostiary.backends.base import Generation
from ostiary.backends.upstream import (
    UpstreamBackend,
    UpstreamSettings,
    ended_early,
    generation_failed,
    http_url,
    invalid_response,
    model_not_found,
)
from ostiary.protocol.capabilities import RESPONSE_FORMATS, Capabilities, ModelKind
from ostiary.protocol.errors import BackendUnavailableError, InvalidRequestError
from ostiary.protocol.generation import Delta, EmbeddingResult, ToolCallDelta, Usage
from ostiary.protocol.ndjson import NdjsonDecoder
from ostiary.protocol.requests import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    EmbeddingRequest,
    Tool,
)
from ostiary.protocol.responses import DEFAULT_RETRY_AFTER

__all__ = ["OllamaBackend", "OllamaSettings"]

JsonObject = dict[str, Any]

#: Chat parameters kept in ``raw`` that Ollama has no way to honour, with the value
#: each may take anyway (``None``: any value other than null is refused).
_CHAT_UNSUPPORTED: dict[str, object] = {
    "audio": None,
    "prediction": None,
    "web_search_options": None,
    "functions": None,
    "function_call": None,
    "moderation": None,
    "reasoning_effort": None,
    "verbosity": None,
    "store": False,
    "modalities": ["text"],
}


@attrs.frozen(kw_only=True)
class OllamaSettings(UpstreamSettings):
    """A ``[[backends]]`` table with ``kind = "ollama"``; the keys it shares with
    other upstreams are :class:`~ostiary.backends.upstream.UpstreamSettings`'."""

    kind: str = attrs.field(default="ollama", validator=attrs.validators.in_(("ollama",)))
    base_url: str = attrs.field(default="http://127.0.0.1:11434", validator=http_url)
    #: Ollama's ``keep_alive`` for every request (e.g. ``"10m"``); None: Ollama's own.
    keep_alive: str | None = None

    def capabilities(self, model: str) -> Capabilities:
        kind = self.kind_of(model)
        if kind is ModelKind.EMBEDDING:
            return Capabilities(kind=kind)
        # Ollama's native tool calls and ``format`` (JSON, or a JSON schema).
        return Capabilities(tools=True, response_formats=RESPONSE_FORMATS)


def _new_tool_call_id() -> str:
    return "call_" + secrets.token_hex(12)


class OllamaBackend(UpstreamBackend):
    """The :class:`~ostiary.backends.base.Backend` for one Ollama server.

    ``new_tool_call_id`` makes the ids given to Ollama's tool calls (Ollama has
    none); tests pass a deterministic one.
    """

    _settings: OllamaSettings

    def __init__(
        self,
        settings: OllamaSettings,
        *,
        new_tool_call_id: Callable[[], str] = _new_tool_call_id,
    ) -> None:
        super().__init__(settings)
        self._new_tool_call_id = new_tool_call_id

    def _default_headers(self) -> list[tuple[str, str]]:
        return [*super()._default_headers(), ("accept", "application/x-ndjson")]

    # -- generation ------------------------------------------------------------

    async def chat(self, request: ChatCompletionRequest) -> Generation:
        """POST /api/chat. Errors in the request are raised by the first step."""
        upstream = self._upstream_model(request.model)
        body = _chat_body(request, upstream, self._settings.keep_alive)
        single_tool_call = request.parallel_tool_calls is False
        tool_calls = 0
        with self._failures():
            stream = self._stream("/api/chat", body, request.model, upstream)
            async with aclosing(stream) as lines:
                async for line, done in lines:
                    message = _field(line, "message", dict, {})
                    text = _field(message, "content", str, "")
                    calls: list[ToolCallDelta] = []
                    for call in _field(message, "tool_calls", list, []):
                        if single_tool_call and tool_calls:
                            break
                        calls.append(_tool_call_delta(call, tool_calls, self._new_tool_call_id))
                        tool_calls += 1
                    if done:
                        reason = "tool_calls" if tool_calls else _finish_reason(line)
                        yield Delta(text=text, tool_calls=tuple(calls), finish_reason=reason)
                        yield _usage(line)
                    elif text or calls:
                        yield Delta(text=text, tool_calls=tuple(calls))

    async def complete(self, request: CompletionRequest) -> Generation:
        """POST /api/generate, once per prompt (a batch runs one after another)."""
        upstream = self._upstream_model(request.model)
        bodies = _generate_bodies(request, upstream, self._settings.keep_alive)
        prompt_tokens = completion_tokens = 0
        with self._failures():
            for choice, body in enumerate(bodies):
                stream = self._stream("/api/generate", body, request.model, upstream)
                async with aclosing(stream) as lines:
                    async for line, done in lines:
                        text = _field(line, "response", str, "")
                        if done:
                            reason = _finish_reason(line)
                            yield Delta(text=text, choice=choice, finish_reason=reason)
                            usage = _usage(line)
                            prompt_tokens += usage.prompt_tokens
                            completion_tokens += usage.completion_tokens
                        elif text:
                            yield Delta(text=text, choice=choice)
        yield Usage(prompt_tokens, completion_tokens)

    async def _stream(
        self, path: str, body: JsonObject, model: str, upstream: str
    ) -> AsyncGenerator[tuple[JsonObject, bool], None]:
        """Yield ``(line, done)`` for each object Ollama streams. The ``done`` line
        comes last, and only once the response has ended (or draining gave up), so
        that a consumer stopping there leaves a reusable connection."""
        async with self._http.stream("POST", path, body=orjson.dumps(body)) as response:
            await self._check_status(response, model, _aliases(upstream))
            decoder = NdjsonDecoder()
            chunks = response.iter_bytes()
            final: JsonObject | None = None
            while final is None:
                data = await anext(chunks, None)
                for value in decoder.feed(data) if data is not None else decoder.close():
                    line = _checked_line(value)
                    if line.get("done") is True:
                        final = line
                        break
                    yield line, False
                if data is None:
                    break
            if final is None:
                raise ended_early()
            await self._drain(chunks)
        yield final, True

    # -- embeddings and health -------------------------------------------------

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        """POST /api/embed with every input at once; ``truncate`` is off, as an
        input longer than the model's context is an error in OpenAI's API too."""
        upstream = self._upstream_model(request.model)
        inputs = request.inputs()
        texts = [text for text in inputs if isinstance(text, str)]
        if len(texts) != len(inputs):
            raise InvalidRequestError(
                "This model accepts text input only, not token ids.", param="input"
            )
        body: JsonObject = {"model": upstream, "input": texts, "truncate": False}
        if request.dimensions is not None:
            body["dimensions"] = request.dimensions
        if self._settings.keep_alive is not None:
            body["keep_alive"] = self._settings.keep_alive
        with self._failures():
            data = await self._call(
                "POST",
                "/api/embed",
                orjson.dumps(body),
                model=request.model,
                aliases=_aliases(upstream),
                max_bytes=self._settings.max_embeddings_response_bytes,
            )
            answer = _json_object(data)
            vectors = _embeddings(answer.get("embeddings"), len(texts))
            if request.dimensions is not None and any(
                len(v) != request.dimensions for v in vectors
            ):
                raise InvalidRequestError(
                    "This model does not support the 'dimensions' parameter.", param="dimensions"
                )
        return EmbeddingResult(vectors=vectors, usage=Usage(_count(answer, "prompt_eval_count")))

    async def check_ready(self) -> None:
        """GET /api/tags; ready when Ollama answers in time and has every
        configured model."""
        with self._failures():
            answer = _json_object(await self._ready_body("/api/tags"))
            present: set[str] = set()
            for entry in _field(answer, "models", list, []):
                if isinstance(entry, dict):
                    for key in ("name", "model"):
                        if isinstance(entry.get(key), str):
                            present.add(_full_name(entry[key]))
            missing = [m for m in self.models if _full_name(self._upstream(m)) not in present]
            if missing:
                raise BackendUnavailableError(
                    f"The upstream model server does not have these models: {', '.join(missing)}.",
                    code="backend_unavailable",
                    retry_after=DEFAULT_RETRY_AFTER,
                )

    def _upstream_model(self, model: str) -> str:
        """Ollama's name for our ``model``; other models Ollama has are not ours to
        serve, so asking for one is a 404 like any unknown model."""
        if model not in self._settings.models:
            raise model_not_found(model)
        return self._upstream(model)


# -- request bodies ---------------------------------------------------------------


def _refuse(param: str, what: str | None = None) -> InvalidRequestError:
    return InvalidRequestError(
        f"'{param}' is not supported by this model{': ' + what if what else ''}.",
        param=param,
        code="unsupported_parameter",
    )


def _options(request: ChatCompletionRequest | CompletionRequest) -> JsonObject:
    values: JsonObject = {
        "temperature": request.temperature,
        "top_p": request.top_p,
        "seed": request.seed,
        "stop": list(request.stop) if request.stop else None,
        "num_predict": request.output_limit,
        "presence_penalty": request.presence_penalty,
        "frequency_penalty": request.frequency_penalty,
    }
    return {key: value for key, value in values.items() if value is not None}


def _with_common(body: JsonObject, options: JsonObject, keep_alive: str | None) -> JsonObject:
    if options:
        body["options"] = options
    if keep_alive is not None:
        body["keep_alive"] = keep_alive
    return body


def _chat_body(request: ChatCompletionRequest, upstream: str, keep_alive: str | None) -> JsonObject:
    if request.n is not None and request.n != 1:
        raise _refuse("n", "it generates one choice per request")
    if request.logprobs:
        raise _refuse("logprobs")
    if request.top_logprobs is not None:
        raise _refuse("top_logprobs")
    if request.logit_bias:
        raise _refuse("logit_bias")
    for param, allowed in _CHAT_UNSUPPORTED.items():
        value = request.raw.get(param)
        if value is not None and value != allowed:
            raise _refuse(param)
    body: JsonObject = {
        "model": upstream,
        "messages": _chat_messages(request.messages),
        "stream": True,
    }
    choice = request.tool_choice
    if choice is not None and choice.mode in ("required", "function"):
        raise _refuse("tool_choice", "it cannot force a tool call; use 'auto' or 'none'")
    if request.tools and (choice is None or choice.mode == "auto"):
        body["tools"] = [_tool(tool, i) for i, tool in enumerate(request.tools)]
    fmt = request.response_format
    if fmt is not None and fmt.type == "json_object":
        body["format"] = "json"
    elif fmt is not None and fmt.type == "json_schema":
        schema = (fmt.json_schema or {}).get("schema")
        body["format"] = schema if isinstance(schema, dict) else "json"
    return _with_common(body, _options(request), keep_alive)


def _tool(tool: Tool, index: int) -> JsonObject:
    # Ollama has no ``strict``: a strict tool is sent as any other, and the gateway
    # checks the calls' arguments against its schema (strict mode, 502 if they fail).
    fn = tool.function
    function: JsonObject = {"name": fn.name}
    if fn.description is not None:
        function["description"] = fn.description
    function["parameters"] = fn.parameters or {"type": "object", "properties": {}}
    return {"type": "function", "function": function}


def _chat_messages(messages: Sequence[ChatMessage]) -> list[JsonObject]:
    out: list[JsonObject] = []
    tool_names: dict[str, str] = {}
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = "system" if message.role == "developer" else message.role
        if role not in ("system", "user", "assistant", "tool"):
            raise _refuse(f"{where}.role", f"role {message.role!r}")
        entry: JsonObject = {"role": role}
        entry["content"], images = _content(message, where)
        if images:
            entry["images"] = images
        if message.tool_calls:
            entry["tool_calls"] = []
            for j, call in enumerate(message.tool_calls):
                tool_names[call.id] = name = call.function.name
                param = f"{where}.tool_calls[{j}].function.arguments"
                arguments = _arguments(call.function.arguments, param)
                entry["tool_calls"].append({"function": {"name": name, "arguments": arguments}})
        if role == "tool" and message.tool_call_id in tool_names:
            entry["tool_name"] = tool_names[message.tool_call_id]
        out.append(entry)
    return out


def _content(message: ChatMessage, where: str) -> tuple[str, list[str]]:
    """The text of a message and the base64 of its images."""
    if message.content is None or isinstance(message.content, str):
        return message.content or "", []
    texts: list[str] = []
    images: list[str] = []
    for j, part in enumerate(message.content):
        if part.type in ("text", "refusal"):
            texts.append(part.text or "")
        elif part.type == "image_url":
            images.append(_image(part.data or {}, f"{where}.content[{j}].image_url.url"))
        else:
            raise _refuse(f"{where}.content[{j}]", f"content type {part.type!r}")
    return "\n".join(texts), images


def _image(part: JsonObject, param: str) -> str:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else None
    if isinstance(url, str) and url.startswith("data:"):
        header, sep, data = url.partition(",")
        if sep and header.endswith(";base64") and data:
            return data
    raise InvalidRequestError(
        "This model accepts images only as base64 data URLs (data:image/...;base64,...).",
        param=param,
    )


def _arguments(arguments: str, param: str) -> JsonObject:
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise InvalidRequestError("Tool call arguments must be a JSON object.", param=param)
    return value


def _generate_bodies(
    request: CompletionRequest, upstream: str, keep_alive: str | None
) -> list[JsonObject]:
    if request.n is not None and request.n != 1:
        raise _refuse("n", "it generates one choice per prompt")
    if request.best_of is not None and request.best_of != 1:
        raise _refuse("best_of")
    if request.echo:
        raise _refuse("echo")
    if request.logprobs is not None:
        raise _refuse("logprobs")
    if request.logit_bias:
        raise _refuse("logit_bias")
    bodies = []
    for prompt in request.prompts():
        if not isinstance(prompt, str):
            raise InvalidRequestError(
                "This model accepts text prompts only, not token ids.", param="prompt"
            )
        # OpenAI's completions continue the prompt as is; Ollama needs the model's
        # template only to place a suffix (fill-in-the-middle).
        body: JsonObject = {"model": upstream, "prompt": prompt, "stream": True}
        if request.suffix is not None:
            body["suffix"] = request.suffix
        else:
            body["raw"] = True
        bodies.append(_with_common(body, _options(request), keep_alive))
    return bodies


# -- responses ----------------------------------------------------------------------


def _field(obj: JsonObject, key: str, kind: type[Any], default: Any) -> Any:
    """``obj[key]`` if it is a ``kind``, ``default`` if absent or null; anything
    else means Ollama sent something we do not understand."""
    value = obj.get(key)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise invalid_response()
    return value


def _checked_line(value: Any) -> JsonObject:
    if not isinstance(value, dict):
        raise invalid_response()
    if "error" in value:
        raise generation_failed(str(value["error"]))
    return value


def _tool_call_delta(call: Any, index: int, new_id: Callable[[], str]) -> ToolCallDelta:
    """One complete Ollama tool call (Ollama never splits one) as a first and only
    piece; its arguments object becomes the JSON string OpenAI sends."""
    function = call.get("function") if isinstance(call, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(function, dict) or not isinstance(name, str) or not name:
        raise invalid_response()
    arguments = function.get("arguments")
    if arguments is None:
        arguments = {}
    if isinstance(arguments, dict):
        arguments = orjson.dumps(arguments).decode()
    elif not isinstance(arguments, str):
        raise invalid_response()
    call_id = call.get("id")
    if not isinstance(call_id, str) or not call_id:
        call_id = new_id()
    return ToolCallDelta(index=index, id=call_id, name=name, arguments=arguments)


def _finish_reason(line: JsonObject) -> str:
    return "length" if line.get("done_reason") == "length" else "stop"


def _count(line: JsonObject, key: str) -> int:
    """A token count; Ollama leaves out a count of zero (a fully cached prompt)."""
    value = line.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _usage(line: JsonObject) -> Usage:
    return Usage(_count(line, "prompt_eval_count"), _count(line, "eval_count"))


def _json_object(data: bytes | bytearray) -> JsonObject:
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise invalid_response() from None
    if not isinstance(value, dict):
        raise invalid_response()
    return value


def _embeddings(value: Any, expected: int) -> tuple[tuple[float, ...], ...]:
    if not isinstance(value, list) or len(value) != expected:
        raise invalid_response()
    vectors = []
    for vector in value:
        if not isinstance(vector, list) or not all(type(x) in (float, int) for x in vector):
            raise invalid_response()
        vectors.append(tuple(float(x) for x in vector))
    return tuple(vectors)


def _full_name(name: str) -> str:
    """Ollama's name with its default tag: ``llama3.2`` is ``llama3.2:latest``."""
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


def _aliases(upstream: str) -> tuple[str, ...]:
    """The names Ollama may use for ``upstream`` in its messages."""
    return (_full_name(upstream), upstream, upstream.removesuffix(":latest"))
