"""The ollama backend against a fake Ollama built from Ollama's API documentation."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

import orjson
import pytest
import trio
import trio.testing

from ostiary.backends.base import Backend, Generation
from ostiary.backends.httpclient import HttpClient
from ostiary.backends.ollama import OllamaBackend, OllamaSettings
from ostiary.backends.upstream import UpstreamBackend, UpstreamError
from ostiary.protocol.capabilities import check_capabilities
from ostiary.protocol.errors import (
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    InvalidRequestError,
    NotFoundError,
    OpenAIError,
    RequestTooLargeError,
)
from ostiary.protocol.generation import Delta, ToolCallDelta, Usage
from ostiary.protocol.requests import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ContentPart,
    EmbeddingRequest,
    FunctionCall,
    FunctionDefinition,
    ResponseFormat,
    Tool,
    ToolCall,
    ToolChoice,
)
from tests.backends.fake_ollama import FakeOllama, Fault, serve_fake_ollama
from tests.backends.upstream import DRAIN_SECONDS
from tests.timers import calls, finishes_at

REPLY_TOKENS = ["The", " sky", " is", " blue", " because", " of", " Rayleigh", " scattering."]
QUESTION = (ChatMessage(role="user", content="Why is the sky blue?"),)
WEATHER_TOOL = Tool(
    function=FunctionDefinition(
        name="get_weather",
        description="Weather for a city",
        parameters={"type": "object", "properties": {"city": {"type": "string"}}},
    )
)
PNG_B64 = "iVBORw0KGgo="


def make_settings(fake: FakeOllama, **overrides: Any) -> OllamaSettings:
    values: dict[str, Any] = {
        "name": "local",
        "models": ("llama3.2", "all-minilm", "house-model", "not-pulled"),
        "base_url": fake.base_url,
        "upstream_models": {"house-model": "llama3.2:latest"},
    }
    values.update(overrides)
    return OllamaSettings(**values)


@pytest.fixture
async def fake(nursery: trio.Nursery) -> FakeOllama:
    result: FakeOllama = await nursery.start(serve_fake_ollama)
    return result


@pytest.fixture
async def backend(fake: FakeOllama) -> AsyncIterator[OllamaBackend]:
    ids = itertools.count()
    async with OllamaBackend(
        make_settings(fake), new_tool_call_id=lambda: f"call_{next(ids)}"
    ) as b:
        yield b


def chat_request(**fields: Any) -> ChatCompletionRequest:
    fields.setdefault("model", "llama3.2")
    fields.setdefault("messages", QUESTION)
    return ChatCompletionRequest(**fields)


async def collect(generation: Generation) -> list[Delta | Usage]:
    async with aclosing(generation) as pieces:
        return [piece async for piece in pieces]


def text_of(pieces: list[Delta | Usage], choice: int = 0) -> str:
    return "".join(p.text for p in pieces if isinstance(p, Delta) and p.choice == choice)


def test_backend_satisfies_the_protocol() -> None:
    settings = OllamaSettings(
        name="local", models=("llama3.2", "all-minilm", "house-model", "not-pulled")
    )
    backend: Backend = OllamaBackend(settings)
    assert backend.name == "local"
    assert backend.models == ("llama3.2", "all-minilm", "house-model", "not-pulled")


# -- chat ---------------------------------------------------------------------------


async def test_chat_streams_deltas_then_finish_and_usage(
    backend: OllamaBackend, fake: FakeOllama
) -> None:
    pieces = await collect(backend.chat(chat_request()))
    assert pieces == [
        *(Delta(text=t) for t in REPLY_TOKENS),
        Delta(finish_reason="stop"),
        Usage(prompt_tokens=5, completion_tokens=8),
    ]
    assert fake.requests[-1].path == "/api/chat"
    assert fake.last_json == {
        "model": "llama3.2",
        "messages": [{"role": "user", "content": "Why is the sky blue?"}],
        "stream": True,
    }
    headers = dict(fake.requests[-1].headers)
    assert headers["content-type"] == "application/json"
    assert headers["accept"] == "application/x-ndjson"


async def test_chat_uses_the_upstream_model_name(backend: OllamaBackend, fake: FakeOllama) -> None:
    pieces = await collect(backend.chat(chat_request(model="house-model")))
    assert text_of(pieces) == fake.reply
    assert fake.last_json["model"] == "llama3.2:latest"


async def test_chat_maps_every_option(fake: FakeOllama) -> None:
    settings = make_settings(fake, keep_alive="10m")
    request = chat_request(
        temperature=0.2,
        top_p=0.9,
        seed=7,
        stop=("\n\n", "User:"),
        max_tokens=50,
        max_completion_tokens=40,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        response_format=ResponseFormat(type="json_object"),
        n=1,
        logprobs=False,
        user="someone",
        raw={"store": False, "modalities": ["text"]},
    )
    async with OllamaBackend(settings) as backend:
        await collect(backend.chat(request))
    assert fake.last_json == {
        "model": "llama3.2",
        "messages": [{"role": "user", "content": "Why is the sky blue?"}],
        "stream": True,
        "format": "json",
        "options": {
            "temperature": 0.2,
            "top_p": 0.9,
            "seed": 7,
            "stop": ["\n\n", "User:"],
            "num_predict": 40,
            "presence_penalty": 0.5,
            "frequency_penalty": -0.5,
        },
        "keep_alive": "10m",
    }


@pytest.mark.parametrize(
    ("response_format", "expected"),
    [
        (ResponseFormat(type="text"), None),
        (ResponseFormat(type="json_schema", json_schema={"name": "x"}), "json"),
        (
            ResponseFormat(
                type="json_schema",
                json_schema={"name": "age", "schema": {"type": "object", "required": ["age"]}},
            ),
            {"type": "object", "required": ["age"]},
        ),
    ],
)
async def test_chat_response_format(
    backend: OllamaBackend, fake: FakeOllama, response_format: ResponseFormat, expected: object
) -> None:
    await collect(backend.chat(chat_request(response_format=response_format)))
    assert fake.last_json.get("format") == expected


async def test_max_tokens_gives_length(backend: OllamaBackend, fake: FakeOllama) -> None:
    pieces = await collect(backend.chat(chat_request(max_tokens=3)))
    assert text_of(pieces) == "The sky is"
    assert pieces[-2:] == [Delta(finish_reason="length"), Usage(5, 3)]
    assert fake.last_json["options"] == {"num_predict": 3}


async def test_stop_sequence(backend: OllamaBackend) -> None:
    pieces = await collect(backend.chat(chat_request(stop=(" because",))))
    assert text_of(pieces) == "The sky is blue"
    assert pieces[-2] == Delta(finish_reason="stop")


async def test_chat_messages_are_mapped(backend: OllamaBackend, fake: FakeOllama) -> None:
    messages = (
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="developer", content="Use metric units."),
        ChatMessage(
            role="user",
            content=(
                ContentPart(type="text", text="What is this?"),
                ContentPart(
                    type="image_url",
                    data={
                        "type": "image_url",
                        "image_url": {"url": f"data:image/png;base64,{PNG_B64}"},
                    },
                ),
                ContentPart(type="text", text="And the weather?"),
            ),
        ),
        ChatMessage(
            role="assistant",
            content=None,
            tool_calls=(
                ToolCall(
                    id="call_a",
                    function=FunctionCall(name="get_weather", arguments='{"city": "Paris"}'),
                ),
            ),
        ),
        ChatMessage(role="tool", content="21 C", tool_call_id="call_a"),
        ChatMessage(role="tool", content="?", tool_call_id="call_unknown"),
        ChatMessage(role="assistant", content=(ContentPart(type="refusal", text="No."),)),
    )
    await collect(backend.chat(chat_request(messages=messages)))
    assert fake.last_json["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "Use metric units."},
        {"role": "user", "content": "What is this?\nAnd the weather?", "images": [PNG_B64]},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "21 C", "tool_name": "get_weather"},
        {"role": "tool", "content": "?"},
        {"role": "assistant", "content": "No."},
    ]


# -- tools --------------------------------------------------------------------------

TOOL_CALLS = [
    {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
    {"function": {"name": "get_weather", "arguments": {"city": "Lyon"}}},
]


async def test_tool_calls_become_tool_call_deltas(backend: OllamaBackend, fake: FakeOllama) -> None:
    fake.tool_calls = TOOL_CALLS
    pieces = await collect(backend.chat(chat_request(tools=(WEATHER_TOOL,))))
    assert pieces == [
        Delta(
            tool_calls=(
                ToolCallDelta(0, "call_0", "get_weather", '{"city":"Paris"}'),
                ToolCallDelta(1, "call_1", "get_weather", '{"city":"Lyon"}'),
            )
        ),
        Delta(finish_reason="tool_calls"),
        Usage(5, 10),
    ]
    assert fake.last_json["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]


async def test_no_parallel_tool_calls_keeps_the_first(
    backend: OllamaBackend, fake: FakeOllama
) -> None:
    fake.tool_calls = TOOL_CALLS
    request = chat_request(tools=(WEATHER_TOOL,), parallel_tool_calls=False)
    pieces = await collect(backend.chat(request))
    assert pieces[0] == Delta(
        tool_calls=(ToolCallDelta(0, "call_0", "get_weather", '{"city":"Paris"}'),)
    )
    assert pieces[1] == Delta(finish_reason="tool_calls")


async def test_tool_choice_none_sends_no_tools(backend: OllamaBackend, fake: FakeOllama) -> None:
    fake.tool_calls = TOOL_CALLS
    request = chat_request(tools=(WEATHER_TOOL,), tool_choice=ToolChoice(mode="none"))
    pieces = await collect(backend.chat(request))
    assert "tools" not in fake.last_json
    assert text_of(pieces) == fake.reply


async def test_tool_without_parameters_or_description(
    backend: OllamaBackend, fake: FakeOllama
) -> None:
    tool = Tool(function=FunctionDefinition(name="now"))
    await collect(backend.chat(chat_request(tools=(tool,), tool_choice=ToolChoice(mode="auto"))))
    assert fake.last_json["tools"] == [
        {
            "type": "function",
            "function": {"name": "now", "parameters": {"type": "object", "properties": {}}},
        }
    ]


async def test_a_strict_tool_is_sent_as_any_other(backend: OllamaBackend, fake: FakeOllama) -> None:
    # Ollama knows no ``strict``; the gateway's strict mode checks the arguments.
    params = {"type": "object", "properties": {"a": {"type": "integer"}}}
    tool = Tool(function=FunctionDefinition(name="f", strict=True, parameters=params))
    await collect(backend.chat(chat_request(tools=(tool,))))
    assert fake.last_json["tools"] == [
        {"type": "function", "function": {"name": "f", "parameters": params}}
    ]


def ndjson(*objects: object) -> bytes:
    return b"".join(orjson.dumps(o) + b"\n" for o in objects)


async def test_tool_calls_in_final_line_with_string_or_missing_arguments(
    backend: OllamaBackend, fake: FakeOllama
) -> None:
    final = {
        "message": {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"function": {"name": "a", "arguments": '{"x": 1}'}},
                {"function": {"name": "b"}, "id": "ollama_7"},
            ],
        },
        "done": True,
        "done_reason": "stop",
    }
    fake.script = [ndjson(final)]
    pieces = await collect(backend.chat(chat_request(tools=(WEATHER_TOOL,))))
    assert pieces == [
        Delta(
            tool_calls=(
                ToolCallDelta(0, "call_0", "a", '{"x": 1}'),
                ToolCallDelta(1, "ollama_7", "b", "{}"),
            ),
            finish_reason="tool_calls",
        ),
        Usage(0, 0),
    ]


async def test_default_tool_call_ids_are_unique(fake: FakeOllama) -> None:
    fake.tool_calls = TOOL_CALLS
    async with OllamaBackend(make_settings(fake)) as backend:
        pieces = await collect(backend.chat(chat_request(tools=(WEATHER_TOOL,))))
    first = pieces[0]
    assert isinstance(first, Delta)
    ids = [call.id for call in first.tool_calls]
    assert all(i is not None and i.startswith("call_") and len(i) == 29 for i in ids)
    assert len(set(ids)) == 2


# -- what the stream may look like -----------------------------------------------------


async def test_stream_split_anywhere_and_last_line_without_newline(
    backend: OllamaBackend, fake: FakeOllama
) -> None:
    body = ndjson(
        {"message": {"role": "assistant", "content": "Hel"}, "done": False},
        {"message": {"role": "assistant", "content": "lo"}, "done": False},
    ) + orjson.dumps(
        {"message": {"content": "!"}, "done": True, "done_reason": "length", "eval_count": 3}
    )
    fake.script = [body[i : i + 7] for i in range(0, len(body), 7)]
    pieces = await collect(backend.chat(chat_request()))
    assert pieces == [
        Delta(text="Hel"),
        Delta(text="lo"),
        Delta(text="!", finish_reason="length"),
        Usage(0, 3),
    ]


async def test_lines_after_done_are_ignored_and_empty_lines_skipped(
    backend: OllamaBackend, fake: FakeOllama
) -> None:
    fake.script = [
        ndjson(
            {"message": {"role": "assistant", "content": ""}, "done": False},
            {"done": True, "prompt_eval_count": 2, "eval_count": True},
            {"message": {"content": "late"}, "done": False},
        )
    ]
    pieces = await collect(backend.chat(chat_request()))
    assert pieces == [Delta(finish_reason="stop"), Usage(2, 0)]


@pytest.mark.parametrize(
    "line",
    [
        [1, 2],
        {"message": "text", "done": False},
        {"message": {"content": 5}, "done": False},
        {"message": {"tool_calls": [{"function": {"name": ""}}]}, "done": False},
        {"message": {"tool_calls": ["x"]}, "done": False},
        {"message": {"tool_calls": [{"function": {"name": "a", "arguments": 3}}]}, "done": False},
    ],
)
async def test_malformed_lines_are_backend_errors(
    backend: OllamaBackend, fake: FakeOllama, line: object
) -> None:
    fake.script = [ndjson(line)]
    with pytest.raises(BackendError, match="invalid response"):
        await collect(backend.chat(chat_request()))


async def test_generation_reuses_the_connection(backend: OllamaBackend, fake: FakeOllama) -> None:
    for _ in range(3):
        await collect(backend.chat(chat_request()))
    await collect(backend.complete(CompletionRequest(model="llama3.2", prompt="Hi")))
    assert fake.connections_opened == 1


async def test_done_line_without_end_of_body_still_finishes(
    backend: OllamaBackend,
    fake: FakeOllama,
    mock_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake.fault = Fault.HANG_MID_STREAM
    fake.fault_after = 100  # every object is sent, then the body never ends
    drains = calls(monkeypatch, UpstreamBackend, "_drain")

    def chat() -> Awaitable[list[Delta | Usage]]:
        return collect(backend.chat(chat_request()))

    pieces = await finishes_at(
        mock_clock,
        DRAIN_SECONDS,
        chat,
        drains.acquire,
    )
    assert pieces[-1] == Usage(5, 8)
    await fake.wait_closed(1)


async def test_connection_lost_after_done_line_still_finishes(
    backend: OllamaBackend, fake: FakeOllama
) -> None:
    fake.fault, fake.fault_after = Fault.CLOSE_MID_STREAM, 100
    pieces = await collect(backend.chat(chat_request()))
    assert pieces[-2:] == [Delta(finish_reason="stop"), Usage(5, 8)]


# -- completions ----------------------------------------------------------------------


async def test_complete_streams_raw_prompt(backend: OllamaBackend, fake: FakeOllama) -> None:
    request = CompletionRequest(model="llama3.2", prompt="Once upon a time", max_tokens=2, seed=1)
    pieces = await collect(backend.complete(request))
    assert pieces == [
        Delta(text="The"),
        Delta(text=" sky"),
        Delta(finish_reason="length"),
        Usage(4, 2),
    ]
    assert fake.requests[-1].path == "/api/generate"
    assert fake.last_json == {
        "model": "llama3.2",
        "prompt": "Once upon a time",
        "stream": True,
        "raw": True,
        "options": {"seed": 1, "num_predict": 2},
    }


async def test_complete_with_suffix_uses_the_template(
    backend: OllamaBackend, fake: FakeOllama
) -> None:
    request = CompletionRequest(model="llama3.2", prompt="def f():", suffix="return x")
    pieces = await collect(backend.complete(request))
    assert text_of(pieces) == fake.reply
    assert fake.last_json == {
        "model": "llama3.2",
        "prompt": "def f():",
        "stream": True,
        "suffix": "return x",
    }


async def test_complete_a_batch_one_prompt_after_another(
    backend: OllamaBackend, fake: FakeOllama
) -> None:
    request = CompletionRequest(
        model="llama3.2", prompt=("a b", "c d e"), max_tokens=1, stop=("x",)
    )
    pieces = await collect(backend.complete(request))
    assert pieces == [
        Delta(text="The", choice=0),
        Delta(choice=0, finish_reason="length"),
        Delta(text="The", choice=1),
        Delta(choice=1, finish_reason="length"),
        Usage(5, 2),
    ]
    assert [r.json["prompt"] for r in fake.requests] == ["a b", "c d e"]
    assert all(r.json["options"] == {"stop": ["x"], "num_predict": 1} for r in fake.requests)


async def test_complete_skips_empty_pieces(backend: OllamaBackend, fake: FakeOllama) -> None:
    fake.script = [
        ndjson(
            {"response": "", "done": False},
            {"response": "x", "done": True, "done_reason": "stop", "prompt_eval_count": 1},
        )
    ]
    pieces = await collect(backend.complete(CompletionRequest(model="llama3.2", prompt="a")))
    assert pieces == [Delta(text="x", finish_reason="stop"), Usage(1, 0)]


# -- parameters Ollama cannot honour --------------------------------------------------

CHAT_REFUSED = [
    ({"n": 2}, "n"),
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"top_logprobs": 0}, "top_logprobs"),
    ({"logit_bias": {"50256": -100.0}}, "logit_bias"),
    ({"tool_choice": ToolChoice(mode="required"), "tools": (WEATHER_TOOL,)}, "tool_choice"),
    ({"tool_choice": ToolChoice(mode="function", function="get_weather")}, "tool_choice"),
    ({"raw": {"audio": {"voice": "alloy"}}}, "audio"),
    ({"raw": {"modalities": ["text", "audio"]}}, "modalities"),
    ({"raw": {"store": True}}, "store"),
    ({"raw": {"reasoning_effort": "low"}}, "reasoning_effort"),
    ({"raw": {"prediction": {"type": "content", "content": "x"}}}, "prediction"),
    ({"raw": {"functions": [{"name": "f"}]}}, "functions"),
    (
        {"messages": (ChatMessage(role="function", content="x", name="f"),)},
        "messages[0].role",
    ),
    (
        {
            "messages": (
                ChatMessage(
                    role="user",
                    content=(
                        ContentPart(
                            type="input_audio",
                            data={
                                "type": "input_audio",
                                "input_audio": {"data": "", "format": "wav"},
                            },
                        ),
                    ),
                ),
            )
        },
        "messages[0].content[0]",
    ),
    (
        {
            "messages": (
                ChatMessage(
                    role="user",
                    content=(
                        ContentPart(
                            type="image_url",
                            data={"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                        ),
                    ),
                ),
            )
        },
        "messages[0].content[0].image_url.url",
    ),
    (
        {
            "messages": (
                ChatMessage(
                    role="user",
                    content=(
                        ContentPart(
                            type="image_url",
                            data={"type": "image_url", "image_url": {"url": "data:image/png,abc"}},
                        ),
                    ),
                ),
            )
        },
        "messages[0].content[0].image_url.url",
    ),
    (
        {
            "messages": (
                ChatMessage(
                    role="assistant",
                    tool_calls=(
                        ToolCall(id="c", function=FunctionCall(name="f", arguments="[1]")),
                    ),
                ),
            )
        },
        "messages[0].tool_calls[0].function.arguments",
    ),
    (
        {
            "messages": (
                ChatMessage(
                    role="assistant",
                    tool_calls=(ToolCall(id="c", function=FunctionCall(name="f", arguments="{")),),
                ),
            )
        },
        "messages[0].tool_calls[0].function.arguments",
    ),
]


@pytest.mark.parametrize(("fields", "param"), CHAT_REFUSED)
async def test_chat_refuses_what_ollama_cannot_honour(
    backend: OllamaBackend, fake: FakeOllama, fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        await collect(backend.chat(chat_request(**fields)))
    assert info.value.param == param
    assert info.value.status == 400
    if param in ("n", "logprobs", "top_logprobs", "logit_bias", "tool_choice"):
        assert info.value.code == "unsupported_parameter"
    assert fake.requests == []


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 3}, "n"),
        ({"best_of": 2}, "best_of"),
        ({"echo": True}, "echo"),
        ({"logprobs": 0}, "logprobs"),
        ({"logit_bias": {"1": 1.0}}, "logit_bias"),
        ({"prompt": (1, 2, 3)}, "prompt"),
        ({"prompt": ((1, 2), (3,))}, "prompt"),
    ],
)
async def test_complete_refuses_what_ollama_cannot_honour(
    backend: OllamaBackend, fake: FakeOllama, fields: dict[str, Any], param: str
) -> None:
    fields.setdefault("prompt", "Hi")
    request = CompletionRequest(model="llama3.2", **fields)
    with pytest.raises(InvalidRequestError) as info:
        await collect(backend.complete(request))
    assert info.value.param == param
    assert fake.requests == []
    if param == "logprobs":
        assert info.value.code == "unsupported_parameter"


def test_the_gateway_refuses_logprobs_for_ollama_models_first() -> None:
    """Ollama gives no logprobs: the model declares so, and the gateway refuses
    ``logprobs`` and ``top_logprobs`` before the request is queued."""
    caps = OllamaSettings(name="o", models=("llama3.2",)).capabilities("llama3.2")
    for request, param in (
        (chat_request(logprobs=True), "logprobs"),
        (chat_request(top_logprobs=0), "top_logprobs"),
        (CompletionRequest(model="llama3.2", prompt="Hi", logprobs=0), "logprobs"),
    ):
        with pytest.raises(InvalidRequestError) as info:
            check_capabilities(request, caps)
        assert (info.value.param, info.value.code) == (param, "unsupported_parameter")


async def test_complete_accepts_neutral_values(backend: OllamaBackend) -> None:
    request = CompletionRequest(
        model="llama3.2", prompt="Hi", n=1, best_of=1, echo=False, logit_bias={}
    )
    assert text_of(await collect(backend.complete(request)))


# -- embeddings -----------------------------------------------------------------------


async def test_embed(backend: OllamaBackend, fake: FakeOllama) -> None:
    result = await backend.embed(EmbeddingRequest(model="all-minilm", input=("one two", "three")))
    assert len(result.vectors) == 2
    assert all(len(v) == fake.embedding_size for v in result.vectors)
    assert all(isinstance(x, float) for v in result.vectors for x in v)
    assert result.usage == Usage(3)
    assert fake.requests[-1].path == "/api/embed"
    assert fake.last_json == {
        "model": "all-minilm",
        "input": ["one two", "three"],
        "truncate": False,
    }


async def test_embed_dimensions_and_keep_alive(fake: FakeOllama) -> None:
    async with OllamaBackend(make_settings(fake, keep_alive="1h")) as backend:
        result = await backend.embed(EmbeddingRequest(model="all-minilm", input="x", dimensions=3))
    assert [len(v) for v in result.vectors] == [3]
    assert fake.last_json == {
        "model": "all-minilm",
        "input": ["x"],
        "truncate": False,
        "dimensions": 3,
        "keep_alive": "1h",
    }


async def test_embed_dimensions_ignored_upstream_is_refused(
    backend: OllamaBackend, fake: FakeOllama
) -> None:
    fake.honour_dimensions = False
    with pytest.raises(InvalidRequestError) as info:
        await backend.embed(EmbeddingRequest(model="all-minilm", input="x", dimensions=3))
    assert info.value.param == "dimensions"


async def test_embed_token_ids_are_refused(backend: OllamaBackend, fake: FakeOllama) -> None:
    with pytest.raises(InvalidRequestError) as info:
        await backend.embed(EmbeddingRequest(model="all-minilm", input=(1, 2, 3)))
    assert info.value.param == "input"
    assert fake.requests == []


async def test_embed_input_too_long_is_a_400(backend: OllamaBackend, fake: FakeOllama) -> None:
    with pytest.raises(InvalidRequestError, match="exceeds the context length"):
        await backend.embed(EmbeddingRequest(model="all-minilm", input="w " * 100))


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"embeddings": [[0.1]], "prompt_eval_count": 1}',
        b'{"embeddings": [[0.1], [0.2, "x"]]}',
        b'{"embeddings": [[0.1], 5]}',
        b'{"embeddings": [[0.1], [true]]}',
    ],
)
async def test_embed_malformed_answers(
    backend: OllamaBackend, fake: FakeOllama, body: bytes
) -> None:
    fake.fault, fake.error_status, fake.error_body = Fault.HTTP_ERROR, 200, body
    with pytest.raises(BackendError, match="invalid response"):
        await backend.embed(EmbeddingRequest(model="all-minilm", input=("a", "b")))


# -- readiness ------------------------------------------------------------------------


async def test_ready_when_every_model_is_present(fake: FakeOllama) -> None:
    fake.models = ["llama3.2:latest", "all-minilm:latest", "not-pulled:7b"]
    settings = make_settings(
        fake, upstream_models={"house-model": "llama3.2", "not-pulled": "not-pulled:7b"}
    )
    async with OllamaBackend(settings) as backend:
        await backend.check_ready()
    assert fake.requests[-1].path == "/api/tags"


async def test_not_ready_names_missing_models(backend: OllamaBackend, fake: FakeOllama) -> None:
    with pytest.raises(BackendUnavailableError) as info:
        await backend.check_ready()
    assert info.value.message == (
        "The upstream model server does not have these models: not-pulled."
    )
    assert info.value.status == 503


async def test_not_ready_on_error_status(backend: OllamaBackend, fake: FakeOllama) -> None:
    fake.fault = Fault.HTTP_ERROR
    with pytest.raises(BackendError) as info:
        await backend.check_ready()
    assert isinstance(info.value.__cause__, UpstreamError)
    assert info.value.__cause__.status == 500


async def test_ready_tolerates_odd_tag_entries(fake: FakeOllama) -> None:
    fake.fault, fake.error_status = Fault.HTTP_ERROR, 200
    fake.error_body = orjson.dumps({"models": ["x", {"name": 3, "model": "llama3.2"}]})
    async with OllamaBackend(make_settings(fake, models=("llama3.2",), upstream_models={})) as b:
        await b.check_ready()


async def test_readiness_times_out(
    backend: OllamaBackend, fake: FakeOllama, mock_clock: trio.testing.MockClock
) -> None:
    fake.fault = Fault.HANG_BEFORE_RESPONSE
    ready_within = make_settings(fake).connect_timeout
    with pytest.raises(BackendTimeoutError):
        await finishes_at(mock_clock, ready_within, backend.check_ready, asked(fake))
    await fake.wait_closed(1)


# -- errors -------------------------------------------------------------------------


async def test_model_unknown_to_ollama_is_model_not_found(
    backend: OllamaBackend, fake: FakeOllama
) -> None:
    with pytest.raises(NotFoundError) as info:
        await collect(backend.chat(chat_request(model="not-pulled")))
    assert info.value.code == "model_not_found"
    assert info.value.param == "model"
    assert "not-pulled" in info.value.message
    assert len(fake.requests) == 1


async def test_model_not_configured_never_reaches_ollama(
    backend: OllamaBackend, fake: FakeOllama
) -> None:
    for call in (
        lambda: collect(backend.chat(chat_request(model="llama3.1"))),
        lambda: collect(backend.complete(CompletionRequest(model="llama3.1", prompt="x"))),
        lambda: backend.embed(EmbeddingRequest(model="llama3.1", input="x")),
    ):
        with pytest.raises(NotFoundError) as info:
            await call()
        assert info.value.code == "model_not_found"
    assert fake.requests == []


async def test_400_passes_a_cleaned_message(backend: OllamaBackend, fake: FakeOllama) -> None:
    fake.fault, fake.error_status = Fault.HTTP_ERROR, 400
    fake.error_message = (
        "registry.ollama.ai/library/llama3.2:latest does not support\ttools" + "!" * 600
    )
    with pytest.raises(InvalidRequestError) as info:
        await collect(backend.chat(chat_request(model="house-model")))
    message = info.value.message
    assert message.startswith("registry.ollama.ai/library/house-model does not support tools")
    assert "llama3.2" not in message
    assert len(message) == 500
    assert message.endswith("...")


@pytest.mark.parametrize(
    ("status", "body", "error", "message"),
    [
        (400, b"{}", InvalidRequestError, "rejected the request (HTTP 400)"),
        (404, b"404 page not found", BackendError, "answered with HTTP 404"),
        (413, b'{"error": "request too large"}', RequestTooLargeError, "too large"),
        (429, b'{"error": "server busy"}', BackendUnavailableError, "busy"),
        (503, b"", BackendUnavailableError, "unavailable"),
        (500, b'{"error": "llama runner process has terminated: /x/y"}', BackendError, "failed"),
        (502, b"<html>", BackendError, "failed"),
        (401, b'{"error": "unauthorized"}', BackendError, "rejected our credentials"),
    ],
)
async def test_http_status_mapping(
    backend: OllamaBackend,
    fake: FakeOllama,
    status: int,
    body: bytes,
    error: type[OpenAIError],
    message: str,
) -> None:
    fake.fault, fake.error_status, fake.error_body = Fault.HTTP_ERROR, status, body
    for call in (
        lambda: collect(backend.chat(chat_request())),
        lambda: collect(backend.complete(CompletionRequest(model="llama3.2", prompt="x"))),
        lambda: backend.embed(EmbeddingRequest(model="all-minilm", input="x")),
    ):
        with pytest.raises(error) as info:
            await call()
        assert type(info.value) is error
        assert message in info.value.message
        assert "/x/y" not in info.value.message
        assert isinstance(info.value.__cause__, UpstreamError)
    if status in (429, 503):
        assert info.value.retry_after == 1.0
        assert info.value.code == ("upstream_busy" if status == 429 else "backend_unavailable")


async def test_error_line_mid_stream(backend: OllamaBackend, fake: FakeOllama) -> None:
    fake.fault, fake.fault_after = Fault.ERROR_MID_STREAM, 2
    received: list[Delta | Usage] = []
    with pytest.raises(BackendError) as info:
        async with aclosing(backend.chat(chat_request())) as pieces:
            async for piece in pieces:
                received.append(piece)
    assert received == [Delta(text="The"), Delta(text=" sky")]
    assert "failed during generation" in info.value.message
    assert fake.error_message not in info.value.message
    cause = info.value.__cause__
    assert isinstance(cause, UpstreamError)
    assert cause.upstream_message == fake.error_message


@pytest.mark.parametrize(
    ("fault", "match"),
    [
        (Fault.GARBAGE, "not valid JSON"),
        (Fault.NO_DONE, "ended its response early"),
        (Fault.CLOSE_MID_STREAM, "connection to the upstream model server failed"),
    ],
)
async def test_broken_streams(
    backend: OllamaBackend, fake: FakeOllama, fault: Fault, match: str
) -> None:
    fake.fault = fault
    with pytest.raises(BackendError, match=match):
        await collect(backend.complete(CompletionRequest(model="llama3.2", prompt="x")))


async def test_line_too_long_is_a_backend_error(backend: OllamaBackend, fake: FakeOllama) -> None:
    fake.script = [b"[" + b"1," * (600 * 1024)]
    with pytest.raises(BackendError, match="longer than"):
        await collect(backend.chat(chat_request()))


async def test_connection_refused_is_unavailable(fake: FakeOllama, closed_port: int) -> None:
    settings = make_settings(fake, base_url=f"http://127.0.0.1:{closed_port}")
    async with OllamaBackend(settings) as backend:
        for call in (
            lambda: collect(backend.chat(chat_request())),
            lambda: backend.embed(EmbeddingRequest(model="all-minilm", input="x")),
            backend.check_ready,
        ):
            with pytest.raises(BackendUnavailableError) as info:
                await call()
            assert info.value.message == "The upstream model server is not reachable."
            assert info.value.retry_after == 1.0


def asked(fake: FakeOllama) -> Callable[[], Awaitable[None]]:
    """Returns once the fake holds one more whole request than it does now."""
    count = len(fake.requests) + 1
    return lambda: fake.wait_requests(count)


async def test_read_timeout_before_headers(
    backend: OllamaBackend, fake: FakeOllama, mock_clock: trio.testing.MockClock
) -> None:
    fake.fault = Fault.HANG_BEFORE_RESPONSE
    with pytest.raises(BackendTimeoutError):
        await finishes_at(
            mock_clock, 600.0, lambda: collect(backend.chat(chat_request())), asked(fake)
        )
    await fake.wait_closed(1)


async def test_read_timeout_mid_stream(
    fake: FakeOllama, mock_clock: trio.testing.MockClock
) -> None:
    fake.fault = Fault.HANG_MID_STREAM
    backend = OllamaBackend(make_settings(fake, read_timeout=30.0))
    async with backend, aclosing(backend.chat(chat_request())) as pieces:
        # The fake sends one object, then nothing: once it is read, nothing is in flight.
        assert await pieces.__anext__() == Delta(text="The")
        with pytest.raises(BackendTimeoutError):
            await finishes_at(mock_clock, 30.0, pieces.__anext__, trio.lowlevel.checkpoint)
    await fake.wait_closed(1)


async def test_connect_timeout(
    fake: FakeOllama, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def never_connects(*args: object, **kwargs: object) -> trio.SocketStream:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    monkeypatch.setattr(trio, "open_tcp_stream", never_connects)
    async with OllamaBackend(make_settings(fake, connect_timeout=2.0)) as backend:
        with pytest.raises(BackendTimeoutError):
            await collect(backend.chat(chat_request()))


# -- cancellation ---------------------------------------------------------------------


async def test_cancellation_closes_the_upstream_connection(
    backend: OllamaBackend, fake: FakeOllama
) -> None:
    fake.fault = Fault.HANG_MID_STREAM
    received: list[Delta | Usage] = []
    with trio.CancelScope() as scope:
        async with aclosing(backend.chat(chat_request())) as pieces:
            async for piece in pieces:
                received.append(piece)
                scope.cancel()
    assert scope.cancelled_caught
    assert received == [Delta(text="The")]
    with trio.fail_after(5):
        await fake.wait_closed(1)


async def test_leaving_early_closes_the_upstream_connection(
    backend: OllamaBackend, fake: FakeOllama
) -> None:
    fake.fault, fake.fault_after = Fault.HANG_MID_STREAM, 3
    async with aclosing(backend.chat(chat_request())) as pieces:
        assert await anext(pieces) == Delta(text="The")
    with trio.fail_after(5):
        await fake.wait_closed(1)
    # A fresh request opens a fresh connection and works.
    fake.fault = None
    assert text_of(await collect(backend.chat(chat_request()))) == fake.reply
    assert fake.connections_opened == 2


async def test_backend_outside_its_context_is_a_bug(fake: FakeOllama) -> None:
    backend = OllamaBackend(make_settings(fake))
    with pytest.raises(RuntimeError, match="async with"):
        await backend.check_ready()
    async with backend:
        pass
    await backend.__aexit__(None, None, None)


# -- settings -----------------------------------------------------------------------


def test_settings_defaults() -> None:
    s = OllamaSettings(name="o", models=("m",))
    assert (s.kind, s.base_url, s.connect_timeout, s.read_timeout) == (
        "ollama",
        "http://127.0.0.1:11434",
        5.0,
        600.0,
    )
    assert (s.max_connections, s.keep_alive, s.upstream_models) == (64, None, {})
    assert s == OllamaSettings(name="o", models=("m",))
    assert hash(s) == hash(OllamaSettings(name="o", models=("m",), upstream_models={}))


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"kind": "openai"}, "kind"),
        ({"upstream_models": {"other": "x"}}, "not in models"),
        ({"upstream_models": {"m": ""}}, "non-empty"),
        ({"connect_timeout": 0}, "connect_timeout"),
        ({"read_timeout": -1.0}, "read_timeout"),
        ({"max_connections": 0}, "max_connections"),
    ],
)
def test_settings_validation(fields: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        OllamaSettings(name="o", models=("m",), **fields)


# -- the fake itself ------------------------------------------------------------------


async def test_fake_answers_like_ollama_without_streaming(fake: FakeOllama) -> None:
    fake.tool_calls = TOOL_CALLS[:1]
    async with HttpClient(fake.base_url) as client:
        status, _, body = await client.request("GET", "/")
        assert (status, body) == (200, b"Ollama is running")
        chat = {
            "model": "llama3.2",
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "get_weather"}}],
            "stream": False,
        }
        status, _, body = await client.request("POST", "/api/chat", body=orjson.dumps(chat))
        answer = orjson.loads(body)
        assert status == 200
        assert answer["message"]["tool_calls"] == TOOL_CALLS[:1]
        assert answer["done"] is True
        generate = {"model": "llama3.2", "prompt": "hi", "stream": False}
        status, _, body = await client.request("POST", "/api/generate", body=orjson.dumps(generate))
        assert orjson.loads(body)["response"] == fake.reply
        for path, bad, error in [
            ("/api/chat", {"model": "llama3.2", "options": {"nope": 1}}, "invalid options: nope"),
            ("/api/chat", {"messages": []}, "model is required"),
            ("/api/generate", {"model": "llama3.2", "raw": True, "suffix": "x"}, "raw mode"),
            ("/api/embed", {"model": "all-minilm", "input": "x", "dimensions": 99}, "dimensions"),
            ("/api/chat", {"model": "x"}, 'model "x" not found, try pulling it first'),
        ]:
            status, _, body = await client.request("POST", path, body=orjson.dumps(bad))
            assert status in (400, 404)
            assert error in orjson.loads(body)["error"]
        status, _, body = await client.request("GET", "/api/nothing")
        assert (status, body) == (404, b"404 page not found")
