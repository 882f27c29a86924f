"""``GET /openapi.json``: an OpenAPI 3.1 document of what Ostiary serves.

The document is built once, at import, from the code's own tables where it has them,
so that it cannot drift from them: the paths and methods from the router
(:data:`.admission.ROUTES`, :data:`.admission.MODEL_PATH`), who may call each from
:data:`.admission.PUBLIC` and :data:`.admission.ANY_PRINCIPAL`, the request bodies'
fields (names, which are required, and the simple types) from the attrs classes the
decoder builds (:mod:`.requests`), the extension parameters from
:data:`.extensions.KNOWN`, the message roles and content-part types from
:mod:`.structuring`. What no table holds (the other fields' shapes, fixed ranges,
response bodies, statuses, headers) is written below; a route or a request field
this module does not describe is a ``KeyError`` at import, and the tests check the
rest against the decoder.

:func:`respond` answers with the precomputed bytes, an ``etag`` and
``cache-control: no-cache`` (a client may keep it and ask again with
``if-none-match``: 304).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any, get_args

import attrs
import orjson

from .actions import Respond
from .admission import ANY_PRINCIPAL, MODEL_PATH, PUBLIC, ROUTES, Endpoint
from .exchange import Exchange
from .extensions import KNOWN
from .requests import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    EmbeddingRequest,
)
from .structuring import _PART_TYPES, _ROLES

__all__ = ["DOCUMENT", "ETAG", "document", "respond"]

Schema = dict[str, Any]

_REF = "#/components/schemas/"


def _ref(name: str) -> Schema:
    return {"$ref": _REF + name}


def _obj(properties: Schema, *required: str) -> Schema:
    """An object schema with these properties, ``required`` of them required."""
    return {"type": "object", "properties": properties, "required": list(required)}


def _nullable(schema: Schema) -> Schema:
    if "type" in schema and isinstance(schema["type"], str):
        return {**schema, "type": [schema["type"], "null"]}
    return {"anyOf": [schema, {"type": "null"}]}


_STRING: Schema = {"type": "string"}
_INTEGER: Schema = {"type": "integer"}
_NUMBER: Schema = {"type": "number"}
_BOOLEAN: Schema = {"type": "boolean"}
_ANY: Schema = {"description": "Any JSON value; passed to OpenAI-compatible upstreams as sent."}
_SIMPLE: dict[object, Schema] = {str: _STRING, int: _INTEGER, float: _NUMBER, bool: _BOOLEAN}

_TEXT_OR_TOKENS: Schema = {
    "anyOf": [
        _STRING,
        {"type": "array", "items": _STRING, "minItems": 1},
        {"type": "array", "items": _INTEGER, "minItems": 1},
        {"type": "array", "items": {"type": "array", "items": _INTEGER}, "minItems": 1},
    ]
}

#: Ranges the decoder checks that do not depend on the configuration (``[limits]``
#: bounds ``n``, ``max_tokens`` and the array sizes).
RANGES: dict[str, tuple[float, float]] = {
    "temperature": (0, 2),
    "top_p": (0, 1),
    "presence_penalty": (-2, 2),
    "frequency_penalty": (-2, 2),
    "top_logprobs": (0, 20),
    "logprobs": (0, 5),
    "dimensions": (1, 65_536),
}
_AT_LEAST_ONE = frozenset({"n", "max_tokens", "max_completion_tokens", "best_of"})

#: The fields whose shape is not a plain string, number or boolean.
_FIELDS: dict[str, Schema] = {
    "messages": {"type": "array", "items": _ref("ChatMessage"), "minItems": 1},
    "stream_options": _nullable(_ref("StreamOptions")),
    "stop": {
        "anyOf": [
            _STRING,
            {"type": "array", "items": {"type": "string", "minLength": 1}},
            {"type": "null"},
        ]
    },
    "logit_bias": _nullable(
        {
            "type": "object",
            "propertyNames": {"pattern": "^[0-9]{1,10}$"},
            "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
        }
    ),
    "metadata": _nullable(
        {
            "type": "object",
            "maxProperties": 16,
            "propertyNames": {"maxLength": 64},
            "additionalProperties": {"type": "string", "maxLength": 512},
        }
    ),
    "response_format": _nullable(_ref("ResponseFormat")),
    "tools": _nullable({"type": "array", "items": _ref("Tool"), "minItems": 1}),
    "tool_choice": _nullable(
        {
            "anyOf": [
                {"type": "string", "enum": ["none", "auto", "required"]},
                {
                    "type": "object",
                    "required": ["type", "function"],
                    "properties": {
                        "type": {"const": "function"},
                        "function": {
                            "type": "object",
                            "required": ["name"],
                            "properties": {"name": _STRING},
                        },
                    },
                },
            ]
        }
    ),
    "prompt": _TEXT_OR_TOKENS,
    "input": _TEXT_OR_TOKENS,
    "encoding_format": {"type": "string", "enum": ["float", "base64"], "default": "float"},
    # ChatMessage
    "role": {"type": "string", "enum": sorted(_ROLES)},
    "content": {
        "anyOf": [
            _STRING,
            {"type": "array", "items": _ref("ContentPart"), "minItems": 1},
            {"type": "null"},
        ]
    },
    "tool_calls": _nullable({"type": "array", "items": _ref("ToolCall")}),
}

#: The extension parameters (:data:`.extensions.KNOWN`): their types and ranges.
_EXTENSIONS: dict[str, Schema] = {
    "top_k": {"type": "integer", "minimum": -1, "maximum": 1_000_000},
    "min_p": {"type": "number", "minimum": 0, "maximum": 1},
    "typical_p": {"type": "number", "minimum": 0, "maximum": 1},
    "repetition_penalty": {"type": "number", "minimum": 0, "maximum": 10},
    "repeat_penalty": {"type": "number", "minimum": 0, "maximum": 10},
    "repeat_last_n": {"type": "integer", "minimum": -1, "maximum": 1_000_000},
    "min_tokens": {"type": "integer", "minimum": 0, "maximum": 1_000_000},
    "ignore_eos": _BOOLEAN,
    "mirostat": {"type": "integer", "minimum": 0, "maximum": 2},
    "mirostat_tau": {"type": "number", "minimum": 0, "maximum": 100},
    "mirostat_eta": {"type": "number", "minimum": 0, "maximum": 1},
}
_EXTENSION_NOTE = "Not an OpenAI parameter: a 400 unknown_parameter for models that do not take it."

_HIDDEN = frozenset({"raw", "extensions"})


def _field_schema(field: attrs.Attribute[Any]) -> Schema:
    name = field.name
    args = get_args(field.type)
    optional = type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else field.type
    if name in _FIELDS:
        schema = dict(_FIELDS[name])
    elif base is Any:
        schema = dict(_ANY)
    else:
        schema = dict(_SIMPLE[base])
        if optional:
            schema = _nullable(schema)
    if name in RANGES:
        schema["minimum"], schema["maximum"] = RANGES[name]
    elif name in _AT_LEAST_ONE:
        schema["minimum"] = 1
    if name == "model":
        schema["minLength"] = 1
    return schema


def _object(cls: type, extensions: bool = False) -> Schema:
    """The schema of the body that :mod:`.decoding` structures into ``cls``."""
    properties: Schema = {}
    required = []
    for field in attrs.fields(attrs.resolve_types(cls)):
        if field.name in _HIDDEN:
            continue
        properties[field.name] = _field_schema(field)
        if field.default is attrs.NOTHING:
            required.append(field.name)
    if extensions:
        for name in KNOWN:
            properties[name] = {**_nullable(_EXTENSIONS[name]), "description": _EXTENSION_NOTE}
    return {"type": "object", "required": required, "properties": properties}


def _request_schemas() -> Schema:
    chat = _object(ChatCompletionRequest, extensions=True)
    chat["description"] = (
        "Names not listed are a 400, unless a configured backend's extra_params lists them."
    )
    completion = _object(CompletionRequest, extensions=True)
    completion["description"] = chat["description"]
    embedding = _object(EmbeddingRequest)
    embedding["additionalProperties"] = False
    message = _object(ChatMessage)
    message["additionalProperties"] = False
    return {
        "CreateChatCompletionRequest": chat,
        "CreateCompletionRequest": completion,
        "CreateEmbeddingRequest": embedding,
        "ChatMessage": message,
        "ContentPart": {
            "type": "object",
            "required": ["type"],
            "properties": {
                "type": {"type": "string", "enum": sorted(_PART_TYPES)},
                "text": _STRING,
                "refusal": _STRING,
                "image_url": {"type": "object"},
                "input_audio": {"type": "object"},
                "file": {"type": "object"},
            },
        },
        "ToolCall": _obj(
            {
                "id": _STRING,
                "type": {"const": "function"},
                "function": _obj({"name": _STRING, "arguments": _STRING}, "name", "arguments"),
            },
            "id",
            "function",
        ),
        "Tool": {
            "type": "object",
            "required": ["function"],
            "properties": {
                "type": {"const": "function"},
                "function": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                        "description": _STRING,
                        "parameters": {"type": "object", "description": "A JSON Schema."},
                        "strict": _nullable(_BOOLEAN),
                    },
                },
            },
        },
        "ResponseFormat": {
            "type": "object",
            "required": ["type"],
            "properties": {
                "type": {"type": "string", "enum": ["json_object", "json_schema", "text"]},
                "json_schema": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": _STRING,
                        "schema": {"type": "object"},
                        "strict": _nullable(_BOOLEAN),
                    },
                },
            },
        },
        "StreamOptions": {
            "type": "object",
            "properties": {"include_usage": _BOOLEAN, "include_obfuscation": _BOOLEAN},
        },
    }


_USAGE: Schema = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {
        "prompt_tokens": _INTEGER,
        "completion_tokens": _INTEGER,
        "total_tokens": _INTEGER,
    },
}
_FINISH: Schema = {
    "type": ["string", "null"],
    "enum": ["stop", "length", "tool_calls", "content_filter", "function_call", None],
}


def _assistant(tool_call: Schema, *, required: bool) -> Schema:
    """A choice's ``message`` (whole) or ``delta`` (streamed)."""
    schema: Schema = {
        "type": "object",
        "properties": {
            "role": {"const": "assistant"},
            "content": {"type": ["string", "null"]},
            "refusal": {"type": ["string", "null"]},
            "tool_calls": {"type": "array", "items": tool_call},
        },
    }
    if required:
        schema["required"] = ["role", "content"]
    return schema


