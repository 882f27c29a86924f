"""The zero-config default, as a new user meets it: ``ostiary serve`` with no config
file serves SmolLM2 and multilingual-e5-small, and the official SDK gets real text and
real 384-dimensional embeddings with the key from ``.ostiary/admin.key``."""

from __future__ import annotations

import base64
import math
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema_rs
import openai
import orjson
import pytest

from tests.e2e import spec
from tests.e2e.conftest import Api, ServerProcess

CHAT_MODEL = "smollm2-135m-instruct"
EMBED_MODEL = "multilingual-e5-small"


@pytest.fixture(scope="module")
def default_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    workdir = tmp_path_factory.mktemp("newcomer")
    stderr_path = workdir / "stderr.log"
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "ostiary.runtime.cli", "serve", "--port", "0"],
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    state = workdir / ".ostiary"
    server = ServerProcess(
        "default", process, workdir, workdir / "none.toml", state, stderr_path, {}
    )
    try:
        server.wait_until_listening(timeout=120)
        server.key = (state / "admin.key").read_text(encoding="ascii").strip()
        yield server
    finally:
        assert server.stop() == 0
        assert server.key not in server.log_text()


@pytest.fixture(scope="module")
def api(default_server: ServerProcess, openapi: spec.OpenAPI) -> Iterator[Api]:
    # A real model on a shared 2-core machine: generous, but bounded.
    client = Api(default_server, openapi, timeout=120)
    yield client
    client.close()


def test_models_lists_both(api: Api) -> None:
    ids = {m.id for m in api.client.models.list()}
    assert ids == {CHAT_MODEL, EMBED_MODEL}
    api.json("ListModelsResponse")


def test_chat_gives_real_text(api: Api) -> None:
    result = api.client.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        temperature=0,
    )
    body = api.json("CreateChatCompletionResponse")
    text = result.choices[0].message.content or ""
    assert len(text.split()) >= 2
    assert result.usage is not None
    assert 0 < result.usage.completion_tokens <= 24
    assert result.usage.prompt_tokens > 5
    assert body["choices"][0]["finish_reason"] in ("stop", "length")


def test_chat_stream_gives_real_text(api: Api) -> None:
    stream = api.client.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "Count from one to five."}],
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces = []
    usage = None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage is not None:
            usage = chunk.usage
    chunks = api.sse("CreateChatCompletionStreamResponse")
    assert len(chunks) > 3
    assert "".join(pieces).strip()
    assert usage is not None and 0 < usage.completion_tokens <= 20


def test_completion_gives_real_text(api: Api) -> None:
    result = api.client.completions.create(
        model=CHAT_MODEL, prompt="The quick brown fox", max_tokens=12, temperature=0
    )
    api.json("CreateCompletionResponse")
    assert result.choices[0].text.strip()
    assert result.usage is not None and result.usage.completion_tokens <= 12


def test_embeddings_are_384_dimensional_and_meaningful(api: Api) -> None:
    result = api.client.embeddings.create(
        model=EMBED_MODEL,
        input=["a cat sits on the mat", "a kitten rests on a rug", "quarterly tax filing"],
        encoding_format="float",
    )
    api.json("CreateEmbeddingResponse")
    vectors = [d.embedding for d in result.data]
    assert [len(v) for v in vectors] == [384, 384, 384]

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(
            sum(x * x for x in a) * sum(y * y for y in b)
        )

    assert cos(vectors[0], vectors[1]) > cos(vectors[0], vectors[2])
    api.sdk(api.server.key, strict=False).embeddings.create(
        model=EMBED_MODEL, input="a cat sits on the mat", encoding_format="base64"
    )
    encoded = api.raw_json()["data"][0]["embedding"]
    decoded = struct.unpack("<384f", base64.b64decode(encoded))
    assert all(abs(x - y) < 1e-6 for x, y in zip(decoded, vectors[0], strict=True))


def test_wrong_endpoint_for_model_is_a_clear_400(api: Api) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        api.client.embeddings.create(model=CHAT_MODEL, input="x")
    assert api.error(400)["param"] == "model"
    assert "model" in str(info.value)


def test_state_lives_in_the_working_directory(default_server: ServerProcess) -> None:
    key_file: Path = default_server.state_dir / "admin.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert (default_server.state_dir / "keys.sqlite3").exists()


def test_token_id_input_is_embedded_as_its_text(api: Api) -> None:
    """LangChain's OpenAIEmbeddings sends cl100k ids by default: 15339, 1917 is
    "hello world", and must embed exactly as that text does."""
    by_ids = api.client.embeddings.create(
        model=EMBED_MODEL, input=[[15339, 1917]], encoding_format="float"
    )
    api.json("CreateEmbeddingResponse")
    by_text = api.client.embeddings.create(
        model=EMBED_MODEL, input="hello world", encoding_format="float"
    )
    assert by_ids.data[0].embedding == by_text.data[0].embedding
    with pytest.raises(openai.BadRequestError):
        api.client.embeddings.create(model=EMBED_MODEL, input=[[100256]], encoding_format="float")
    assert api.error(400)["param"] == "input[0][0]"


# -- function calling and structured output -------------------------------------------

WEATHER_TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "strict": True,
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 20}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The current time in a time zone.",
            "strict": True,
            "parameters": {
                "type": "object",
                "properties": {"zone": {"enum": ["UTC", "CET", "EST"]}},
                "required": ["zone"],
                "additionalProperties": False,
            },
        },
    },
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in WEATHER_TOOLS}


def test_tool_round_trip(api: Api) -> None:
    """As a user would: the model calls a declared function (streamed, through the
    SDK's helper), the client answers each call, the model replies in words."""
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    # One function: the parallel form allows as many calls as there are functions,
    # and every call costs a small model's tokens.
    tools = WEATHER_TOOLS[:1]
    with api.client.chat.completions.stream(
        model=CHAT_MODEL,
        messages=messages,
        tools=tools,
        tool_choice="required",
        parallel_tool_calls=True,
        max_tokens=64,
        temperature=0,
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    api.sse("CreateChatCompletionStreamResponse")
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert calls
    assert len({c.id for c in calls}) == len(calls)
    for call in calls:
        assert call.type == "function"
        arguments = orjson.loads(call.function.arguments)
        assert jsonschema_rs.is_valid(SCHEMAS[call.function.name], arguments)
        # Strict tools: the SDK parsed what the gateway had checked.
        assert call.function.parsed_arguments == arguments
    messages.append(
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": c.function.arguments},
                }
                for c in calls
            ],
        }
    )
    for call in calls:
        result = "Sunny, 21 C" if call.function.name == "get_weather" else "14:05"
        messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    reply = api.client.chat.completions.create(
        model=CHAT_MODEL, messages=messages, tools=tools, max_tokens=10, temperature=0
    )
    api.json("CreateChatCompletionResponse")
    assert reply.choices[0].message.tool_calls is None
    text = (reply.choices[0].message.content or "").strip()
    assert text and not text.startswith("{"), text


def test_strict_json_schema_output_parses_and_validates(api: Api) -> None:
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 16},
            "sunny": {"type": "boolean"},
        },
        "required": ["city", "sunny"],
        "additionalProperties": False,
    }
    result = api.client.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "Is it sunny in Rome? Answer in JSON."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "weather", "schema": schema, "strict": True},
        },
        max_tokens=40,
        temperature=0,
    )
    api.json("CreateChatCompletionResponse")
    assert result.choices[0].finish_reason == "stop"
    content = result.choices[0].message.content
    assert content is not None
    assert jsonschema_rs.is_valid(schema, orjson.loads(content))
