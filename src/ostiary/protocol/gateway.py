"""The gateway: the sans-IO state machine at the heart of Ostiary.

Events in (:mod:`.events`), actions out (:mod:`.actions`). For each request it routes,
authenticates, decodes and validates, picks the backend by model and asks the runtime
to dispatch; then it turns the backend's output into an OpenAI response or SSE stream
and finishes the exchange exactly once, with one access-log record.

Same events in the same order give the same actions: the gateway reads no clock, does
no I/O and draws no randomness (request ids and times come in with the events).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable

import attrs
import orjson

from . import decoding
from .actions import (
    Action,
    BackendCall,
    CancelBackend,
    CheckReadiness,
    Dispatch,
    EndStream,
    Log,
    Respond,
    SendBytes,
    StartStream,
)
from .auth import ApiKey, KeyTable
from .errors import (
    AuthenticationError,
    MethodNotAllowedError,
    NotFoundError,
    OpenAIError,
    RequestTooLargeError,
    ServiceUnavailableError,
)
from .events import (
    BackendChunk,
    BackendFailed,
    BackendFinished,
    ClientGone,
    EmbeddingsComputed,
    Event,
    ReadinessChecked,
    RequestReceived,
)
from .generation import Delta, Usage
from .request_limits import RequestLimits
from .requests import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from .responses import (
    ChoiceAccumulator,
    encode_embeddings,
    encode_model,
    encode_models,
    error_body,
    usage_dict,
)
from .sse import SseEncoder, sse_error

__all__ = ["Endpoint", "ExchangeState", "Gateway", "ModelRoute"]


class Endpoint(enum.Enum):
    CHAT = "chat.completions"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"
    MODELS = "models.list"
    MODEL = "models.retrieve"
    HEALTH = "healthz"
    READY = "readyz"


class ExchangeState(enum.Enum):
    DISPATCHED = "dispatched"  # waiting for the backend's first output
    STREAMING = "streaming"  # response headers sent, events flowing
    CHECKING = "checking"  # /readyz waiting for the runtime's backend checks


#: method → endpoint, for the fixed paths.
_ROUTES: dict[str, tuple[str, Endpoint]] = {
    "/v1/chat/completions": ("POST", Endpoint.CHAT),
    "/v1/completions": ("POST", Endpoint.COMPLETIONS),
    "/v1/embeddings": ("POST", Endpoint.EMBEDDINGS),
    "/v1/models": ("GET", Endpoint.MODELS),
    "/healthz": ("GET", Endpoint.HEALTH),
    "/readyz": ("GET", Endpoint.READY),
}
_MODEL_PREFIX = "/v1/models/"
_PUBLIC = frozenset({Endpoint.HEALTH, Endpoint.READY})
#: Seconds a 429 or 503 asks the client to wait when its cause names no time.
_DEFAULT_RETRY_AFTER = 1.0

_DECODERS: dict[Endpoint, Callable[[bytes, RequestLimits], BackendCall]] = {
    Endpoint.CHAT: decoding.decode_chat,
    Endpoint.COMPLETIONS: decoding.decode_completion,
    Endpoint.EMBEDDINGS: decoding.decode_embedding,
}

_JSON = (b"content-type", b"application/json")
_SSE_HEADERS = (
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
)


@attrs.frozen
class ModelRoute:
    """A model id clients may ask for, and the backend that serves it."""

    model: str
    backend: str
    owned_by: str = "ostiary"


def route(method: str, target: str) -> tuple[Endpoint, str | None]:
    """The endpoint for a request line, and the model id for ``/v1/models/{id}``."""
    path = target.partition("?")[0]
    entry = _ROUTES.get(path)
    if entry is not None:
        allowed, endpoint = entry
        model = None
    elif path.startswith(_MODEL_PREFIX) and len(path) > len(_MODEL_PREFIX):
        allowed, endpoint = "GET", Endpoint.MODEL
        model = _percent_decode(path[len(_MODEL_PREFIX) :])
    else:
        raise NotFoundError(f"Invalid URL ({method} {path})", code="unknown_url")
    if method != allowed and not (allowed == "GET" and method == "HEAD"):
        raise MethodNotAllowedError(
            f"Method {method} is not allowed for {path}; use {allowed}.",
            code="method_not_allowed",
        )
    return endpoint, model


def _percent_decode(text: str) -> str:
    if "%" not in text:
        return text
    out = bytearray()
    i = 0
    raw = text.encode("utf-8")
    while i < len(raw):
        if raw[i] == 0x25 and _is_hex(raw[i + 1 : i + 3]):
            out.append(int(raw[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "replace")


def _is_hex(pair: bytes) -> bool:
    return len(pair) == 2 and all(c in b"0123456789abcdefABCDEF" for c in pair)


def _authorization(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The one ``authorization`` header; two are refused (a proxy in front might
    read the other one)."""
    found = None
    for key, value in headers:
        if key == b"authorization":
            if found is not None:
                raise AuthenticationError(
                    "Send exactly one Authorization header.", code="invalid_api_key"
                )
            found = value
    return found


