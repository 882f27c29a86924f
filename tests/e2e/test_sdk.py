"""The real server, driven by the official ``openai`` SDK, every body checked against
OpenAI's own OpenAPI spec.

Each SDK call runs with ``_strict_response_validation=True`` (the SDK's own pydantic
check) while the transport records the raw bytes, which are validated against the
spec schema (JSON bodies) or framed and validated chunk by chunk (SSE). Two SDK
calls cannot be strict against any server, OpenAI's included, and say why where
they are made.
"""

from __future__ import annotations

import base64
import math
import os
import re
import socket
import stat
import struct
import subprocess
import time
from typing import TYPE_CHECKING, Any

import httpx2
import openai
import orjson
import pytest

from ostiary.backends.scripted import ScriptedSettings
from tests.e2e.conftest import STOP_TIMEOUT

if TYPE_CHECKING:
    from tests.e2e.conftest import Api, ServerProcess
    from tests.e2e.spec import OpenAPI

SCRIPT = ScriptedSettings()
REPLY = SCRIPT.reply
MODEL = "scripted"
EMBED_MODEL = "scripted-embed"
MESSAGES: list[Any] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Say hello to the tests"},
]
PROMPT_WORDS = 2 + 5
RELOADED = "reloaded API keys"
SECRET = re.compile(r"ost_[0-9a-f]{12}_[A-Za-z0-9_\-]{43,}")
#: A hang guard for a key change to reach the server (what it must take, at most one
#: poll interval, is proven in virtual time by tests/runtime/test_config_keys_cli.py).
KEY_RELOAD_GUARD = 30.0


def _pieces(text: str, count: int) -> list[str]:
    size, extra = divmod(len(text), count)
    out, start = [], 0
    for i in range(count):
        end = start + size + (1 if i < extra else 0)
        out.append(text[start:end])
        start = end
    return out


# -- chat completions ---------------------------------------------------------------------


def test_chat_completion(scripted_api: Api) -> None:
    completion = scripted_api.client.chat.completions.create(model=MODEL, messages=MESSAGES)
    body = scripted_api.json("CreateChatCompletionResponse")

    assert completion.object == "chat.completion"
    assert completion.id == body["id"] and completion.id.startswith("chatcmpl-")
    assert completion.model == MODEL
    assert len(completion.choices) == 1
    choice = completion.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content == REPLY
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == PROMPT_WORDS
    assert completion.usage.completion_tokens == SCRIPT.chunks
    assert completion.usage.total_tokens == PROMPT_WORDS + SCRIPT.chunks


def test_chat_completion_n_and_max_tokens(scripted_api: Api) -> None:
    completion = scripted_api.client.chat.completions.create(
        model=MODEL, messages=MESSAGES, n=2, max_tokens=3
    )
    scripted_api.json("CreateChatCompletionResponse")
    expected = "".join(_pieces(REPLY, SCRIPT.chunks)[:3])
    assert [c.index for c in completion.choices] == [0, 1]
    for choice in completion.choices:
        assert choice.message.content == expected
        assert choice.finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 3 * 2


@pytest.mark.parametrize("include_usage", [False, True], ids=["plain", "include_usage"])
def test_chat_completion_stream(scripted_api: Api, include_usage: bool) -> None:
    options: Any = {"stream_options": {"include_usage": True}} if include_usage else {}
    stream = scripted_api.client.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, **options
    )
    parsed = list(stream)
    chunks = scripted_api.sse("CreateChatCompletionStreamResponse")

    assert len(parsed) == len(chunks)
    assert {c.id for c in parsed} == {chunks[0]["id"]}
    assert chunks[0]["id"].startswith("chatcmpl-")
    assert {c["created"] for c in chunks} == {chunks[0]["created"]}
    assert all(c.object == "chat.completion.chunk" and c.model == MODEL for c in parsed)
    content = [c for c in parsed if c.choices]
    assert content[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in content) == REPLY
    assert [c.choices[0].finish_reason for c in content] == [None] * (len(content) - 1) + ["stop"]
    if include_usage:
        *head, last = chunks
        assert last["choices"] == []
        assert last["usage"] == {
            "prompt_tokens": PROMPT_WORDS,
            "completion_tokens": SCRIPT.chunks,
            "total_tokens": PROMPT_WORDS + SCRIPT.chunks,
        }
        # OpenAI: "All other chunks will also include a usage field, but with a null value."
        assert all("usage" in c and c["usage"] is None for c in head)
    else:
        assert all(c.get("usage") is None for c in chunks)
        assert all(c["choices"] for c in chunks)


