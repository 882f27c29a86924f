"""``GET /openapi.json`` from the real server: any key reads it, no key is a 401; and
what the server answers on each path validates against the document's own schemas."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx2
import orjson
import pytest
from jsonschema import Draft202012Validator

from ostiary.protocol import openapi
from tests.e2e.conftest import HTTP_TIMEOUT, Launcher, ServerProcess

BACKENDS = """
[[roles]]
name = "narrow"
endpoints = ["chat.completions"]

[[backends]]
name = "scripted"
kind = "scripted"
models = ["scripted", "scripted-embed"]
embedding_models = ["scripted-embed"]
"""


@pytest.fixture(scope="module")
def server(launch_server: Launcher) -> ServerProcess:
    return launch_server("openapi", BACKENDS)


@pytest.fixture(scope="module")
def keys(server: ServerProcess) -> dict[str, str]:
    made = {"admin": server.key}
    for count, role in enumerate(("user", "narrow"), start=1):
        secret = server.cli("keys", "create", "--name", role, "--role", role).stdout.strip()
        server.secrets.append(secret)
        server.wait_for_log("reloaded API keys", count, 10.0)
        made[role] = secret
    return made


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=server.root_url, timeout=HTTP_TIMEOUT) as client:
        yield client


def auth(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


def test_without_a_valid_key_it_is_401(http: httpx2.Client) -> None:
    for headers in ({}, auth("sk-ostiary-nope")):
        response = http.get("/openapi.json", headers=headers)
        assert response.status_code == 401
        assert response.headers["x-request-id"]
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("role", ["admin", "user", "narrow"])
def test_every_role_reads_the_document(
    http: httpx2.Client, keys: dict[str, str], role: str
) -> None:
    response = http.get("/openapi.json", headers=auth(keys[role]))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.content == openapi.DOCUMENT
    assert response.headers["etag"] == openapi.ETAG.decode()
    assert response.json()["openapi"] == "3.1.0"


def test_head_304_and_other_methods(http: httpx2.Client, keys: dict[str, str]) -> None:
    head = http.head("/openapi.json", headers=auth(keys["user"]))
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(openapi.DOCUMENT))
    cached = http.get(
        "/openapi.json", headers={**auth(keys["user"]), "if-none-match": openapi.ETAG.decode()}
    )
    assert cached.status_code == 304 and cached.content == b""
    assert "content-length" not in cached.headers
    posted = http.post("/openapi.json", headers=auth(keys["user"]), content=b"{}")
    assert posted.status_code == 405
    assert posted.headers["allow"] == "GET, HEAD"


def validator(document: dict[str, Any], schema: dict[str, Any]) -> Draft202012Validator:
    return Draft202012Validator({**schema, "components": document["components"]})


def check(document: dict[str, Any], path: str, method: str, response: httpx2.Response) -> None:
    """The response is one the document lists for the path, with its headers, and
    its JSON body validates against the schema given."""
    answers = document["paths"][path][method]["responses"]
    answer = answers[str(response.status_code)]
    if "$ref" in answer:
        answer = document["components"]["responses"][answer["$ref"].rsplit("/", 1)[1]]
    assert "x-request-id" in answer["headers"] and response.headers["x-request-id"]
    media = response.headers["content-type"].split(";")[0]
    if media == "application/json":
        schema = answer["content"]["application/json"]["schema"]
        errors = list(validator(document, schema).iter_errors(response.json()))
        assert not errors, (path, response.status_code, errors[0].message)
    else:
        assert media in answer["content"], (path, media)


def test_what_the_server_answers_validates_against_the_document(
    http: httpx2.Client, keys: dict[str, str]
) -> None:
    document = http.get("/openapi.json", headers=auth(keys["user"])).json()
    user = auth(keys["user"])
    chat = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}]}
    post = "/v1/chat/completions"
    check(document, post, "post", http.post(post, headers=user, json=chat))
    check(document, post, "post", http.post(post, headers=user, json={"model": "scripted"}))
    check(document, post, "post", http.post(post, json=chat))
    prompt = {"model": "scripted", "prompt": "hi"}
    check(
        document, "/v1/completions", "post", http.post("/v1/completions", headers=user, json=prompt)
    )
    embed = {"model": "scripted-embed", "input": ["a", "b"]}
    check(document, "/v1/embeddings", "post", http.post("/v1/embeddings", headers=user, json=embed))
    embed["encoding_format"] = "base64"
    check(document, "/v1/embeddings", "post", http.post("/v1/embeddings", headers=user, json=embed))
    check(document, "/v1/models", "get", http.get("/v1/models", headers=user))
    check(document, "/v1/models/{model}", "get", http.get("/v1/models/scripted", headers=user))
    check(document, "/v1/models/{model}", "get", http.get("/v1/models/nope", headers=user))
    check(document, "/v1/queue", "get", http.get("/v1/queue", headers=user))
    admin = auth(keys["admin"])
    check(document, "/v1/queue", "get", http.get("/v1/queue", headers=admin))
    check(document, "/metrics", "get", http.get("/metrics", headers=admin))
    for path in ("/healthz", "/readyz", "/dashboard", "/dashboard.js", "/dashboard.css"):
        check(document, path, "get", http.get(path))
    narrow = auth(keys["narrow"])
    check(document, "/v1/models", "get", http.get("/v1/models", headers=narrow))


def test_streamed_chunks_validate_against_the_document(
    http: httpx2.Client, keys: dict[str, str]
) -> None:
    document = orjson.loads(openapi.DOCUMENT)
    schemas = document["components"]["schemas"]
    cases = (
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/completions", {"prompt": "hi"}),
    )
    for path, body in cases:
        content = document["paths"][path]["post"]["responses"]["200"]["content"]
        chunk = content["text/event-stream"]["x-ostiary-event"]["$ref"].rsplit("/", 1)[1]
        request = {"model": "scripted", "stream": True, **body}
        request["stream_options"] = {"include_usage": True}
        with http.stream("POST", path, headers=auth(keys["user"]), json=request) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = [line.removeprefix("data: ") for line in response.iter_lines() if line.strip()]
        assert events[-1] == "[DONE]"
        check_chunk = validator(document, schemas[chunk])
        for event in events[:-1]:
            errors = list(check_chunk.iter_errors(orjson.loads(event)))
            assert not errors, (path, event, errors[0].message)
