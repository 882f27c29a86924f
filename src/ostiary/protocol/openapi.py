"""``GET /openapi.json``: an OpenAPI 3.1 document of what Ostiary serves.

The document is built once, at import, from the code's own tables where it has them,
so that it cannot drift from them: the paths and methods from the router
(:data:`.admission.ROUTES`, :data:`.admission.MODEL_PATH`), who may call each from
:data:`.admission.PUBLIC` and :data:`.admission.ANY_PRINCIPAL`, the bodies' schemas
from :mod:`.openapi_schemas` (which reads the decoder's classes). What no table holds
(the operations, statuses, headers and security) is written below; a route this
module does not describe is a ``KeyError`` at import, and the tests check the rest
against the decoder.

:func:`respond` answers with the precomputed bytes, an ``etag`` and
``cache-control: no-cache`` (a client may keep it and ask again with
``if-none-match``: 304).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import orjson

from .actions import Respond
from .admission import ANY_PRINCIPAL, MODEL_PATH, PUBLIC, ROUTES, Endpoint
from .exchange import Exchange
from .openapi_schemas import INTEGER, STRING, Schema, ref, request_schemas, response_schemas

__all__ = ["DOCUMENT", "ETAG", "document", "respond"]


def _header(description: str, schema: Schema = STRING) -> Schema:
    return {"description": description, "schema": schema}


_RATE_HEADERS = {
    f"x-ratelimit-{what}-{unit}": f"RateLimit{what.title()}{unit.title()}"
    for unit in ("requests", "tokens")
    for what in ("limit", "remaining", "reset")
}


def _headers() -> Schema:
    headers: Schema = {
        "RequestId": _header("Names this request in Ostiary's logs."),
        "RetryAfter": _header("Seconds to wait before retrying.", INTEGER),
        "RetryAfterMs": _header("Milliseconds to wait before retrying.", INTEGER),
        "ShouldRetry": _header("false: this request can never pass the limit.", {"const": "false"}),
        "Allow": _header("The methods the path takes."),
        "ETag": _header("Names this version of the document."),
    }
    for name, component in _RATE_HEADERS.items():
        what = "seconds until the bucket is full" if "reset" in name else name.split("-")[2]
        schema = STRING if "reset" in name else INTEGER
        headers[component] = _header(f"The principal's limit: {what}.", schema)
    return headers


def _headers_ref(*names: str) -> Schema:
    return {
        header: {"$ref": "#/components/headers/" + component}
        for header, component in (("x-request-id", "RequestId"), *_names_of(names))
    }


def _names_of(names: Iterable[str]) -> list[tuple[str, str]]:
    """(header, component) pairs of the header names given."""
    components = {
        "retry-after": "RetryAfter",
        "retry-after-ms": "RetryAfterMs",
        "x-should-retry": "ShouldRetry",
        "allow": "Allow",
        "etag": "ETag",
        **_RATE_HEADERS,
    }
    return [(name, components[name]) for name in names]


_RETRY = ("retry-after", "retry-after-ms")
_ERRORS: dict[int, tuple[str, tuple[str, ...]]] = {
    400: ("The request is invalid; param names the field.", ()),
    401: ("No valid API key or JWT.", ()),
    403: ("The principal's role may not use this endpoint or model.", ()),
    404: ("No such URL, or no such model for this principal.", ()),
    405: ("The path does not take this method.", ("allow",)),
    408: ("The request was not received in time.", ()),
    413: ("The request body is too large.", ()),
    415: ("The body is not JSON.", ()),
    429: (
        "A rate limit was reached.",
        (*_RETRY, "x-should-retry", *_RATE_HEADERS),
    ),
    431: ("The request headers are too large.", ()),
    501: ("An unsupported transfer coding.", ()),
    502: ("The backend failed, or its output broke a strict schema.", ()),
    503: ("The server or the backend is busy, unavailable or shutting down.", _RETRY),
    504: ("The backend timed out, or the request waited too long in the queue.", _RETRY),
}


def _error_responses() -> Schema:
    return {
        f"Error{status}": {
            "description": description,
            "headers": _headers_ref(*headers),
            "content": {"application/json": {"schema": ref("Error")}},
        }
        for status, (description, headers) in _ERRORS.items()
    }


#: What any request may be answered by the HTTP layer.
_HTTP = (400, 405, 408, 431, 501, 503)
_AUTHENTICATED = (401, 429)
_STATUSES: dict[Endpoint, tuple[int, ...]] = {
    Endpoint.CHAT: (403, 404, 413, 415, 502, 504),
    Endpoint.COMPLETIONS: (403, 404, 413, 415, 502, 504),
    Endpoint.EMBEDDINGS: (403, 404, 413, 415, 502, 504),
    Endpoint.MODELS: (403,),
    Endpoint.MODEL: (403, 404),
    Endpoint.HEALTH: (),
    Endpoint.READY: (),
    Endpoint.QUEUE: (403,),
    Endpoint.QUEUE_LIVE: (403,),
    Endpoint.DASHBOARD: (404,),
    Endpoint.METRICS: (403,),
    Endpoint.OPENAPI: (),
}


def _json(schema: str) -> Schema:
    return {"application/json": {"schema": ref(schema)}}


_LIMITED = (*_RATE_HEADERS,)
_MODEL_PARAMETER: Schema = {
    "name": "model",
    "in": "path",
    "required": True,
    "schema": STRING,
}


def _generation(request: str, response: str, chunk: str) -> Schema:
    return {
        "requestBody": {"required": True, "content": _json(request)},
        "responses": {
            "200": {
                "description": "The result; with stream=true, server-sent events.",
                "headers": _headers_ref(*_LIMITED),
                "content": {
                    **_json(response),
                    "text/event-stream": {
                        "schema": {
                            "type": "string",
                            "description": f"'data: ' {chunk} events, then 'data: [DONE]'; an "
                            "error after the start is one 'data: ' Error event, then the end.",
                        },
                        "x-ostiary-event": ref(chunk),
                    },
                },
            }
        },
    }


def _ok(description: str, content: Schema, *headers: str) -> Schema:
    response = {"description": description, "headers": _headers_ref(*headers), "content": content}
    return {"responses": {"200": response}}


def _operations() -> dict[str, Schema]:
    """Each path's operation, but its statuses and security."""
    chunk = "CreateChatCompletionStreamResponse"
    return {
        "/v1/chat/completions": {
            "summary": "Create a chat completion",
            **_generation("CreateChatCompletionRequest", "CreateChatCompletionResponse", chunk),
        },
        "/v1/completions": {
            "summary": "Create a text completion",
            **_generation(
                "CreateCompletionRequest", "CreateCompletionResponse", "CreateCompletionResponse"
            ),
        },
        "/v1/embeddings": {
            "summary": "Create embeddings",
            "requestBody": {"required": True, "content": _json("CreateEmbeddingRequest")},
            **_ok("The embeddings.", _json("CreateEmbeddingResponse"), *_LIMITED),
        },
        "/v1/models": {
            "summary": "List the models this principal may use",
            **_ok("The models.", _json("ListModelsResponse")),
        },
        MODEL_PATH: {
            "summary": "Retrieve a model",
            "parameters": [_MODEL_PARAMETER],
            **_ok("The model.", _json("Model")),
        },
        "/healthz": {"summary": "Liveness", **_ok("Running.", _json("Status"))},
        "/readyz": {
            "summary": "Readiness of backends, Redis and the JWKS (checked at most once a second)",
            "responses": {
                "200": {
                    "description": "Ready, or degraded.",
                    "headers": _headers_ref(),
                    "content": _json("Status"),
                },
                "503": {
                    "description": "Not ready: what is failing.",
                    "headers": _headers_ref(*_RETRY),
                    "content": _json("Status"),
                },
            },
        },
        "/v1/queue": {
            "summary": "Queue snapshot (admin)",
            **_ok("The snapshot.", _json("QueueSnapshot")),
        },
        "/v1/queue/live": {
            "summary": "Queue snapshots as a WebSocket feed (admin)",
            "description": "An HTTP/1.1 upgrade to a WebSocket: offer the subprotocols "
            "ostiary.queue.v1 and bearer.<key> (or send Authorization and no subprotocol). "
            "Each text message is a QueueSnapshot.",
            "parameters": [
                {
                    "name": "connection",
                    "in": "header",
                    "required": True,
                    "schema": {"const": "upgrade"},
                },
                {
                    "name": "upgrade",
                    "in": "header",
                    "required": True,
                    "schema": {"const": "websocket"},
                },
                {"name": "sec-websocket-key", "in": "header", "required": True, "schema": STRING},
                {
                    "name": "sec-websocket-version",
                    "in": "header",
                    "required": True,
                    "schema": {"const": "13"},
                },
                {"name": "sec-websocket-protocol", "in": "header", "schema": STRING},
            ],
            "responses": {
                "101": {
                    "description": "Switched to the WebSocket feed.",
                    "headers": _headers_ref(),
                },
            },
        },
        "/dashboard": {
            "summary": "The dashboard page (holds no data; asks for an admin key)",
            **_ok("The page.", {"text/html": {"schema": STRING}}),
        },
        "/dashboard.js": {
            "summary": "The dashboard's script",
            **_ok("The script.", {"text/javascript": {"schema": STRING}}),
        },
        "/dashboard.css": {
            "summary": "The dashboard's style",
            **_ok("The style.", {"text/css": {"schema": STRING}}),
        },
        "/metrics": {
            "summary": "Prometheus metrics (admin, or a client inside metrics_allow)",
            **_ok("Prometheus text format 0.0.4.", {"text/plain": {"schema": STRING}}),
        },
        "/openapi.json": {
            "summary": "This document (any authenticated principal)",
            "responses": {
                "200": {
                    "description": "The document.",
                    "headers": _headers_ref("etag"),
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                "304": {
                    "description": "Not modified (if-none-match named this version).",
                    "headers": _headers_ref("etag"),
                },
            },
        },
    }


def _paths() -> dict[str, Schema]:
    operations = _operations()
    routes = {**ROUTES, MODEL_PATH: ("GET", Endpoint.MODEL)}
    paths: dict[str, Schema] = {}
    for path, (method, endpoint) in routes.items():
        operation = dict(operations[path])
        operation["operationId"] = _operation_id(path)
        statuses = _STATUSES[endpoint] + _HTTP
        if endpoint in PUBLIC:
            operation["security"] = []
        else:
            statuses += _AUTHENTICATED
            if endpoint is Endpoint.METRICS:
                operation["security"] = [{"bearer": []}, {}]
            elif endpoint is Endpoint.QUEUE_LIVE:
                operation["security"] = [{"bearer": []}, {"websocketProtocol": []}]
        if endpoint in ANY_PRINCIPAL:
            assert 403 not in statuses
        responses = operation["responses"] = dict(operation["responses"])
        for status in sorted(set(statuses)):
            responses.setdefault(str(status), {"$ref": f"#/components/responses/Error{status}"})
        paths[path] = {method.lower(): operation}
    return paths


def _operation_id(path: str) -> str:
    words = path.strip("/").replace("{", "").replace("}", "").replace(".", "/").split("/")
    return "".join(w.title().replace("_", "") for w in words if w != "v1") or "root"


def document() -> Schema:
    """The OpenAPI document, as a fresh dict."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Ostiary",
            "version": "1",
            "description": "An OpenAI-compatible API gateway. Every response carries "
            "x-request-id; errors are an Error body.",
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "security": [{"bearer": []}],
        "paths": _paths(),
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An Ostiary API key, or a JWT when [auth.jwt] is set.",
                },
                "websocketProtocol": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "sec-websocket-protocol",
                    "description": "The key offered as the subprotocol bearer.<key>.",
                },
            },
            "schemas": {**request_schemas(), **response_schemas()},
            "headers": _headers(),
            "responses": _error_responses(),
        },
    }


#: The document's bytes, built once.
DOCUMENT = orjson.dumps(document(), option=orjson.OPT_SORT_KEYS)
ETAG = b'"%s"' % hashlib.sha256(DOCUMENT).hexdigest()[:32].encode()
_HEADERS = ((b"etag", ETAG), (b"cache-control", b"no-cache"))


def respond(exchange: Exchange, headers: Iterable[tuple[bytes, bytes]]) -> Respond:
    """The document, or 304 to a client that holds this version."""
    for name, value in headers:
        if name == b"if-none-match" and _matches(value):
            return exchange.respond(304, b"", extra=_HEADERS)
    return exchange.respond(200, DOCUMENT, extra=_HEADERS)


def _matches(value: bytes) -> bool:
    tags = {tag.strip().removeprefix(b"W/") for tag in value.split(b",")}
    return ETAG in tags or b"*" in tags
