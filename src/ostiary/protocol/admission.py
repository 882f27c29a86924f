"""Judging a request from its head alone: the route, the credentials, and how much
body the runtime may read for it.

:meth:`Gateway.admits <ostiary.protocol.gateway.Gateway.admits>` returns an
:class:`Admission` before any byte of the body is read (or ``100 Continue`` sent):
a request that is refused, or whose route takes no body, never makes the server
buffer one. The admission then travels inside ``RequestReceived``, so the head is
judged once.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from types import MappingProxyType

import attrs

from .access import Principal
from .errors import (
    AuthenticationError,
    HeadersTooLargeError,
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
    NotImplementedHttpError,
    OpenAIError,
    RequestTimeoutError,
    RequestTooLargeError,
    ServiceUnavailableError,
)

__all__ = [
    "ADMIN",
    "ANY_PRINCIPAL",
    "ENDPOINT_LABELS",
    "MODEL_PATH",
    "ROUTES",
    "Admission",
    "Endpoint",
    "Refusal",
    "authorization_header",
    "methods_of",
    "refusal_error",
    "route",
]


class Endpoint(enum.Enum):
    """The routes Ostiary serves; values are the endpoint names of DESIGN §5a
    (roles, metrics labels, logs)."""

    # Members are singletons: hash by identity, not (as Enum does) in Python by name.
    __hash__ = object.__hash__

    CHAT = "chat.completions"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"
    MODELS = "models"
    MODEL = "models.retrieve"
    HEALTH = "healthz"
    READY = "readyz"
    PREFLIGHT = "preflight"
    QUEUE = "queue"
    QUEUE_LIVE = "queue.live"
    DASHBOARD = "dashboard"
    METRICS = "metrics"
    OPENAPI = "openapi"


#: The name metrics and the dashboard give each route: DESIGN §5a's, where
#: ``models`` covers listing and retrieving models and ``queue`` its live feed.
ENDPOINT_LABELS: dict[Endpoint, str] = {
    e: {Endpoint.MODEL: "models", Endpoint.QUEUE_LIVE: "queue"}.get(e, e.value) for e in Endpoint
}


#: path → (method, endpoint), for the fixed paths.
_ROUTES: dict[str, tuple[str, Endpoint]] = {
    "/v1/chat/completions": ("POST", Endpoint.CHAT),
    "/v1/completions": ("POST", Endpoint.COMPLETIONS),
    "/v1/embeddings": ("POST", Endpoint.EMBEDDINGS),
    "/v1/models": ("GET", Endpoint.MODELS),
    "/healthz": ("GET", Endpoint.HEALTH),
    "/readyz": ("GET", Endpoint.READY),
    "/v1/queue": ("GET", Endpoint.QUEUE),
    "/v1/queue/live": ("GET", Endpoint.QUEUE_LIVE),
    "/dashboard": ("GET", Endpoint.DASHBOARD),
    "/dashboard.js": ("GET", Endpoint.DASHBOARD),
    "/dashboard.css": ("GET", Endpoint.DASHBOARD),
    "/metrics": ("GET", Endpoint.METRICS),
    "/openapi.json": ("GET", Endpoint.OPENAPI),
}
#: The fixed paths, read-only (the OpenAPI document is built from them).
ROUTES: Mapping[str, tuple[str, Endpoint]] = MappingProxyType(_ROUTES)
_MODEL_PREFIX = "/v1/models/"
#: The one templated path, ``GET`` (``{model}`` percent-decoded).
MODEL_PATH = _MODEL_PREFIX + "{model}"
PUBLIC = frozenset({Endpoint.HEALTH, Endpoint.READY, Endpoint.PREFLIGHT, Endpoint.DASHBOARD})
#: Endpoints for the ``admin`` role only (``/metrics`` also for ``metrics_allow``).
ADMIN = frozenset({Endpoint.QUEUE, Endpoint.QUEUE_LIVE, Endpoint.METRICS})
#: Endpoints any authenticated principal may read, whatever its role's endpoints.
ANY_PRINCIPAL = frozenset({Endpoint.OPENAPI})
#: Endpoints whose requests carry a JSON body.
WITH_BODY = frozenset({Endpoint.CHAT, Endpoint.COMPLETIONS, Endpoint.EMBEDDINGS})


class Refusal(enum.Enum):
    """Why the HTTP layer could not read a request; the core words the answer."""

    MALFORMED = "malformed"
    SMUGGLING = "smuggling"
    OLD_CHUNKED = "old_chunked"
    UNSUPPORTED_CODING = "unsupported_coding"
    ENDED_EARLY = "ended_early"
    HEAD_TIMEOUT = "head_timeout"
    BODY_TIMEOUT = "body_timeout"
    HEAD_TOO_LARGE = "head_too_large"
    BODY_TOO_LARGE = "body_too_large"
    TOO_MANY_CHUNKS = "too_many_chunks"
    CONNECTION_LIMIT = "connection_limit"


@attrs.define
class Admission:
    """What the head of a request says about it.

    ``error`` set: the request is refused (the runtime reads no body and closes the
    connection after the answer). ``max_body_bytes`` is the most body the runtime may
    read for this route: 0 for routes without a body, whose bodies are never read.
    ``principal`` is whom the credentials name (None on public routes and
    refusals); ``client`` the client's address (the socket peer, or what a trusted
    proxy says);
    ``keys_version`` says which key table judged it, so a table replaced between the
    head and the body is noticed. ``peer`` is the socket's address.
    """

    endpoint: Endpoint | None
    max_body_bytes: int
    peer: str = ""
    principal: Principal | None = None
    model_id: str | None = None
    error: OpenAIError | None = attrs.field(default=None, eq=False)
    keys_version: int = 0
    #: The credential is a JWT naming a signing key the verifier does not hold: the
    #: runtime may refresh the key set (rate-limited) and ask :meth:`admits` again.
    refresh_keys: bool = False
    client: str = ""

    @property
    def read_body(self) -> bool:
        """Whether the runtime should read (and bound) the body."""
        return self.error is None and self.max_body_bytes > 0


def route(method: str, target: str) -> tuple[Endpoint, str | None]:
    """The endpoint for a request line, and the model id for ``/v1/models/{id}``

    Raises 404 ``unknown_url`` or 405 ``method_not_allowed`` (whose ``allow``
    attribute lists the methods the path takes)."""
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
    if method == "OPTIONS":
        # A CORS preflight (or a plain OPTIONS): answered without a key.
        return Endpoint.PREFLIGHT, None
    if method != allowed and not (allowed == "GET" and method == "HEAD"):
        raise MethodNotAllowedError(
            f"Method {method} is not allowed for {path}; use {allowed}.",
            code="method_not_allowed",
            allow=("GET", "HEAD") if allowed == "GET" else (allowed,),
        )
    return endpoint, model


def methods_of(target: str) -> bytes:
    """The ``Allow`` value of a path that :func:`route` knows."""
    entry = _ROUTES.get(target.partition("?")[0])
    if entry is not None and entry[0] == "POST":
        return b"POST, OPTIONS"
    return b"GET, HEAD, OPTIONS"


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


def authorization_header(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
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


def refusal_error(refusal: Refusal, limit: int = 0) -> OpenAIError:
    """The error that answers a request the HTTP layer refused."""
    if refusal is Refusal.BODY_TOO_LARGE:
        return RequestTooLargeError(
            f"The request body is larger than {limit} bytes.", code="request_too_large"
        )
    if refusal is Refusal.TOO_MANY_CHUNKS:
        return RequestTooLargeError(
            f"The request body came in more than {limit} chunks; send it with a"
            " Content-Length, or in fewer, larger chunks.",
            code="too_many_body_chunks",
        )
    if refusal is Refusal.HEAD_TOO_LARGE:
        return HeadersTooLargeError("The request headers are too large.", code="headers_too_large")
    if refusal is Refusal.HEAD_TIMEOUT or refusal is Refusal.BODY_TIMEOUT:
        part = "head" if refusal is Refusal.HEAD_TIMEOUT else "body"
        return RequestTimeoutError(
            f"Timed out waiting for the request {part}.", code="request_timeout"
        )
    if refusal is Refusal.UNSUPPORTED_CODING:
        return NotImplementedHttpError(
            "Only the chunked transfer coding is supported.", code="unsupported_transfer_coding"
        )
    if refusal is Refusal.CONNECTION_LIMIT:
        return ServiceUnavailableError(
            "The server is at its connection limit; retry shortly.", code="connection_limit"
        )
    if refusal is Refusal.SMUGGLING:
        message = "Content-Length and Transfer-Encoding must not both be set."
    elif refusal is Refusal.OLD_CHUNKED:
        message = "Transfer-Encoding needs HTTP/1.1."
    elif refusal is Refusal.ENDED_EARLY:
        message = "The request ended early."
    else:
        message = "Malformed HTTP request."
    return InvalidRequestError(message, code="invalid_request")