def test_stop_cuts_stream_and_non_stream_alike(scripted_api: Api) -> None:
    """A stop sequence spanning two tokens ("fro" + "m Ostiary" hold "from O") is
    cut out of both forms the same way (issue 7, item 15)."""
    stop = REPLY[REPLY.index("from O") : REPLY.index("from O") + 6]
    whole = scripted_api.client.chat.completions.create(model=MODEL, messages=MESSAGES, stop=stop)
    scripted_api.json("CreateChatCompletionResponse")
    stream = scripted_api.client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        stop=[stop, "never there"],
        stream=True,
        stream_options={"include_usage": True},
    )
    parsed = list(stream)
    scripted_api.sse("CreateChatCompletionStreamResponse")
    content = [c for c in parsed if c.choices]
    assert whole.choices[0].message.content == "Hello "
    assert "".join(c.choices[0].delta.content or "" for c in content) == "Hello "
    assert whole.choices[0].finish_reason == content[-1].choices[0].finish_reason == "stop"
    assert whole.usage is not None and parsed[-1].usage is not None
    assert whole.usage.completion_tokens == parsed[-1].usage.completion_tokens == 2


def test_sse_stream_read_to_its_end(scripted_api: Api) -> None:
    """The SDK stops reading at ``[DONE]``; read one stream whole to see the end."""
    with scripted_api.http.stream(
        "POST",
        "/chat/completions",
        json={"model": MODEL, "messages": MESSAGES, "stream": True},
        headers={"authorization": f"Bearer {scripted_api.server.key}"},
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers.get("cache-control") == "no-cache"
        response.read()
    assert scripted_api.last.complete
    chunks = scripted_api.sse("CreateChatCompletionStreamResponse")
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == REPLY


# -- completions --------------------------------------------------------------------------


def test_completion(scripted_api: Api) -> None:
    completion = scripted_api.client.completions.create(model=MODEL, prompt="Say hello please")
    body = scripted_api.json("CreateCompletionResponse")

    assert completion.object == "text_completion"
    assert completion.id == body["id"] and completion.id.startswith("cmpl-")
    assert completion.model == MODEL
    assert [c.text for c in completion.choices] == [REPLY]
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 3
    assert completion.usage.completion_tokens == SCRIPT.chunks


def test_completion_batch_prompts(scripted_api: Api) -> None:
    completion = scripted_api.client.completions.create(
        model=MODEL, prompt=["one", "two words"], max_tokens=2
    )
    scripted_api.json("CreateCompletionResponse")
    expected = "".join(_pieces(REPLY, SCRIPT.chunks)[:2])
    assert [(c.index, c.text, c.finish_reason) for c in completion.choices] == [
        (0, expected, "length"),
        (1, expected, "length"),
    ]


@pytest.mark.parametrize("include_usage", [False, True], ids=["plain", "include_usage"])
def test_completion_stream(scripted_api: Api, include_usage: bool) -> None:
    # Not strict: the SDK types a completion choice's finish_reason as a non-null
    # Literal, so strict validation rejects every streamed chunk before the last,
    # OpenAI's own included. The raw chunks are still checked against the spec.
    client = scripted_api.sdk(scripted_api.server.key, strict=False)
    options: Any = {"stream_options": {"include_usage": True}} if include_usage else {}
    parsed = list(
        client.completions.create(model=MODEL, prompt="Say hello please", stream=True, **options)
    )
    chunks = scripted_api.sse(scripted_api.spec.COMPLETION_CHUNK)

    assert len(parsed) == len(chunks)
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    assert chunks[0]["id"].startswith("cmpl-")
    assert all(c["object"] == "text_completion" and c["model"] == MODEL for c in chunks)
    content = [c for c in chunks if c["choices"]]
    assert "".join(c["choices"][0]["text"] for c in content) == REPLY
    assert [c["choices"][0]["finish_reason"] for c in content] == [None] * (len(content) - 1) + [
        "stop"
    ]
    if include_usage:
        assert chunks[-1]["choices"] == []
        assert chunks[-1]["usage"] == {
            "prompt_tokens": 3,
            "completion_tokens": SCRIPT.chunks,
            "total_tokens": 3 + SCRIPT.chunks,
        }
    else:
        assert all(c["choices"] for c in chunks)


# -- embeddings ---------------------------------------------------------------------------

INPUTS = ["hello world", "a second input"]


def _float_embeddings(api: Api) -> list[list[float]]:
    result = api.client.embeddings.create(model=EMBED_MODEL, input=INPUTS, encoding_format="float")
    body = api.json("CreateEmbeddingResponse")
    assert result.object == "list" and result.model == EMBED_MODEL
    assert [d.index for d in result.data] == [0, 1]
    assert result.usage.prompt_tokens == 2 + 3
    assert result.usage.total_tokens == 2 + 3
    vectors = [d.embedding for d in result.data]
    assert vectors == [d["embedding"] for d in body["data"]]
    return vectors


def test_embeddings_float(scripted_api: Api) -> None:
    vectors = _float_embeddings(scripted_api)
    for vector in vectors:
        assert len(vector) == SCRIPT.embedding_dimensions
        assert math.isclose(math.fsum(v * v for v in vector), 1.0, rel_tol=1e-9)
    assert vectors[0] != vectors[1]


def _as_float32(vector: list[float]) -> list[float]:
    return list(struct.unpack(f"<{len(vector)}f", struct.pack(f"<{len(vector)}f", *vector)))


def test_embeddings_base64_decoded_by_the_sdk(scripted_api: Api) -> None:
    floats = _float_embeddings(scripted_api)
    # Not strict: with no encoding_format the SDK asks for base64 and decodes it
    # itself, but validates the body (a string where its type says list[float])
    # before decoding, so strict mode rejects every base64 answer, OpenAI's own too.
    client = scripted_api.sdk(scripted_api.server.key, strict=False)
    result = client.embeddings.create(model=EMBED_MODEL, input=INPUTS)
    assert orjson.loads(scripted_api.last.request_body)["encoding_format"] == "base64"
    body = scripted_api.raw_json()
    spec = scripted_api.spec
    spec.assert_valid("CreateEmbeddingResponse", spec.decode_base64_embeddings(body))
    assert all(isinstance(d["embedding"], str) for d in body["data"])
    assert [list(d.embedding) for d in result.data] == [_as_float32(v) for v in floats]


def test_embeddings_base64_raw(scripted_api: Api) -> None:
    floats = _float_embeddings(scripted_api)
    client = scripted_api.sdk(scripted_api.server.key, strict=False)
    result = client.embeddings.create(model=EMBED_MODEL, input=INPUTS, encoding_format="base64")
    strings = [d.embedding for d in result.data]
    assert all(isinstance(s, str) for s in strings)
    decoded = [
        list(struct.unpack(f"<{SCRIPT.embedding_dimensions}f", base64.b64decode(str(s))))
        for s in strings
    ]
    assert decoded == [_as_float32(v) for v in floats]


def test_embeddings_dimensions(scripted_api: Api) -> None:
    result = scripted_api.client.embeddings.create(
        model=EMBED_MODEL, input="hello", encoding_format="float", dimensions=8
    )
    scripted_api.json("CreateEmbeddingResponse")
    assert len(result.data) == 1 and len(result.data[0].embedding) == 8


# -- models -------------------------------------------------------------------------------


def test_models_list(scripted_api: Api) -> None:
    models = scripted_api.client.models.list()
    body = scripted_api.json("ListModelsResponse")
    assert body["object"] == "list"
    assert [m.id for m in models.data] == [MODEL, EMBED_MODEL]
    assert models.data[0].object == "model"
    assert models.data[0].owned_by


def test_models_retrieve(scripted_api: Api) -> None:
    model = scripted_api.client.models.retrieve(MODEL)
    scripted_api.json("Model")
    assert model.id == MODEL and model.object == "model"
    assert isinstance(model.created, int) and model.created > 0


def test_models_retrieve_unknown(scripted_api: Api) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        scripted_api.client.models.retrieve("no-such-model")
    error = scripted_api.error(404)
    assert error["code"] == "model_not_found"
    assert raised.value.code == "model_not_found"


# -- errors -------------------------------------------------------------------------------


def test_no_api_key(scripted_api: Api) -> None:
    with pytest.raises(openai.AuthenticationError) as raised:
        scripted_api.client.models.list(extra_headers={"Authorization": openai.omit})
    assert "authorization" not in scripted_api.last.request_headers
    error = scripted_api.error(401)
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "missing_api_key"
    assert raised.value.status_code == 401
    assert scripted_api.last.headers.get("www-authenticate", "").lower().startswith("bearer")


@pytest.mark.parametrize(
    "key",
    [
        "ost_0123456789ab_" + "A" * 43,  # well-formed, unknown
        "sk-not-an-ostiary-key",
        "ost_",
    ],
    ids=["unknown", "foreign", "truncated"],
)
def test_bad_api_key(scripted_api: Api, key: str) -> None:
    client = scripted_api.sdk(key)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=MODEL, messages=MESSAGES)
    error = scripted_api.error(401)
    assert error["code"] == "invalid_api_key"
    assert key not in error["message"] or len(key) <= 12