@attrs.define(slots=True)
class _Exchange:
    request_id: str
    endpoint: Endpoint
    method: str
    path: str
    started: float
    key: ApiKey | None = None
    call: BackendCall | None = None
    state: ExchangeState = ExchangeState.DISPATCHED
    encoder: SseEncoder | None = None
    collected: ChoiceAccumulator | None = None
    usage: Usage | None = None
    created: int = 0


class Gateway:
    """Routes, authenticates, validates and dispatches requests; encodes responses.

    ``routes`` lists every model a client may ask for; ``keys`` is the current key
    table (replace it with :attr:`keys` when the store changes); ``created`` is the
    ``created`` time reported for models.
    """

    def __init__(
        self,
        *,
        routes: Iterable[ModelRoute],
        keys: KeyTable,
        limits: RequestLimits | None = None,
        created: int = 0,
    ) -> None:
        self._routes = {r.model: r for r in routes}
        self.keys = keys
        self.limits = limits if limits is not None else RequestLimits()
        self._created = created
        self._exchanges: dict[str, _Exchange] = {}
        self._admitted: tuple[bytes | None, KeyTable, ApiKey] | None = None

    @property
    def in_flight(self) -> int:
        """Exchanges started and not yet finished."""
        return len(self._exchanges)

    def admits(self, method: str, target: str, headers: tuple[tuple[bytes, bytes], ...]) -> bool:
        """Whether a request's body is worth reading, judged from its head alone:
        a known route, and valid credentials where the route needs them. A refused
        request still goes through :meth:`handle` (with no body) for its answer."""
        try:
            endpoint, _ = route(method, target)
            if endpoint not in _PUBLIC:
                authorization = _authorization(headers)
                key = self.keys.authenticate(authorization)
                # The same header object comes back with the whole request: no
                # second hash for it (identity, never a comparison of contents).
                self._admitted = (authorization, self.keys, key)
        except OpenAIError:
            return False
        return True

    def _authenticate(self, headers: tuple[tuple[bytes, bytes], ...]) -> ApiKey:
        authorization = _authorization(headers)
        admitted = self._admitted
        if admitted is not None and admitted[0] is authorization and admitted[1] is self.keys:
            self._admitted = None
            return admitted[2]
        return self.keys.authenticate(authorization)

    def state_of(self, request_id: str) -> ExchangeState | None:
        exchange = self._exchanges.get(request_id)
        return exchange.state if exchange is not None else None

    def handle(self, event: Event) -> list[Action]:
        """Feed one event; get the actions it calls for, in order."""
        if isinstance(event, BackendChunk):
            return self._on_chunk(event)
        if isinstance(event, RequestReceived):
            return self._on_request(event)
        exchange = self._exchanges.get(event.request_id)
        if exchange is None:
            return []  # late news about a finished exchange
        if isinstance(event, BackendFinished):
            return self._on_finished(exchange, event.now)
        if isinstance(event, EmbeddingsComputed):
            return self._on_embeddings(exchange, event)
        if isinstance(event, BackendFailed):
            return self._fail(exchange, event.error, event.now)
        if isinstance(event, ClientGone):
            return self._on_client_gone(exchange, event.now)
        return self._on_readiness(exchange, event)

    # -- requests ------------------------------------------------------------------

    def _on_request(self, event: RequestReceived) -> list[Action]:
        path = event.target.partition("?")[0]
        exchange = _Exchange(
            request_id=event.request_id,
            endpoint=Endpoint.HEALTH,
            method=event.method,
            path=path,
            started=event.now,
            created=event.created,
        )
        if event.request_id in self._exchanges:
            raise ValueError(f"request id {event.request_id!r} is already in flight")
        try:
            endpoint, model_id = route(event.method, event.target)
            exchange.endpoint = endpoint
            if endpoint is Endpoint.HEALTH:
                return self._finish(exchange, 200, b'{"status":"ok"}', event.now)
            if endpoint is Endpoint.READY:
                exchange.state = ExchangeState.CHECKING
                self._exchanges[event.request_id] = exchange
                return [CheckReadiness(event.request_id)]
            exchange.key = self._authenticate(event.headers)
            if endpoint is Endpoint.MODELS:
                models = (self._model_dict(r) for r in self._routes.values())
                return self._finish(exchange, 200, encode_models(models), event.now)
            if endpoint is Endpoint.MODEL:
                assert model_id is not None
                found = self._find_model(model_id)
                return self._finish(exchange, 200, orjson.dumps(self._model_dict(found)), event.now)
            if len(event.body) > self.limits.max_body_bytes:
                raise RequestTooLargeError(
                    f"The request body is larger than {self.limits.max_body_bytes} bytes.",
                    code="request_too_large",
                )
            call = _DECODERS[endpoint](event.body, self.limits)
            target = self._find_model(call.model)
        except OpenAIError as error:
            return self._error(exchange, error, event.now)
        exchange.call = call
        self._exchanges[event.request_id] = exchange
        if not isinstance(call, EmbeddingRequest) and call.stream:
            is_chat = isinstance(call, ChatCompletionRequest)
            exchange.encoder = SseEncoder(
                response_id=_response_id(call, event.request_id),
                created=event.created,
                model=call.model,
                chat=is_chat,
                include_usage=call.include_usage,
            )
        else:
            exchange.collected = ChoiceAccumulator()
        return [Dispatch(event.request_id, target.backend, call)]

    def _find_model(self, model_id: str) -> ModelRoute:
        found = self._routes.get(model_id)
        if found is None:
            raise NotFoundError(
                f"The model `{model_id}` does not exist or you do not have access to it.",
                param="model",
                code="model_not_found",
            )
        return found

    def _model_dict(self, r: ModelRoute) -> dict[str, object]:
        return encode_model(r.model, created=self._created, owned_by=r.owned_by)

    # -- backend output ------------------------------------------------------------

    def _on_chunk(self, event: BackendChunk) -> list[Action]:
        exchange = self._exchanges.get(event.request_id)
        if exchange is None:
            return []
        deltas: list[Delta] = []
        for piece in event.pieces:
            if isinstance(piece, Usage):
                exchange.usage = piece
            else:
                deltas.append(piece)
        encoder = exchange.encoder
        if encoder is None:
            collected = exchange.collected
            if collected is None:
                return []  # an embeddings or readiness exchange gets no chunks
            for delta in deltas:
                collected.add(delta)
            return []
        if not deltas:
            return []
        actions: list[Action] = []
        if exchange.state is ExchangeState.DISPATCHED:
            exchange.state = ExchangeState.STREAMING
            actions.append(StartStream(exchange.request_id, 200, self._stream_headers(exchange)))
        actions.append(SendBytes(exchange.request_id, encoder.encode(deltas)))
        return actions

    def _stream_headers(self, exchange: _Exchange) -> tuple[tuple[bytes, bytes], ...]:
        return (*_SSE_HEADERS, (b"x-request-id", exchange.request_id.encode()))

    def _on_finished(self, exchange: _Exchange, now: float) -> list[Action]:
        call = exchange.call
        if call is None or isinstance(call, EmbeddingRequest):
            return self._fail(exchange, _no_output(), now)
        usage = exchange.usage if exchange.usage is not None else Usage(prompt_tokens=0)
        encoder = exchange.encoder
        if encoder is not None:
            actions: list[Action] = []
            if exchange.state is ExchangeState.DISPATCHED:
                exchange.state = ExchangeState.STREAMING
                actions.append(
                    StartStream(exchange.request_id, 200, self._stream_headers(exchange))
                )
            actions.append(SendBytes(exchange.request_id, encoder.usage(usage) + encoder.done()))
            actions.append(EndStream(exchange.request_id))
            actions.append(self._access_log(exchange, 200, now))
            del self._exchanges[exchange.request_id]
            return actions
        collected = exchange.collected
        assert collected is not None
        is_chat = isinstance(call, ChatCompletionRequest)
        body: dict[str, object] = {
            "id": _response_id(call, exchange.request_id),
            "object": "chat.completion" if is_chat else "text_completion",
            "created": exchange.created,
            "model": call.model,
            "choices": collected.chat_choices() if is_chat else collected.text_choices(),
            "usage": usage_dict(usage),
        }
        return self._finish(exchange, 200, orjson.dumps(body), now)

    def _on_embeddings(self, exchange: _Exchange, event: EmbeddingsComputed) -> list[Action]:
        call = exchange.call
        if not isinstance(call, EmbeddingRequest):
            return self._fail(exchange, _no_output(), event.now)
        exchange.usage = event.result.usage
        body = encode_embeddings(
            event.result, model=call.model, encoding_format=call.encoding_format
        )
        return self._finish(exchange, 200, body, event.now)

    def _on_client_gone(self, exchange: _Exchange, now: float) -> list[Action]:
        del self._exchanges[exchange.request_id]
        actions: list[Action] = []
        if exchange.call is not None:
            actions.append(CancelBackend(exchange.request_id))
        # 499: nginx's "client closed request"; only ever seen in our logs.
        actions.append(self._access_log(exchange, 499, now))
        return actions

    def _on_readiness(self, exchange: _Exchange, event: ReadinessChecked) -> list[Action]:
        if event.failures:
            body = orjson.dumps(
                {
                    "status": "unavailable",
                    "backends": {name: "unavailable" for name, _ in event.failures},
                }
            )
            actions = self._finish(exchange, 503, body, event.now)
            actions.append(Log("warning", "backends not ready", {"failures": dict(event.failures)}))
            return actions
        return self._finish(exchange, 200, b'{"status":"ready"}', event.now)

    # -- endings -------------------------------------------------------------------

    def _fail(self, exchange: _Exchange, error: OpenAIError, now: float) -> list[Action]:
        if exchange.state is ExchangeState.STREAMING:
            self._exchanges.pop(exchange.request_id, None)
            return [
                SendBytes(exchange.request_id, sse_error(error)),
                EndStream(exchange.request_id),
                self._access_log(exchange, error.status, now, error),
            ]
        return self._error(exchange, error, now)

    def _error(self, exchange: _Exchange, error: OpenAIError, now: float) -> list[Action]:
        headers = [_JSON, (b"x-request-id", exchange.request_id.encode())]
        retry_after = error.retry_after
        if retry_after is None and error.status in (429, 503):
            retry_after = _DEFAULT_RETRY_AFTER  # every 429 and 503 says when to retry
        if retry_after is not None:
            seconds = max(0.0, retry_after)
            headers.append((b"retry-after", str(max(1, round(seconds + 0.4999))).encode()))
            headers.append((b"retry-after-ms", str(round(seconds * 1000)).encode()))
        if error.status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="ostiary"'))
        self._exchanges.pop(exchange.request_id, None)
        return [
            Respond(exchange.request_id, error.status, tuple(headers), error_body(error)),
            self._access_log(exchange, error.status, now, error),
        ]

    def _finish(self, exchange: _Exchange, status: int, body: bytes, now: float) -> list[Action]:
        self._exchanges.pop(exchange.request_id, None)
        headers = (_JSON, (b"x-request-id", exchange.request_id.encode()))
        return [
            Respond(exchange.request_id, status, headers, body),
            self._access_log(exchange, status, now),
        ]

    def _access_log(
        self, exchange: _Exchange, status: int, now: float, error: OpenAIError | None = None
    ) -> Log:
        fields: dict[str, object] = {
            "request_id": exchange.request_id,
            "method": exchange.method,
            "path": exchange.path,
            "status": status,
            "duration_ms": round((now - exchange.started) * 1000, 3),
        }
        if exchange.key is not None:
            fields["key_id"] = exchange.key.id
            fields["role"] = exchange.key.role
        if exchange.call is not None:
            fields["model"] = exchange.call.model
            fields["stream"] = exchange.encoder is not None
        if exchange.usage is not None:
            fields["prompt_tokens"] = exchange.usage.prompt_tokens
            fields["completion_tokens"] = exchange.usage.completion_tokens
        if error is not None:
            fields["error_type"] = error.type
            fields["error_code"] = error.code
        level = "error" if status >= 500 else "info"
        return Log(level, "request", fields)


def _response_id(call: ChatCompletionRequest | CompletionRequest, request_id: str) -> str:
    return ("chatcmpl-" if isinstance(call, ChatCompletionRequest) else "cmpl-") + request_id


def _no_output() -> OpenAIError:
    return ServiceUnavailableError("The backend ended without a result.", code="backend_error")