def _generated(kind: str, output: Schema, usage: Schema) -> Schema:
    """A completion, chat completion or chunk: the envelope and its choices, each
    with ``output`` (its field: the message, the delta or the text)."""
    (field,) = output
    choice = {
        "type": "object",
        "required": ["index", field] if field == "delta" else ["index", field, "finish_reason"],
        "properties": {
            "index": _INTEGER,
            "finish_reason": _FINISH,
            "logprobs": {"type": ["object", "null"]},
            **output,
        },
    }
    return {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "id": _STRING,
            "object": {"const": kind},
            "created": _INTEGER,
            "model": _STRING,
            "system_fingerprint": _STRING,
            "choices": {"type": "array", "items": choice},
            "usage": usage,
        },
    }


def _response_schemas() -> Schema:
    tool_call_delta = {
        "type": "object",
        "required": ["index"],
        "properties": {
            "index": _INTEGER,
            "id": _STRING,
            "type": {"const": "function"},
            "function": {
                "type": "object",
                "properties": {"name": _STRING, "arguments": _STRING},
            },
        },
    }
    return {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["message", "type", "param", "code"],
                    "properties": {
                        "message": _STRING,
                        "type": _STRING,
                        "param": {"type": ["string", "null"]},
                        "code": {"type": ["string", "null"]},
                    },
                }
            },
        },
        "Usage": _USAGE,
        "CreateChatCompletionResponse": _generated(
            "chat.completion",
            {"message": _assistant(_ref("ToolCall"), required=True)},
            _ref("Usage"),
        ),
        "CreateChatCompletionStreamResponse": _generated(
            "chat.completion.chunk",
            {"delta": _assistant(tool_call_delta, required=False)},
            _nullable(_ref("Usage")),
        ),
        "CreateCompletionResponse": _generated(
            "text_completion", {"text": _STRING}, _nullable(_ref("Usage"))
        ),
        "CreateEmbeddingResponse": {
            "type": "object",
            "required": ["object", "data", "model", "usage"],
            "properties": {
                "object": {"const": "list"},
                "model": _STRING,
                "data": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["object", "index", "embedding"],
                        "properties": {
                            "object": {"const": "embedding"},
                            "index": _INTEGER,
                            "embedding": {
                                "anyOf": [
                                    {"type": "array", "items": _NUMBER},
                                    {
                                        "type": "string",
                                        "contentEncoding": "base64",
                                        "description": "Little-endian float32 values.",
                                    },
                                ]
                            },
                        },
                    },
                },
                "usage": _obj(
                    {"prompt_tokens": _INTEGER, "total_tokens": _INTEGER},
                    "prompt_tokens",
                    "total_tokens",
                ),
            },
        },
        "Model": _obj(
            {"id": _STRING, "object": {"const": "model"}, "created": _INTEGER, "owned_by": _STRING},
            "id",
            "object",
            "created",
            "owned_by",
        ),
        "ListModelsResponse": {
            "type": "object",
            "required": ["object", "data"],
            "properties": {
                "object": {"const": "list"},
                "data": {"type": "array", "items": _ref("Model")},
            },
        },
        "Status": {
            "type": "object",
            "required": ["status"],
            "properties": {
                "status": {"type": "string", "enum": ["ok", "ready", "degraded", "unavailable"]},
                "backends": {
                    "type": "object",
                    "additionalProperties": {"const": "unavailable"},
                },
                "redis": _STRING,
                "jwt": _STRING,
            },
        },
        "QueueSnapshot": {
            "type": "object",
            "description": "Per backend: queued and running requests, per principal too, "
            "queue-wait p50 and p99, service rate, estimated wait; the last requests ended.",
        },
    }