def test_forged_token_for_a_real_key_id(scripted_api: Api) -> None:
    # The admin key's id with a wrong token must not authenticate.
    key = scripted_api.server.key
    forged = key[: len("ost_") + 12 + 1] + "B" * 43
    with pytest.raises(openai.AuthenticationError):
        scripted_api.sdk(forged).models.list()
    scripted_api.error(401)


def test_malformed_json(scripted_api: Api) -> None:
    response = scripted_api.http.post(
        "/chat/completions",
        content=b'{"model": "scripted", "messages": [',
        headers={
            "authorization": f"Bearer {scripted_api.server.key}",
            "content-type": "application/json",
        },
    )
    assert response.status_code == 400
    error = scripted_api.error(400)
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_json"


def test_unknown_model(scripted_api: Api) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        scripted_api.client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    error = scripted_api.error(404)
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"
    assert "no-such-model" in error["message"]
    assert raised.value.code == "model_not_found"


def test_unknown_model_stream(scripted_api: Api) -> None:
    with pytest.raises(openai.NotFoundError):
        scripted_api.client.chat.completions.create(
            model="no-such-model", messages=MESSAGES, stream=True
        )
    assert scripted_api.error(404)["code"] == "model_not_found"


def test_unknown_field(scripted_api: Api) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        scripted_api.client.chat.completions.create(
            model=MODEL, messages=MESSAGES, extra_body={"frobnicate": True}
        )
    error = scripted_api.error(400)
    assert error["param"] == "frobnicate"
    assert "frobnicate" in error["message"]
    assert raised.value.param == "frobnicate"


