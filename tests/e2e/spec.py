"""OpenAI's own OpenAPI spec as JSON Schema validators for response bodies.

The spec is the repository's trimmed copy, ``tests/e2e/spec_data/
openai-openapi-trimmed.json`` (the schemas below and what they reference, cut from
OpenAI's full spec by ``spec_data/trim_spec.py``; its README says where from), or
the file named by ``OSTIARY_OPENAPI_SPEC`` (the full spec, YAML or JSON). It is
OpenAPI 3.1, but it still uses OpenAPI 3.0's ``nullable: true``, which JSON Schema
does not know. :func:`load_spec` rewrites
it once per session: a schema with ``type`` gets ``"null"`` added to its type
(and ``None`` to its ``enum``); any other schema becomes
``anyOf: [schema, {"type": "null"}]``.

Every validator resolves ``$ref: '#/components/schemas/...'`` against the whole
document through one :class:`referencing.Registry`. A missing spec file raises
:class:`SpecMissingError`: tests that need the spec fail, never skip.

Two places where the spec cannot describe what OpenAI's API (and every client)
actually does are relaxed, and only there, by :func:`completion_chunk_schema` and
:func:`decode_base64_embeddings`; see their docstrings.
"""

from __future__ import annotations

import base64
import copy
import functools
import os
import struct
from pathlib import Path
from typing import Any

import orjson
import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

__all__ = [
    "COMPLETION_CHUNK",
    "SCHEMA_NAMES",
    "SPEC_ENV",
    "TRIMMED_SPEC",
    "OpenAPI",
    "SpecMissingError",
    "assert_valid",
    "completion_chunk_schema",
    "decode_base64_embeddings",
    "errors",
    "load_spec",
    "spec_path",
    "sse_payloads",
    "validator",
]

SPEC_ENV = "OSTIARY_OPENAPI_SPEC"
_BASE_URI = "urn:ostiary:openai-openapi"
#: The trimmed copy of OpenAI's spec kept in the repository.
TRIMMED_SPEC = Path(__file__).resolve().parent / "spec_data" / "openai-openapi-trimmed.json"

#: The response schemas the e2e tests validate against.
SCHEMA_NAMES = (
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "CreateCompletionResponse",
    "CreateEmbeddingResponse",
    "ListModelsResponse",
    "Model",
    "ErrorResponse",
)

#: Derived schemas (see their functions), validated like the spec's own names.
COMPLETION_CHUNK = "CompletionStreamChunk"

JsonObject = dict[str, Any]


class SpecMissingError(AssertionError):
    """The OpenAPI spec file is not where it should be (an error, never a skip)."""


def spec_path() -> Path:
    """``$OSTIARY_OPENAPI_SPEC`` if set, else the trimmed copy (:data:`TRIMMED_SPEC`)."""
    override = os.environ.get(SPEC_ENV)
    return Path(override) if override else TRIMMED_SPEC


def _null_type(schema: JsonObject) -> JsonObject:
    """A schema with ``nullable: true`` rewritten in JSON Schema terms."""
    kind = schema.get("type")
    if kind is None:
        return {"anyOf": [schema, {"type": "null"}]}
    out = dict(schema)
    if isinstance(kind, list):
        out["type"] = kind if "null" in kind else [*kind, "null"]
    else:
        out["type"] = [kind, "null"]
    enum = out.get("enum")
    if isinstance(enum, list) and None not in enum:
        out["enum"] = [*enum, None]
    return out


