"""The JSON Schemas of the bodies Ostiary takes and answers, for :mod:`.openapi`.

The request bodies' fields (names, which are required, and the simple types) come
from the attrs classes the decoder builds (:mod:`.requests`), the extension
parameters from :data:`.extensions.KNOWN`, the message roles and content-part types
from :mod:`.structuring`; the other fields' shapes, the fixed ranges and the response
bodies are written below. A request field this module does not describe is a
``KeyError`` at import.
"""

from __future__ import annotations

from typing import Any, get_args

import attrs

from .extensions import KNOWN
from .requests import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    EmbeddingRequest,
)
from .structuring import _PART_TYPES, _ROLES

__all__ = [
    "INTEGER",
    "RANGES",
    "STRING",
    "Schema",
    "ref",
    "request_schemas",
    "response_schemas",
]

Schema = dict[str, Any]

_REF = "#/components/schemas/"


def ref(name: str) -> Schema:
    """A reference to the component schema ``name``."""
    return {"$ref": _REF + name}


def _obj(properties: Schema, *required: str) -> Schema:
    """An object schema with these properties, ``required`` of them required."""
    return {"type": "object", "properties": properties, "required": list(required)}


def _nullable(schema: Schema) -> Schema:
    if "type" in schema and isinstance(schema["type"], str):
        return {**schema, "type": [schema["type"], "null"]}
    return {"anyOf": [schema, {"type": "null"}]}


STRING: Schema = {"type": "string"}
INTEGER: Schema = {"type": "integer"}
_NUMBER: Schema = {"type": "number"}
_BOOLEAN: Schema = {"type": "boolean"}
_ANY: Schema = {"description": "Any JSON value; passed to OpenAI-compatible upstreams as sent."}
_SIMPLE: dict[object, Schema] = {str: STRING, int: INTEGER, float: _NUMBER, bool: _BOOLEAN}

_TEXT_OR_TOKENS: Schema = {
    "anyOf": [
        STRING,
        {"type": "array", "items": STRING, "minItems": 1},
        {"type": "array", "items": INTEGER, "minItems": 1},
        {"type": "array", "items": {"type": "array", "items": INTEGER}, "minItems": 1},
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
    "messages": {"type": "array", "items": ref("ChatMessage"), "minItems": 1},
    "stream_options": _nullable(ref("StreamOptions")),
    "stop": {
        "anyOf": [
            STRING,
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
    "response_format": _nullable(ref("ResponseFormat")),
    "tools": _nullable({"type": "array", "items": ref("Tool"), "minItems": 1}),
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
                            "properties": {"name": STRING},
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
            STRING,
            {"type": "array", "items": ref("ContentPart"), "minItems": 1},
            {"type": "null"},
        ]
    },
    "tool_calls": _nullable({"type": "array", "items": ref("ToolCall")}),
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


def request_schemas() -> Schema:
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
                "text": STRING,
                "refusal": STRING,
                "image_url": {"type": "object"},
                "input_audio": {"type": "object"},
                "file": {"type": "object"},
            },
        },
        "ToolCall": _obj(
            {
                "id": STRING,
                "type": {"const": "function"},
                "function": _obj({"name": STRING, "arguments": STRING}, "name", "arguments"),
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
                        "description": STRING,
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
                        "name": STRING,
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
        "prompt_tokens": INTEGER,
        "completion_tokens": INTEGER,
        "total_tokens": INTEGER,
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
            "index": INTEGER,
            "finish_reason": _FINISH,
            "logprobs": {"type": ["object", "null"]},
            **output,
        },
    }
    return {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "id": STRING,
            "object": {"const": kind},
            "created": INTEGER,
            "model": STRING,
            "system_fingerprint": STRING,
            "choices": {"type": "array", "items": choice},
            "usage": usage,
        },
    }


def response_schemas() -> Schema:
    tool_call_delta = {
        "type": "object",
        "required": ["index"],
        "properties": {
            "index": INTEGER,
            "id": STRING,
            "type": {"const": "function"},
            "function": {
                "type": "object",
                "properties": {"name": STRING, "arguments": STRING},
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
                        "message": STRING,
                        "type": STRING,
                        "param": {"type": ["string", "null"]},
                        "code": {"type": ["string", "null"]},
                    },
                }
            },
        },
        "Usage": _USAGE,
        "CreateChatCompletionResponse": _generated(
            "chat.completion",
            {"message": _assistant(ref("ToolCall"), required=True)},
            ref("Usage"),
        ),
        "CreateChatCompletionStreamResponse": _generated(
            "chat.completion.chunk",
            {"delta": _assistant(tool_call_delta, required=False)},
            _nullable(ref("Usage")),
        ),
        "CreateCompletionResponse": _generated(
            "text_completion", {"text": STRING}, _nullable(ref("Usage"))
        ),
        "CreateEmbeddingResponse": {
            "type": "object",
            "required": ["object", "data", "model", "usage"],
            "properties": {
                "object": {"const": "list"},
                "model": STRING,
                "data": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["object", "index", "embedding"],
                        "properties": {
                            "object": {"const": "embedding"},
                            "index": INTEGER,
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
                    {"prompt_tokens": INTEGER, "total_tokens": INTEGER},
                    "prompt_tokens",
                    "total_tokens",
                ),
            },
        },
        "Model": _obj(
            {"id": STRING, "object": {"const": "model"}, "created": INTEGER, "owned_by": STRING},
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
                "data": {"type": "array", "items": ref("Model")},
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
                "redis": STRING,
                "jwt": STRING,
            },
        },
        "QueueSnapshot": {
            "type": "object",
            "description": "Per backend: queued and running requests, per principal too, "
            "queue-wait p50 and p99, service rate, estimated wait; the last requests ended.",
        },
    }