def test_invalid_value(scripted_api: Api) -> None:
    with pytest.raises(openai.BadRequestError):
        scripted_api.client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=7.0)
    error = scripted_api.error(400)
    assert error["param"] == "temperature"


@pytest.mark.parametrize(
    "logit_bias",
    [{"a[b": "x"}, {"[x]": "y"}, {"a[1]": "x"}, {"50256": "x"}],
    ids=["open-bracket", "bracketed", "index-like", "plain"],
)
def test_wrong_type_under_an_awkward_key(scripted_api: Api, logit_bias: dict[str, str]) -> None:
    """A wrong-typed value under a key holding ``[`` is the client's error (400), not
    ours: the error path ``logit_bias.a[b`` must not be parsed as an index.
    (Found by fuzz/fuzz_decode.py; regression seed in fuzz/corpus/decode.)"""
    with pytest.raises(openai.BadRequestError):
        scripted_api.client.chat.completions.create(
            model=MODEL, messages=MESSAGES, extra_body={"logit_bias": logit_bias}
        )
    error = scripted_api.error(400)
    assert error["code"] == "invalid_type"
    assert error["param"] == "logit_bias." + next(iter(logit_bias))
    assert "got a string" in error["message"], error["message"]


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/v1/nowhere", 404), ("DELETE", "/v1/models", 405), ("GET", "/v1/completions", 405)],
)
def test_routing_errors(scripted_api: Api, method: str, path: str, status: int) -> None:
    scripted_api.http.request(
        method,
        scripted_api.server.root_url + path,
        headers={"authorization": f"Bearer {scripted_api.server.key}"},
    )
    scripted_api.error(status)


