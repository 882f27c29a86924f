"""The ``openai`` backend kind, end to end: one Ostiary (the relay) whose backends
point at a second Ostiary process (the upstream, scripted backend), both real
processes, driven by the official SDK with every body checked against the spec.

The relay serves ``relay`` (mapped to the upstream's ``scripted``) with the
upstream's admin key from ``$UPSTREAM_KEY``; ``badkey`` (the same upstream with a
wrong key) and ``down`` (a loopback port that refuses connections) exercise the failures.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import openai
import pytest

from ostiary.backends.scripted import ScriptedSettings
from tests.e2e.conftest import SCRIPTED_BACKEND, Api

if TYPE_CHECKING:
    from tests.e2e.conftest import Launcher, ServerProcess
    from tests.e2e.spec import OpenAPI

SCRIPT = ScriptedSettings()
REPLY = SCRIPT.reply
MODEL = "relay"
EMBED_MODEL = "relay-embed"
MESSAGES: list[Any] = [{"role": "user", "content": "Say hello to the relay"}]
PROMPT_WORDS = 5
INPUTS = ["hello world", "a second input"]


def _relay_backends(upstream_port: int, closed_port: int) -> str:
    def table(name: str, port: int, key_env: str) -> str:
        return (
            "[[backends]]\n"
            f'name = "{name}"\n'
            'kind = "openai"\n'
            f'models = ["{name}", "{name}-embed"]\n'
            f'embedding_models = ["{name}-embed"]\n'
            f'base_url = "http://127.0.0.1:{port}/v1"\n'
            f'api_key_env = "{key_env}"\n'
            "connect_timeout = 2.0\n"
            "read_timeout = 10.0\n"
            f'upstream_models = {{ {name} = "scripted", {name}-embed = "scripted-embed" }}\n'
        )

    return (
        table("relay", upstream_port, "UPSTREAM_KEY")
        + table("badkey", upstream_port, "WRONG_UPSTREAM_KEY")
        + table("down", closed_port, "UPSTREAM_KEY")
    )


@pytest.fixture(scope="module")
def upstream(launch_server: Launcher) -> ServerProcess:
    return launch_server("upstream", SCRIPTED_BACKEND)


@pytest.fixture(scope="module")
def relay(launch_server: Launcher, upstream: ServerProcess, closed_port: int) -> ServerProcess:
    wrong = "ost_" + upstream.key[4:16] + "_" + "W" * 43
    server = launch_server(
        "relay",
        _relay_backends(upstream.port, closed_port),
        env={"UPSTREAM_KEY": upstream.key, "WRONG_UPSTREAM_KEY": wrong},
    )
    # The relay holds the upstream's key: it must never log it either.
    server.secrets.append(upstream.key)
    return server


@pytest.fixture(scope="module")
def relay_api(relay: ServerProcess, openapi: OpenAPI) -> Iterator[Api]:
    api = Api(relay, openapi)
    yield api
    api.close()


# -- chat ---------------------------------------------------------------------------------


def test_chat_completion(relay_api: Api) -> None:
    completion = relay_api.client.chat.completions.create(model=MODEL, messages=MESSAGES)
    relay_api.json("CreateChatCompletionResponse")
    assert completion.model == MODEL, "the relay must answer with its own model id"
    assert completion.id.startswith("chatcmpl-")
    assert [c.message.content for c in completion.choices] == [REPLY]
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == PROMPT_WORDS
    assert completion.usage.completion_tokens == SCRIPT.chunks


@pytest.mark.parametrize("include_usage", [False, True], ids=["plain", "include_usage"])
def test_chat_completion_stream(relay_api: Api, include_usage: bool) -> None:
    options: Any = {"stream_options": {"include_usage": True}} if include_usage else {}
    parsed = list(
        relay_api.client.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, **options
        )
    )
    chunks = relay_api.sse("CreateChatCompletionStreamResponse")
    assert len(parsed) == len(chunks)
    assert {c.model for c in parsed} == {MODEL}
    content = [c for c in parsed if c.choices]
    assert content[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in content) == REPLY
    assert content[-1].choices[0].finish_reason == "stop"
    if include_usage:
        assert chunks[-1]["choices"] == []
        assert chunks[-1]["usage"]["prompt_tokens"] == PROMPT_WORDS
        assert chunks[-1]["usage"]["completion_tokens"] == SCRIPT.chunks
    else:
        assert all(c.get("usage") is None for c in chunks)


# -- completions --------------------------------------------------------------------------


def test_completion(relay_api: Api) -> None:
    completion = relay_api.client.completions.create(model=MODEL, prompt="Say hello please")
    relay_api.json("CreateCompletionResponse")
    assert completion.model == MODEL
    assert [c.text for c in completion.choices] == [REPLY]
    assert completion.usage is not None
    assert completion.usage.completion_tokens == SCRIPT.chunks


@pytest.mark.parametrize("include_usage", [False, True], ids=["plain", "include_usage"])
def test_completion_stream(relay_api: Api, include_usage: bool) -> None:
    # Not strict, for the SDK's reason given in test_sdk.test_completion_stream.
    client = relay_api.sdk(relay_api.server.key, strict=False)
    options: Any = {"stream_options": {"include_usage": True}} if include_usage else {}
    parsed = list(
        client.completions.create(model=MODEL, prompt="Say hello please", stream=True, **options)
    )
    chunks = relay_api.sse(relay_api.spec.COMPLETION_CHUNK)
    assert len(parsed) == len(chunks)
    assert {c["model"] for c in chunks} == {MODEL}
    content = [c for c in chunks if c["choices"]]
    assert "".join(c["choices"][0]["text"] for c in content) == REPLY
    assert content[-1]["choices"][0]["finish_reason"] == "stop"
    if include_usage:
        assert chunks[-1]["choices"] == []
        assert chunks[-1]["usage"]["completion_tokens"] == SCRIPT.chunks


# -- embeddings ---------------------------------------------------------------------------


def _direct_floats(upstream: ServerProcess, openapi: OpenAPI) -> list[list[float]]:
    api = Api(upstream, openapi)
    try:
        result = api.client.embeddings.create(
            model="scripted-embed", input=INPUTS, encoding_format="float"
        )
    finally:
        api.close()
    return [d.embedding for d in result.data]


def test_embeddings_float(relay_api: Api, upstream: ServerProcess) -> None:
    result = relay_api.client.embeddings.create(
        model=EMBED_MODEL, input=INPUTS, encoding_format="float"
    )
    relay_api.json("CreateEmbeddingResponse")
    assert result.model == EMBED_MODEL
    vectors = [d.embedding for d in result.data]
    assert [len(v) for v in vectors] == [SCRIPT.embedding_dimensions] * 2
    assert all(math.isclose(math.fsum(x * x for x in v), 1.0, rel_tol=1e-6) for v in vectors)
    assert vectors == _direct_floats(upstream, relay_api.spec)


def test_embeddings_base64(relay_api: Api, upstream: ServerProcess) -> None:
    # Not strict, for the SDK's reason given in test_sdk: the SDK asks for base64.
    client = relay_api.sdk(relay_api.server.key, strict=False)
    result = client.embeddings.create(model=EMBED_MODEL, input=INPUTS)
    body = relay_api.raw_json()
    spec = relay_api.spec
    spec.assert_valid("CreateEmbeddingResponse", spec.decode_base64_embeddings(body))
    expected = [
        list(struct.unpack(f"<{len(v)}f", struct.pack(f"<{len(v)}f", *v)))
        for v in _direct_floats(upstream, spec)
    ]
    assert [list(d.embedding) for d in result.data] == expected


def test_upstream_validation_error_is_passed_on(relay_api: Api) -> None:
    """The scripted upstream refuses more dimensions than it has: a 400 about the
    client's own request, which the relay passes on as such."""
    with pytest.raises(openai.BadRequestError):
        relay_api.client.embeddings.create(
            model=EMBED_MODEL, input="hi", encoding_format="float", dimensions=1000
        )
    error = relay_api.error(400)
    assert error["param"] == "dimensions"
    assert "384" in error["message"], "the upstream's own reason is passed on"


