"""``GET /openapi.json``: the document is valid OpenAPI 3.1, lists exactly the routes
the router answers, and its request schemas accept what the decoder accepts and
refuse what it refuses; the gateway serves it to any authenticated principal."""

from __future__ import annotations

from typing import Any

import attrs
import orjson
import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError

from ostiary.protocol import openapi, openapi_schemas
from ostiary.protocol.actions import Respond
from ostiary.protocol.admission import MODEL_PATH, PUBLIC, ROUTES, Endpoint, route
from ostiary.protocol.decoding import decode_chat, decode_completion, decode_embedding
from ostiary.protocol.errors import InvalidRequestError, MethodNotAllowedError, NotFoundError
from ostiary.protocol.extensions import KNOWN
from ostiary.protocol.request_limits import RequestLimits
from ostiary.protocol.requests import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from tests.conftest import ADMIN_SECRET, USER_SECRET
from tests.protocol.test_access_control import TENANT, TENANT_SECRET, WALL, gateway, request

DOC: dict[str, Any] = orjson.loads(openapi.DOCUMENT)
LIMITS = RequestLimits()
METHODS = {"get", "post", "put", "patch", "delete", "head", "options", "trace"}


def schema_of(name: str) -> Draft202012Validator:
    """A validator for one component schema, resolving ``$ref`` inside the document."""
    return Draft202012Validator({"$ref": f"#/components/schemas/{name}", **DOC})


# -- the document --------------------------------------------------------------------


def test_the_document_is_valid_openapi_3_1() -> None:
    assert DOC["openapi"].startswith("3.1.")
    validate(DOC, cls=OpenAPIV31SpecValidator)
    for name in DOC["components"]["schemas"]:
        Draft202012Validator.check_schema(DOC["components"]["schemas"][name])


def test_the_validator_would_notice_a_broken_document() -> None:
    broken = orjson.loads(openapi.DOCUMENT)
    broken["paths"]["/healthz"]["get"]["responses"]["200"] = {"content": {}}  # no description
    with pytest.raises(OpenAPIValidationError):
        validate(broken, cls=OpenAPIV31SpecValidator)


def test_every_route_is_documented_and_nothing_else() -> None:
    documented = {(path, method.upper()) for path, item in DOC["paths"].items() for method in item}
    served = {(path, method) for path, (method, _) in ROUTES.items()}
    assert documented == served | {(MODEL_PATH, "GET")}
    endpoints = set()
    for path, item in DOC["paths"].items():
        concrete = path.replace("{model}", "some-model")
        (method,) = item
        endpoint, _ = route(method.upper(), concrete)
        endpoints.add(endpoint)
        for other in METHODS - {method, "head", "options"}:
            with pytest.raises(MethodNotAllowedError):
                route(other.upper(), concrete)
    assert endpoints == set(Endpoint) - {Endpoint.PREFLIGHT}
    with pytest.raises(NotFoundError):
        route("GET", "/openapi.yaml")