def test_health(scripted_api: Api) -> None:
    response = scripted_api.http.get(scripted_api.server.root_url + "/healthz")
    assert response.status_code == 200
    scripted_api.check_common(scripted_api.last)
    ready = scripted_api.http.get(scripted_api.server.root_url + "/readyz")
    assert ready.status_code == 200
    scripted_api.check_common(scripted_api.last)


def test_request_ids_are_unique(scripted_api: Api) -> None:
    ids = set()
    for _ in range(5):
        scripted_api.client.models.list()
        ids.add(scripted_api.last.headers["x-request-id"])
    assert len(ids) == 5


def _raw_exchange(server: ServerProcess, data: bytes) -> bytes:
    """Send raw bytes, read until the server closes (bounded by socket timeouts)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(data)
        received = bytearray()
        while chunk := sock.recv(65536):
            received += chunk
    return bytes(received)


def _head_and_body(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


@pytest.mark.parametrize(
    ("request_head", "status"),
    [
        (b"content-length: 99999999\r\n", 413),
        (b"content-length: 5\r\ntransfer-encoding: chunked\r\n", 400),
        (b"no colon here\r\n", 400),
    ],
    ids=["body-too-large", "length-and-chunked", "malformed-header"],
)
def test_http_level_rejections_are_openai_errors(
    scripted_server: ServerProcess, openapi: OpenAPI, request_head: bytes, status: int
) -> None:
    """Requests refused before the gateway sees them still get the contract: an OpenAI
    error body and an ``x-request-id`` ("Every response carries x-request-id")."""
    raw = _raw_exchange(
        scripted_server,
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        b"authorization: Bearer " + scripted_server.key.encode() + b"\r\n"
        b"content-type: application/json\r\n" + request_head + b"\r\n",
    )
    got, headers, body = _head_and_body(raw)
    assert got == status
    openapi.assert_valid("ErrorResponse", orjson.loads(body))
    assert headers.get("x-request-id"), f"no x-request-id on a {status}: {raw[:400]!r}"


def test_head_request_keeps_the_server_alive(private_server: ServerProcess) -> None:
    """``HEAD`` is routed like ``GET`` (gateway.route allows it); answering it must not
    take the server down."""
    with httpx2.Client(base_url=private_server.root_url, timeout=10) as http:
        try:
            response = http.head("/healthz")
        except httpx2.HTTPError as exc:
            try:
                code = private_server.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                fate = "the server is still running"
            else:
                fate = f"the server exited with status {code}"
            tail = private_server.log_text()[-2000:]
            raise AssertionError(
                f"HEAD /healthz got no response ({type(exc).__name__}: {exc}); {fate}; "
                f"log tail:\n{tail}"
            ) from None
        assert response.status_code == 200
        assert response.content == b""
        assert response.headers.get("x-request-id")
        assert http.get("/healthz").status_code == 200
        assert private_server.process.poll() is None


# -- keys ---------------------------------------------------------------------------------


def _status_with(api: Api, key: str) -> int:
    return api.http.get("/models", headers={"authorization": f"Bearer {key}"}).status_code


def _change_keys(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``ostiary keys <args>`` and return once the server has reloaded its keys
    (its next ``reloaded API keys`` record, logged after the new table is in place),
    checking that the reloaded table holds as many keys as the store lists active."""
    reloads = len(server.log_records(RELOADED))
    result = server.cli("keys", *args)
    record = server.wait_for_log(RELOADED, reloads + 1, KEY_RELOAD_GUARD)
    active = [row for row in server.cli("keys", "list").stdout.splitlines() if "\tactive" in row]
    assert record["active_keys"] == len(active), (record, active)
    return result