# -- models -------------------------------------------------------------------------------


def test_models(relay_api: Api) -> None:
    listed = relay_api.client.models.list()
    relay_api.json("ListModelsResponse")
    assert sorted(m.id for m in listed.data) == [
        "badkey",
        "badkey-embed",
        "down",
        "down-embed",
        "relay",
        "relay-embed",
    ]
    model = relay_api.client.models.retrieve(MODEL)
    relay_api.json("Model")
    assert model.id == MODEL


# -- failures -----------------------------------------------------------------------------


def _check_upstream_failure(api: Api, raised: openai.APIStatusError) -> dict[str, Any]:
    status = raised.status_code
    assert status in (502, 503), status
    error = api.error(status)
    assert error["type"] == "server_error"
    if status == 503:
        assert api.last.headers.get("retry-after")
        assert api.last.headers.get("retry-after-ms")
    return error


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_upstream_down_chat(relay_api: Api, stream: bool) -> None:
    with pytest.raises(openai.InternalServerError) as raised:
        relay_api.client.chat.completions.create(model="down", messages=MESSAGES, stream=stream)
    error = _check_upstream_failure(relay_api, raised.value)
    assert "127.0.0.1" not in error["message"], "upstream addresses are not for clients"


def test_upstream_down_completion_and_embeddings(relay_api: Api) -> None:
    with pytest.raises(openai.InternalServerError) as raised:
        relay_api.client.completions.create(model="down", prompt="hi")
    _check_upstream_failure(relay_api, raised.value)
    with pytest.raises(openai.InternalServerError) as raised:
        relay_api.client.embeddings.create(model="down-embed", input="hi", encoding_format="float")
    _check_upstream_failure(relay_api, raised.value)


def test_upstream_rejects_our_key(relay_api: Api) -> None:
    """The upstream's 401 is our misconfiguration, not the client's: a 502, and
    not an AuthenticationError that would blame the client's key."""
    with pytest.raises(openai.InternalServerError) as raised:
        relay_api.client.chat.completions.create(model="badkey", messages=MESSAGES)
    assert raised.value.status_code == 502
    relay_api.error(502)


def test_readyz_names_the_unavailable_backend(relay_api: Api) -> None:
    response = relay_api.http.get(relay_api.server.root_url + "/readyz")
    relay_api.check_common(relay_api.last)
    assert response.status_code == 503
    assert response.json()["status"] == "unavailable"
    backends = response.json()["backends"]
    assert "down" in backends
    assert "relay" not in backends
    assert set(backends.values()) == {"unavailable"}  # never the upstream's error text
    assert int(response.headers["retry-after"]) >= 1
    assert int(response.headers["retry-after-ms"]) >= 1


def test_relay_still_serves_after_failures(relay_api: Api) -> None:
    completion = relay_api.client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert completion.choices[0].message.content == REPLY