def _convert(node: Any) -> Any:
    """The document with every ``nullable`` turned into JSON Schema (bottom-up)."""
    if isinstance(node, list):
        return [_convert(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _convert(value) for key, value in node.items()}
    flag = out.get("nullable")
    if isinstance(flag, bool):
        del out["nullable"]
        if flag:
            return _null_type(out)
    return out


@functools.cache
def load_spec() -> JsonObject:
    """The parsed, converted spec document (parsed once per process)."""
    path = spec_path()
    if not path.is_file():
        raise SpecMissingError(
            f"OpenAI's OpenAPI spec is missing: {path} (set {SPEC_ENV} to its path)"
        )
    raw = path.read_bytes()
    if path.suffix == ".json":
        document = orjson.loads(raw)
    else:
        document = yaml.load(raw, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    if not isinstance(document, dict) or "components" not in document:
        raise SpecMissingError(f"{path} is not an OpenAPI document")
    converted: JsonObject = _convert(document)
    return converted


@functools.cache
def _registry() -> Registry[Any]:
    resource: Resource[Any] = DRAFT202012.create_resource(load_spec())
    registry: Registry[Any] = Registry().with_resource(_BASE_URI, resource)
    return registry


def _schema(name: str) -> JsonObject:
    schemas = load_spec()["components"]["schemas"]
    if name == COMPLETION_CHUNK:
        return completion_chunk_schema()
    if name not in schemas:
        raise KeyError(f"the spec has no schema {name!r}")
    return {"$ref": f"{_BASE_URI}#/components/schemas/{name}"}


@functools.cache
def completion_chunk_schema() -> JsonObject:
    """``CreateCompletionResponse`` for stream chunks, with ``choices[].finish_reason``
    also allowed to be null.

    The spec says stream chunks share the non-streamed shape, whose ``finish_reason``
    is a required non-null enum; but no chunk before the last can know why generation
    will stop, and OpenAI's API (and its SDK's streaming) sends null there. Nothing
    else is relaxed: ``usage``, when present, must still be a ``CompletionUsage``."""
    schema = copy.deepcopy(load_spec()["components"]["schemas"]["CreateCompletionResponse"])
    reason = schema["properties"]["choices"]["items"]["properties"]["finish_reason"]
    reason["type"] = [reason["type"], "null"]
    reason["enum"] = [*reason["enum"], None]
    rebased: JsonObject = _rebase(schema)
    return rebased


def _rebase(schema: Any) -> Any:
    """Local ``#/...`` refs of a schema lifted out of the document, made absolute."""
    if isinstance(schema, list):
        return [_rebase(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _rebase(v) for k, v in schema.items()}
    ref = out.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        out["$ref"] = _BASE_URI + ref
    return out


@functools.cache
def validator(name: str) -> Draft202012Validator:
    """A Draft 2020-12 validator for ``#/components/schemas/<name>`` (or a derived
    schema named in this module)."""
    return Draft202012Validator(_schema(name), registry=_registry())


def errors(name: str, instance: object) -> list[str]:
    """Every way ``instance`` fails schema ``name`` (empty when it is valid)."""
    found: list[ValidationError] = sorted(
        validator(name).iter_errors(instance), key=lambda e: list(e.absolute_path)
    )
    return [_describe(e) for e in found]


def _describe(error: ValidationError) -> str:
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    best = error
    if error.context:
        best = min(error.context, key=lambda e: len(list(e.relative_path)))
    return f"{path or '<root>'}: {best.message}"


def assert_valid(name: str, instance: object) -> None:
    """Fail with every validation error of ``instance`` against schema ``name``."""
    problems = errors(name, instance)
    if problems:
        shown = orjson.dumps(instance).decode()
        if len(shown) > 600:
            shown = shown[:600] + "..."
        raise AssertionError(
            f"response does not match the OpenAI spec's {name}:\n  "
            + "\n  ".join(problems)
            + f"\nbody: {shown}"
        )


def decode_base64_embeddings(body: JsonObject) -> JsonObject:
    """A ``CreateEmbeddingResponse`` body with base64 embeddings decoded to floats.

    With ``encoding_format: "base64"`` OpenAI's API sends each embedding as a base64
    string of little-endian float32s (the SDK asks for that by default and decodes it),
    while the spec only describes the float form. Decoding first checks that each
    string is strict base64 of whole float32s, then validates the spec's shape."""
    out = copy.deepcopy(body)
    for item in out.get("data", []):
        encoded = item.get("embedding")
        if not isinstance(encoded, str):
            raise AssertionError(f"base64 embedding is not a string: {encoded!r}")
        raw = base64.b64decode(encoded, validate=True)
        if len(raw) % 4:
            raise AssertionError(f"base64 embedding holds {len(raw)} bytes, not whole float32s")
        item["embedding"] = list(struct.unpack(f"<{len(raw) // 4}f", raw))
    return out


SSE_DONE = b"[DONE]"


def sse_payloads(raw: bytes) -> list[bytes]:
    """The ``data:`` payloads of an OpenAI SSE body, checking its framing exactly:
    only ``data: <one line>\n\n`` events, the last one ``data: [DONE]\n\n``,
    nothing after it and no ``[DONE]`` before it. ``[DONE]`` itself is not returned."""
    if not raw.endswith(b"data: " + SSE_DONE + b"\n\n"):
        raise AssertionError(f"SSE body does not end with 'data: [DONE]\\n\\n': {raw[-200:]!r}")
    events = raw.split(b"\n\n")
    if events[-1] != b"":
        raise AssertionError(f"SSE body has bytes after its last event: {events[-1]!r}")
    payloads = []
    for event in events[:-1]:
        if not event.startswith(b"data: ") or b"\n" in event or b"\r" in event:
            raise AssertionError(f"not a one-line 'data: ' SSE event: {event[:200]!r}")
        payloads.append(event[len(b"data: ") :])
    if SSE_DONE in payloads[:-1]:
        raise AssertionError("SSE body has events after 'data: [DONE]'")
    return payloads[:-1]


class OpenAPI:
    """This module's checks as one object, for fixtures to hand to tests."""

    COMPLETION_CHUNK = COMPLETION_CHUNK

    def __init__(self) -> None:
        load_spec()
        for name in (*SCHEMA_NAMES, COMPLETION_CHUNK):
            validator(name)

    errors = staticmethod(errors)
    assert_valid = staticmethod(assert_valid)
    decode_base64_embeddings = staticmethod(decode_base64_embeddings)
    sse_payloads = staticmethod(sse_payloads)
