"""The ``ollama`` backend: Ollama's native API (``/api/chat``, ``/api/generate``,
``/api/embed``, ``/api/tags``) behind OpenAI's contract.

Generation always asks Ollama to stream (``"stream": true``) and translates each
NDJSON line into :class:`Delta` pieces as it arrives; the line with ``"done": true``
gives the finish reason and the :class:`Usage`. Every OpenAI parameter is either
mapped to an Ollama field or refused with an :class:`InvalidRequestError` that
names it: a client is never answered as if Ollama had honoured something it
ignored. Ollama's errors become :class:`OpenAIError`\\ s with messages safe to show
a client; Ollama's own text rides along as the ``__cause__`` for logs.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import aclosing
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
from ostiary.protocol.capabilities import RESPONSE_FORMATS, Capabilities, ModelKind
from ostiary.protocol.errors import (
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    InvalidRequestError,
    NotFoundError,
    OpenAIError,
    RequestTooLargeError,
)
from ostiary.protocol.generation import Delta, EmbeddingResult, ToolCallDelta, Usage
from ostiary.protocol.ndjson import NdjsonDecoder
from ostiary.protocol.requests import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    EmbeddingRequest,
    Tool,
)

__all__ = ["OllamaBackend", "OllamaSettings", "OllamaUpstreamError"]

JsonObject = dict[str, Any]

_HEADERS = (("content-type", "application/json"), ("accept", "application/x-ndjson"))
#: How long to wait for the end of a response after its ``done`` line, so that the
#: connection can go back to the pool; past it the connection is just closed.
_DRAIN_SECONDS = 1.0
#: Longest piece of an Ollama error message passed on to a client (400s only).
_MAX_UPSTREAM_MESSAGE = 300
_BUSY_RETRY_AFTER = 1.0

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
class OllamaSettings(BackendSettings):
    """A ``[[backends]]`` table with ``kind = "ollama"``."""

    kind: str = attrs.field(default="ollama", validator=attrs.validators.in_(("ollama",)))
    #: Where Ollama listens (``http://host:port``).
    base_url: str = "http://127.0.0.1:11434"
    connect_timeout: float = attrs.field(default=5.0, validator=attrs.validators.gt(0))
    #: Longest wait for any bytes from Ollama, including loading a model.
    read_timeout: float = attrs.field(default=600.0, validator=attrs.validators.gt(0))
    max_connections: int = attrs.field(default=64, validator=attrs.validators.ge(1))
    #: Ollama's ``keep_alive`` for every request (e.g. ``"10m"``); None: Ollama's own.
    keep_alive: str | None = None
    #: Our model id -> Ollama model name, for ids that differ from Ollama's names.
    upstream_models: dict[str, str] = attrs.field(factory=dict, hash=False)

    def capabilities(self, model: str) -> Capabilities:
        kind = self.kind_of(model)
        if kind is ModelKind.EMBEDDING:
            return Capabilities(kind=kind)
        # Ollama's native tool calls and ``format`` (JSON, or a JSON schema).
        return Capabilities(tools=True, response_formats=RESPONSE_FORMATS)

    @upstream_models.validator
    def _check_upstream_models(self, attribute: object, value: dict[str, str]) -> None:
        for ours, theirs in value.items():
            if ours not in self.models:
                raise ValueError(f"upstream_models names {ours!r}, which is not in models")
            if not isinstance(theirs, str) or not theirs:
                raise ValueError(f"upstream_models[{ours!r}] must be a non-empty string")


class OllamaUpstreamError(Exception):
    """What Ollama said, kept as the ``__cause__`` of the error a client sees."""

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(f"Ollama ({status}): {message}" if status else f"Ollama: {message}")
        self.status = status
        self.upstream_message = message


def _new_tool_call_id() -> str:
    return "call_" + secrets.token_hex(12)


class OllamaBackend(ConfiguredBackend):
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
        self._settings = settings
        self._new_tool_call_id = new_tool_call_id
        self._client: HttpClient | None = None

    async def __aenter__(self) -> OllamaBackend:
        s = self._settings
        self._client = HttpClient(
            s.base_url,
            max_connections=s.max_connections,
            connect_timeout=s.connect_timeout,
            read_timeout=s.read_timeout,
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    # -- generation ------------------------------------------------------------

    async def chat(self, request: ChatCompletionRequest) -> Generation:
        """POST /api/chat. Errors in the request are raised by the first step."""
        upstream = self._upstream_model(request.model)
        body = _chat_body(request, upstream, self._settings.keep_alive)
        single_tool_call = request.parallel_tool_calls is False
        tool_calls = 0
        async with aclosing(self._stream("/api/chat", body, request.model, upstream)) as lines:
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
        for choice, body in enumerate(bodies):
            stream = self._stream("/api/generate", body, request.model, upstream)
            async with aclosing(stream) as lines:
                async for line, done in lines:
                    text = _field(line, "response", str, "")
                    if done:
                        yield Delta(text=text, choice=choice, finish_reason=_finish_reason(line))
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
        comes last, and only once the response has ended (or ``_DRAIN_SECONDS``
        passed), so that a consumer stopping there leaves a reusable connection."""
        client = self._require_client()
        try:
            async with client.stream(
                "POST", path, headers=_HEADERS, body=orjson.dumps(body)
            ) as response:
                if response.status != 200:
                    raise _status_error(response.status, await response.read(), model, upstream)
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
                    raise BackendError("The model backend ended its response early.")
                await _drain(chunks)
        except HttpClientError as exc:
            raise _transport_error(exc) from exc
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
        status, data = await self._request("POST", "/api/embed", orjson.dumps(body))
        if status != 200:
            raise _status_error(status, data, request.model, upstream)
        answer = _json_object(data)
        vectors = _embeddings(answer.get("embeddings"), len(texts))
        if request.dimensions is not None and any(len(v) != request.dimensions for v in vectors):
            raise InvalidRequestError(
                "This model does not support the 'dimensions' parameter.", param="dimensions"
            )
        return EmbeddingResult(vectors=vectors, usage=Usage(_count(answer, "prompt_eval_count")))

    async def check_ready(self) -> None:
        """GET /api/tags within ``connect_timeout``; ready when Ollama answers and
        has every configured model."""
        try:
            with trio.fail_after(self._settings.connect_timeout):
                status, data = await self._request("GET", "/api/tags", b"")
        except trio.TooSlowError:
            raise BackendTimeoutError("The model backend did not answer in time.") from None
        if status != 200:
            raise BackendUnavailableError(
                "The model backend is not ready.", retry_after=_BUSY_RETRY_AFTER
            ) from OllamaUpstreamError(status, _upstream_message(data) or "")
        present: set[str] = set()
        for entry in _field(_json_object(data), "models", list, []):
            if isinstance(entry, dict):
                for key in ("name", "model"):
                    if isinstance(entry.get(key), str):
                        present.add(_full_name(entry[key]))
        missing = [m for m in self.models if _full_name(self._upstream(m)) not in present]
        if missing:
            raise BackendUnavailableError(
                f"The model backend does not have these models: {', '.join(missing)}.",
                retry_after=_BUSY_RETRY_AFTER,
            )

    # -- helpers -----------------------------------------------------------------

    async def _request(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        client = self._require_client()
        try:
            status, _, data = await client.request(method, path, headers=_HEADERS, body=body)
        except HttpClientError as exc:
            raise _transport_error(exc) from exc
        return status, data

    def _require_client(self) -> HttpClient:
        if self._client is None:
            raise RuntimeError("OllamaBackend used outside 'async with backend:'")
        return self._client

    def _upstream(self, model: str) -> str:
        return self._settings.upstream_models.get(model, model)

    def _upstream_model(self, model: str) -> str:
        """Ollama's name for our ``model``; other models Ollama has are not ours to
        serve, so asking for one is a 404 like any unknown model."""
        if model not in self._settings.models:
            raise _model_not_found(model)
        return self._upstream(model)


# -- request bodies ---------------------------------------------------------------


def _refuse(param: str, what: str | None = None) -> InvalidRequestError:
    return InvalidRequestError(
        f"'{param}' is not supported by this model{': ' + what if what else ''}.", param=param
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
    if request.top_logprobs:
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
    fn = tool.function
    if fn.strict:
        raise _refuse(f"tools[{index}].function.strict", "it cannot guarantee a schema")
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


def _invalid_response() -> BackendError:
    return BackendError("The model backend sent an invalid response.")


def _field(obj: JsonObject, key: str, kind: type[Any], default: Any) -> Any:
    """``obj[key]`` if it is a ``kind``, ``default`` if absent or null; anything
    else means Ollama sent something we do not understand."""
    value = obj.get(key)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise _invalid_response()
    return value


def _checked_line(value: Any) -> JsonObject:
    if not isinstance(value, dict):
        raise _invalid_response()
    if "error" in value:
        raise BackendError(
            "The model backend failed while generating the response."
        ) from OllamaUpstreamError(None, str(value["error"]))
    return value


def _tool_call_delta(call: Any, index: int, new_id: Callable[[], str]) -> ToolCallDelta:
    """One complete Ollama tool call (Ollama never splits one) as a first and only
    piece; its arguments object becomes the JSON string OpenAI sends."""
    function = call.get("function") if isinstance(call, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(function, dict) or not isinstance(name, str) or not name:
        raise _invalid_response()
    arguments = function.get("arguments")
    if arguments is None:
        arguments = {}
    if isinstance(arguments, dict):
        arguments = orjson.dumps(arguments).decode()
    elif not isinstance(arguments, str):
        raise _invalid_response()
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


def _json_object(data: bytes) -> JsonObject:
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise _invalid_response() from None
    if not isinstance(value, dict):
        raise _invalid_response()
    return value


def _embeddings(value: Any, expected: int) -> tuple[tuple[float, ...], ...]:
    if not isinstance(value, list) or len(value) != expected:
        raise _invalid_response()
    vectors = []
    for vector in value:
        if not isinstance(vector, list) or not all(type(x) in (float, int) for x in vector):
            raise _invalid_response()
        vectors.append(tuple(float(x) for x in vector))
    return tuple(vectors)


async def _drain(chunks: AsyncIterator[bytes]) -> None:
    with trio.move_on_after(_DRAIN_SECONDS):
        try:
            async for _ in chunks:
                pass
        except HttpClientError:
            pass  # the answer is complete; the client discards a broken connection


def _full_name(name: str) -> str:
    """Ollama's name with its default tag: ``llama3.2`` is ``llama3.2:latest``."""
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


# -- errors -------------------------------------------------------------------------


def _model_not_found(model: str) -> NotFoundError:
    return NotFoundError(
        f"The model '{model}' does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def _upstream_message(data: bytes) -> str | None:
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    error = value.get("error") if isinstance(value, dict) else None
    return error if isinstance(error, str) else None


def _client_safe(message: str, model: str, upstream: str) -> str:
    """Ollama's message with our model id for its name, printable and short."""
    bare = upstream.removesuffix(":latest")
    for name in sorted({_full_name(upstream), upstream, bare}, key=len, reverse=True):
        message = message.replace(name, model)
    message = "".join(c if c.isprintable() else " " for c in message).strip()
    if len(message) > _MAX_UPSTREAM_MESSAGE:
        message = message[: _MAX_UPSTREAM_MESSAGE - 3] + "..."
    return message


def _status_error(status: int, data: bytes, model: str, upstream: str) -> OpenAIError:
    upstream_message = _upstream_message(data)
    error: OpenAIError
    if status == 404 and upstream_message is not None and "not found" in upstream_message:
        error = _model_not_found(model)
    elif status == 400:
        detail = _client_safe(upstream_message or "", model, upstream)
        error = InvalidRequestError(
            "The model backend rejected the request" + (f": {detail}" if detail else ".")
        )
    elif status == 413:
        error = RequestTooLargeError("The request is too large for the model backend.")
    elif status in (429, 503):
        error = BackendUnavailableError(
            "The model backend is busy; try again later.", retry_after=_BUSY_RETRY_AFTER
        )
    elif status >= 500:
        error = BackendError("The model backend failed to process the request.")
    else:
        error = BackendError(f"The model backend answered with unexpected status {status}.")
    error.__cause__ = OllamaUpstreamError(
        status, upstream_message or data[:200].decode(errors="replace")
    )
    return error


def _transport_error(exc: HttpClientError) -> OpenAIError:
    if isinstance(exc, ConnectTimeout | ReadTimeout):
        return BackendTimeoutError("The model backend did not answer in time.")
    if isinstance(exc, ConnectError):
        return BackendUnavailableError(
            "The model backend is not reachable.", retry_after=_BUSY_RETRY_AFTER
        )
    return BackendError("The connection to the model backend failed.")