# -- headers and responses ---------------------------------------------------------


def _header(description: str, schema: Schema = _STRING) -> Schema:
    return {"description": description, "schema": schema}


_RATE_HEADERS = {
    f"x-ratelimit-{what}-{unit}": f"RateLimit{what.title()}{unit.title()}"
    for unit in ("requests", "tokens")
    for what in ("limit", "remaining", "reset")
}


def _headers() -> Schema:
    headers: Schema = {
        "RequestId": _header("Names this request in Ostiary's logs."),
        "RetryAfter": _header("Seconds to wait before retrying.", _INTEGER),
        "RetryAfterMs": _header("Milliseconds to wait before retrying.", _INTEGER),
        "ShouldRetry": _header("false: this request can never pass the limit.", {"const": "false"}),
        "Allow": _header("The methods the path takes."),
        "ETag": _header("Names this version of the document."),
    }
    for name, component in _RATE_HEADERS.items():
        what = "seconds until the bucket is full" if "reset" in name else name.split("-")[2]
        schema = _STRING if "reset" in name else _INTEGER
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
            "content": {"application/json": {"schema": _ref("Error")}},
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
    return {"application/json": {"schema": _ref(schema)}}


_LIMITED = (*_RATE_HEADERS,)
_MODEL_PARAMETER: Schema = {
    "name": "model",
    "in": "path",
    "required": True,
    "schema": _STRING,
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
                        "x-ostiary-event": _ref(chunk),
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
                {"name": "sec-websocket-key", "in": "header", "required": True, "schema": _STRING},
                {
                    "name": "sec-websocket-version",
                    "in": "header",
                    "required": True,
                    "schema": {"const": "13"},
                },
                {"name": "sec-websocket-protocol", "in": "header", "schema": _STRING},
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
            **_ok("The page.", {"text/html": {"schema": _STRING}}),
        },
        "/dashboard.js": {
            "summary": "The dashboard's script",
            **_ok("The script.", {"text/javascript": {"schema": _STRING}}),
        },
        "/dashboard.css": {
            "summary": "The dashboard's style",
            **_ok("The style.", {"text/css": {"schema": _STRING}}),
        },
        "/metrics": {
            "summary": "Prometheus metrics (admin, or a client inside metrics_allow)",
            **_ok("Prometheus text format 0.0.4.", {"text/plain": {"schema": _STRING}}),
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
            "schemas": {**_request_schemas(), **_response_schemas()},
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