def test_security_follows_the_router() -> None:
    for path, item in DOC["paths"].items():
        (operation,) = item.values()
        endpoint = ROUTES[path][1] if path in ROUTES else Endpoint.MODEL
        responses = operation["responses"]
        if endpoint in PUBLIC:
            assert operation["security"] == [], path
            assert "401" not in responses, path
        else:
            assert operation.get("security", DOC["security"]) != [], path
            assert "401" in responses and "429" in responses, path
        assert ("403" in responses) == (endpoint not in PUBLIC | {Endpoint.OPENAPI}), path
    assert DOC["security"] == [{"bearer": []}]
    assert DOC["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_errors_are_the_openai_error_body_with_retry_headers_on_429_and_503() -> None:
    error = schema_of("Error")
    body = orjson.loads(
        b'{"error":{"message":"m","type":"invalid_request_error","param":null,"code":null}}'
    )
    assert error.is_valid(body)
    assert not error.is_valid({"error": {"message": "m"}})
    responses = DOC["components"]["responses"]
    for status in ("429", "503", "504"):
        assert {"retry-after", "retry-after-ms"} <= set(responses[f"Error{status}"]["headers"])
    limited = set(responses["Error429"]["headers"])
    assert {f"x-ratelimit-{w}-{u}" for w in ("limit", "remaining", "reset")
            for u in ("requests", "tokens")} | {"x-should-retry"} <= limited  # fmt: skip
    for item in DOC["paths"].values():
        for operation in item.values():
            for answer in operation["responses"].values():
                if "$ref" not in answer:
                    assert "x-request-id" in answer["headers"]


def test_streaming_endpoints_document_server_sent_events() -> None:
    for path in ("/v1/chat/completions", "/v1/completions"):
        content = DOC["paths"][path]["post"]["responses"]["200"]["content"]
        assert set(content) == {"application/json", "text/event-stream"}
    assert "stream" in DOC["components"]["schemas"]["CreateChatCompletionRequest"]["properties"]


# -- request bodies against the decoder ------------------------------------------------

CASES = (
    ("CreateChatCompletionRequest", ChatCompletionRequest, decode_chat),
    ("CreateCompletionRequest", CompletionRequest, decode_completion),
    ("CreateEmbeddingRequest", EmbeddingRequest, decode_embedding),
)
MINIMAL: dict[str, dict[str, Any]] = {
    "CreateChatCompletionRequest": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    "CreateCompletionRequest": {"model": "m", "prompt": "hi"},
    "CreateEmbeddingRequest": {"model": "e", "input": "hi"},
}


def both(name: str, body: dict[str, Any]) -> tuple[bool, bool]:
    """(the schema accepts it, the decoder accepts it)."""
    decoder = {case[0]: case[2] for case in CASES}[name]
    try:
        decoder(orjson.dumps(body), LIMITS)
    except InvalidRequestError:
        decoded = False
    else:
        decoded = True
    return schema_of(name).is_valid(body), decoded


@pytest.mark.parametrize(("name", "cls", "decoder"), CASES)
def test_the_properties_are_the_decoders_fields(name: str, cls: type, decoder: Any) -> None:
    schema = DOC["components"]["schemas"][name]
    fields = {f.name for f in attrs.fields(cls)} - {"raw", "extensions"}
    extensions = set(KNOWN) if cls is not EmbeddingRequest else set()
    assert set(schema["properties"]) == fields | extensions
    required = {f.name for f in attrs.fields(cls) if f.default is attrs.NOTHING}
    assert set(schema["required"]) == required
    assert both(name, MINIMAL[name]) == (True, True)
    for field in required:
        body = {k: v for k, v in MINIMAL[name].items() if k != field}
        assert both(name, body) == (False, False), field


@pytest.mark.parametrize(("name", "cls", "decoder"), CASES)
def test_null_is_accepted_where_the_schema_says_so(name: str, cls: type, decoder: Any) -> None:
    schema = schema_of(name)
    for field in DOC["components"]["schemas"][name]["properties"]:
        body = {**MINIMAL[name], field: None}
        assert both(name, body)[0] == both(name, body)[1], field
        not_null = ("model", "messages", "prompt", "input", "encoding_format")
        assert schema.is_valid(body) or field in not_null, field


@pytest.mark.parametrize(("field", "bounds"), sorted(openapi_schemas.RANGES.items()))
def test_fixed_ranges_match_the_decoder(field: str, bounds: tuple[float, float]) -> None:
    name = {
        "logprobs": "CreateCompletionRequest",
        "dimensions": "CreateEmbeddingRequest",
    }.get(field, "CreateChatCompletionRequest")
    low, high = bounds
    for value, ok in ((low, True), (high, True), (low - 1, False), (high + 1, False)):
        body = {**MINIMAL[name], field: int(value)}
        if field == "top_logprobs":
            body["logprobs"] = True
        assert both(name, body) == (ok, ok), (field, value)


def test_the_extension_parameters_match_their_checks() -> None:
    name = "CreateChatCompletionRequest"
    properties = DOC["components"]["schemas"][name]["properties"]
    for extension, check in KNOWN.items():
        schema = properties[extension]
        assert schema["type"][1] == "null"
        samples: list[object] = [None]
        if schema["type"][0] == "boolean":
            samples += [True, 1]
        else:
            samples += [schema["minimum"], schema["maximum"], schema["minimum"] - 1]
            samples += [schema["maximum"] + 1, "1"]
            if schema["type"][0] == "number":
                samples.append(0.5 * (schema["minimum"] + schema["maximum"]))
        for value in samples:
            try:
                if value is not None:
                    check(extension, value)
            except InvalidRequestError:
                accepted = False
            else:
                accepted = True
            assert schema_of(name).is_valid({**MINIMAL[name], extension: value}) == accepted


@pytest.mark.parametrize(
    ("name", "field", "values", "wrong"),
    [
        ("CreateEmbeddingRequest", "encoding_format", ["float", "base64"], "int8"),
        ("CreateChatCompletionRequest", "tool_choice", ["none"], "sometimes"),
    ],
)
def test_enums_match_the_decoder(name: str, field: str, values: list[str], wrong: str) -> None:
    for value in values:
        assert both(name, {**MINIMAL[name], field: value}) == (True, True)
    assert both(name, {**MINIMAL[name], field: wrong}) == (False, False)


def test_message_roles_content_parts_and_response_formats_match_the_decoder() -> None:
    name = "CreateChatCompletionRequest"
    schemas = DOC["components"]["schemas"]
    for role in schemas["ChatMessage"]["properties"]["role"]["enum"]:
        message: dict[str, Any] = {"role": role, "content": "x", "name": "f"}
        messages = [message]
        if role == "tool":
            message["tool_call_id"] = "c"
            call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            messages.insert(0, {"role": "assistant", "tool_calls": [call]})
        body = {**MINIMAL[name], "messages": messages}
        assert schema_of(name).is_valid(body), role
        assert decode_chat(orjson.dumps(body), LIMITS).messages[-1].role == role
    assert both(name, {**MINIMAL[name], "messages": [{"role": "robot", "content": "x"}]}) == (
        False,
        False,
    )
    for kind in schemas["ContentPart"]["properties"]["type"]["enum"]:
        part = {"type": kind, kind: "x" if kind in ("text", "refusal") else {"url": "u"}}
        body = {**MINIMAL[name], "messages": [{"role": "user", "content": [part]}]}
        assert both(name, body) == (True, True), kind
    for kind in schemas["ResponseFormat"]["properties"]["type"]["enum"]:
        response_format: dict[str, Any] = {"type": kind}
        if kind == "json_schema":
            response_format["json_schema"] = {"name": "r", "schema": {"type": "object"}}
        assert both(name, {**MINIMAL[name], "response_format": response_format}) == (True, True)


# -- served by the gateway ---------------------------------------------------------------


def answer(secret: str, extra: tuple[tuple[bytes, bytes], ...] = ()) -> Respond:
    gw = gateway(TENANT)
    actions = request(gw, "r1", secret=secret, target="/openapi.json", method="GET", extra=extra)
    (respond,) = [a for a in actions if isinstance(a, Respond)]
    return respond


@pytest.mark.parametrize("secret", [ADMIN_SECRET, USER_SECRET, TENANT_SECRET])
def test_any_authenticated_principal_reads_it(secret: str) -> None:
    respond = answer(secret)
    headers = dict(respond.headers)
    assert respond.status == 200
    assert respond.body is openapi.DOCUMENT
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"etag"] == openapi.ETAG
    assert headers[b"cache-control"] == b"no-cache"
    assert b"x-request-id" in headers


def test_a_client_that_holds_this_version_gets_304() -> None:
    for value in (openapi.ETAG, b'"other", W/' + openapi.ETAG, b"*"):
        respond = answer(USER_SECRET, extra=((b"if-none-match", value),))
        assert (respond.status, respond.body) == (304, b"")
        assert dict(respond.headers)[b"etag"] == openapi.ETAG
    assert answer(USER_SECRET, extra=((b"if-none-match", b'"old"'),)).status == 200


def test_without_a_valid_key_it_is_401_and_other_methods_405() -> None:
    gw = gateway(TENANT)
    admission = gw.admits("GET", "/openapi.json", (), "192.0.2.1", WALL)
    assert admission.error is not None and admission.error.status == 401
    wrong = ((b"authorization", b"Bearer nope"),)
    admission = gw.admits("GET", "/openapi.json", wrong, "192.0.2.1", WALL)
    assert admission.error is not None and admission.error.status == 401
    for method in ("POST", "PUT", "DELETE"):
        admission = gw.admits(method, "/openapi.json", (), "192.0.2.1", WALL)
        assert admission.error is not None and admission.error.status == 405
    assert gw.admits("HEAD", "/openapi.json", (), "192.0.2.1", WALL).endpoint is Endpoint.OPENAPI