def test_key_lifecycle(scripted_api: Api) -> None:
    server = scripted_api.server
    created = _change_keys(server, "create", "--name", "e2e-user", "--role", "user")
    secret = created.stdout.strip()
    server.secrets.append(secret)
    assert created.stdout == secret + "\n", "keys create must print the secret and only that"
    assert SECRET.fullmatch(secret), secret
    key_id = secret[len("ost_") : len("ost_") + 12]
    assert secret not in created.stderr

    assert _status_with(scripted_api, secret) == 200
    sdk = scripted_api.sdk(secret)
    assert [m.id for m in sdk.models.list().data] == [MODEL, EMBED_MODEL]
    reply = sdk.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert reply.choices[0].message.content == REPLY

    listing = server.cli("keys", "list").stdout
    rows = [line.split("\t") for line in listing.splitlines()]
    assert [key_id, "e2e-user", "user", "active"] in rows
    assert not SECRET.search(listing), "keys list printed a secret"
    token = secret[len("ost_") + 13 :]  # after the id; the token itself may hold "_"
    assert token not in listing
    assert server.key[len("ost_") + 13 :] not in listing

    _change_keys(server, "revoke", key_id)
    assert _status_with(scripted_api, secret) == 401
    with pytest.raises(openai.AuthenticationError):
        sdk.models.list()
    scripted_api.error(401)
    rows = [line.split("\t") for line in server.cli("keys", "list").stdout.splitlines()]
    assert [key_id, "e2e-user", "user", "revoked"] in rows

    # The admin key is untouched by all this.
    assert _status_with(scripted_api, server.key) == 200


def test_revoke_unknown_key_fails_cleanly(scripted_server: ServerProcess) -> None:
    result = scripted_server.cli("keys", "revoke", "ffffffffffff", check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("ostiary: ")
    assert "Traceback" not in result.stderr


def test_admin_key_file_mode(scripted_server: ServerProcess) -> None:
    path = scripted_server.state_dir / "admin.key"
    mode = stat.S_IMODE(os.stat(path).st_mode)
    assert mode == 0o600, oct(mode)
    assert SECRET.fullmatch(path.read_text(encoding="ascii").strip())


def test_log_never_contains_a_key(scripted_api: Api) -> None:
    """Runs last in this module: by now the server has seen the admin key, a created
    key, a revoked one and forged ones on every endpoint."""
    server = scripted_api.server
    # Access-log lines reach stderr in batches, a moment after their requests.
    deadline = time.monotonic() + 5.0
    while True:
        log = server.log_text()
        whole = [line for line in log.splitlines() if line.startswith("{") and line.endswith("}")]
        lines = [orjson.loads(line) for line in whole]
        if any(line.get("msg") == "request" for line in lines):
            break
        assert time.monotonic() < deadline, "no access log records"
        server.pause()
    assert "admin.key" in log, "the bootstrap key's path should be logged"
    for secret in server.secrets:
        assert secret not in log
        assert secret[len("ost_") + 13 :] not in log  # the token after the id
    assert not SECRET.search(log)
    assert "A" * 43 not in log and "B" * 43 not in log
