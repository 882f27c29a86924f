"""OpenAIBackend against the mock upstream and scripted misbehaving upstreams."""

from __future__ import annotations

import base64
import contextlib
import struct
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any

import orjson
import pytest
import trio
import trio.testing

from ostiary.backends.base import Backend
from ostiary.backends.openai_compat import OpenAIBackend, OpenAISettings
from ostiary.backends.upstream import UpstreamBackend, UpstreamError
from ostiary.protocol.errors import (
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    InvalidRequestError,
    NotFoundError,
    OpenAIError,
    RequestTooLargeError,
)
from ostiary.protocol.generation import Delta, EmbeddingResult, ToolCallDelta, Usage
from ostiary.protocol.requests import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    EmbeddingRequest,
)
from tests.backends.upstream import (
    DRAIN_SECONDS,
    LAST_CHUNK,
    Handler,
    MockStats,
    ScriptedRequest,
    http_response,
    replies,
    reply,
    sse_chunk,
    sse_head,
    sse_response,
    start_mock,
    start_scripted,
)
from tests.timers import calls, finishes_at, finishes_untimed

Item = Delta | Usage


def settings(url: str, **overrides: Any) -> OpenAISettings:
    return OpenAISettings(name="up", models=("ours", "other"), base_url=url, **overrides)


@contextlib.asynccontextmanager
async def backend_for(url: str, **overrides: Any) -> AsyncIterator[OpenAIBackend]:
    async with OpenAIBackend(settings(url, **overrides)) as backend:
        yield backend


def chat(stream: bool = False, **raw: Any) -> ChatCompletionRequest:
    body = {"model": "ours", "messages": [{"role": "user", "content": "hi there"}], **raw}
    if stream:
        body["stream"] = True
    return ChatCompletionRequest(
        model="ours",
        messages=(ChatMessage(role="user", content="hi there"),),
        stream=stream,
        n=raw.get("n"),
        logprobs=raw.get("logprobs"),
        top_logprobs=raw.get("top_logprobs"),
        raw=body,
    )


def completion(stream: bool = False) -> CompletionRequest:
    raw = {"model": "ours", "prompt": "once upon", "stream": stream}
    return CompletionRequest(model="ours", prompt="once upon", stream=stream, raw=raw)


async def collect(generation: AsyncIterator[Item]) -> list[Item]:
    return [item async for item in generation]


def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
    return orjson.dumps({"object": "chat.completion.chunk", "choices": choices, **extra})


#: A choice's end, streamed; and a whole choice.
STOP = {"index": 0, "delta": {}, "finish_reason": "stop"}
STOPPED = Delta(finish_reason="stop")
WHOLE = {"index": 0, "message": {"content": "ok"}, "finish_reason": "stop"}


def text_of(items: Sequence[Item], choice: int = 0) -> str:
    return "".join(i.text for i in items if isinstance(i, Delta) and i.choice == choice)


# -- settings and lifetime --------------------------------------------------------------


def test_settings_defaults_and_validation() -> None:
    s = settings("http://127.0.0.1:1/v1")
    assert (s.kind, s.api_key_env, s.connect_timeout, s.read_timeout) == (
        "openai",
        None,
        5.0,
        600.0,
    )
    assert (s.max_connections, s.upstream_models) == (256, {})
    assert (s.max_response_bytes, s.max_embeddings_response_bytes) == (16 << 20, 64 << 20)
    hash(s)
    with pytest.raises(ValueError, match="max_response_bytes"):
        settings("http://x", max_response_bytes=0)
    with pytest.raises(ValueError, match="base_url"):
        settings("127.0.0.1:8000")
    with pytest.raises(ValueError, match="read_timeout"):
        settings("http://x", read_timeout=0)
    with pytest.raises(ValueError, match="max_connections"):
        settings("http://x", max_connections=0)
    with pytest.raises(ValueError, match="kind"):
        settings("http://x", kind="ollama")


async def test_backend_protocol_and_lifetime() -> None:
    backend: Backend = OpenAIBackend(settings("http://127.0.0.1:1/v1"))
    assert (backend.name, backend.models) == ("up", ("ours", "other"))
    with pytest.raises(RuntimeError, match="async with"):
        await backend.embed(EmbeddingRequest(model="ours", input="x"))
    async with backend as entered:
        assert entered is backend
    await backend.__aexit__(None, None, None)


async def test_missing_api_key_variable_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OSTIARY_TEST_KEY", raising=False)
    backend = OpenAIBackend(settings("http://127.0.0.1:1/v1", api_key_env="OSTIARY_TEST_KEY"))
    with pytest.raises(ValueError, match="OSTIARY_TEST_KEY"):
        await backend.__aenter__()


async def test_api_key_from_environment_is_sent(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OSTIARY_TEST_KEY", "sk-upstream-secret")
    stats = MockStats()
    url = await start_scripted(nursery, reply(http_response(200, b'{"data": []}')), stats)
    async with backend_for(url, api_key_env="OSTIARY_TEST_KEY") as backend:
        await backend.check_ready()
    assert stats.last_request is not None
    assert stats.last_request.headers["authorization"] == "Bearer sk-upstream-secret"
    assert stats.last_request.path == "/v1/models"


async def test_no_key_configured_sends_no_authorization(nursery: trio.Nursery) -> None:
    stats = MockStats()
    url = await start_scripted(nursery, reply(http_response(200, b'{"data": []}')), stats)
    async with backend_for(url) as backend:
        await backend.check_ready()
    assert stats.last_request is not None
    assert "authorization" not in stats.last_request.headers


# -- generation against the mock ---------------------------------------------------------


async def test_chat_non_stream_and_stream(nursery: trio.Nursery) -> None:
    stats = MockStats()
    async with backend_for(await start_mock(nursery, stats)) as backend:
        items = await collect(backend.chat(chat()))
        assert items == [Delta(text="tok " * 20, finish_reason="stop"), Usage(7, 20)]
        items = await collect(backend.chat(chat(stream=True)))
        assert len(items) == 21
        assert items[0] == Delta(text="tok ")
        assert items[-2] == Delta(text="tok ", finish_reason="stop")
        assert items[-1] == Usage(7, 20)
        for _ in range(5):
            await collect(backend.chat(chat(stream=True)))
    assert stats.accepted == 1


async def test_completions_non_stream_and_stream(nursery: trio.Nursery) -> None:
    async with backend_for(await start_mock(nursery)) as backend:
        items = await collect(backend.complete(completion()))
        assert items == [Delta(text="tok " * 20, finish_reason="stop"), Usage(7, 20)]
        items = await collect(backend.complete(completion(stream=True)))
        assert text_of(items) == "tok " * 20
        assert items[-1] == Usage(7, 20)


async def test_request_body_sent_upstream(nursery: trio.Nursery) -> None:
    bodies: list[dict[str, Any]] = []

    async def handler(request: ScriptedRequest, stream: trio.SocketStream) -> bool:
        bodies.append(orjson.loads(request.body))
        assert request.headers["content-type"] == "application/json"
        if bodies[-1].get("stream"):
            end = chunk([STOP], usage={"prompt_tokens": 1})
            await stream.send_all(sse_response([end, b"[DONE]"]))
        else:
            await stream.send_all(http_response(200, orjson.dumps({"choices": [WHOLE]})))
        return True

    url = await start_scripted(nursery, handler)
    async with backend_for(url, upstream_models={"ours": "their-model"}) as backend:
        await collect(backend.chat(chat(temperature=0.5, stream_options={"include_usage": False})))
        await collect(
            backend.chat(chat(stream=True, stream_options={"include_obfuscation": False}))
        )
        await collect(backend.complete(completion(stream=True)))
    assert bodies[0] == {
        "model": "their-model",
        "messages": [{"role": "user", "content": "hi there"}],
        "temperature": 0.5,
    }
    assert bodies[1]["stream"] is True
    assert bodies[1]["stream_options"] == {"include_obfuscation": False, "include_usage": True}
    assert bodies[2]["stream_options"] == {"include_usage": True}
    assert bodies[2]["prompt"] == "once upon"


async def test_request_without_raw_is_rebuilt(nursery: trio.Nursery) -> None:
    bodies: list[dict[str, Any]] = []

    async def handler(request: ScriptedRequest, stream: trio.SocketStream) -> bool:
        bodies.append(orjson.loads(request.body))
        answer = {"choices": [WHOLE], "data": []}
        await stream.send_all(http_response(200, orjson.dumps(answer)))
        return True

    async with backend_for(await start_scripted(nursery, handler)) as backend:
        message = ChatMessage(role="user", content="hello")
        await collect(
            backend.chat(
                ChatCompletionRequest(model="ours", messages=(message,), max_tokens=5, stop=("x",))
            )
        )
        await collect(backend.complete(CompletionRequest(model="ours", prompt=((1, 2), (3,)))))
        await collect(backend.complete(CompletionRequest(model="ours", prompt="p", n=2)))
        with pytest.raises(BackendError):
            await backend.embed(EmbeddingRequest(model="ours", input=(1, 2), dimensions=4))
    assert bodies[0] == {
        "model": "ours",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 5,
        "stop": ["x"],
    }
    assert bodies[1] == {"model": "ours", "prompt": [[1, 2], [3]]}
    assert bodies[2] == {"model": "ours", "prompt": "p", "n": 2}
    assert bodies[3] == {
        "model": "ours",
        "input": [[1, 2]],
        "encoding_format": "float",
        "dimensions": 4,
    }


# -- stream translation ------------------------------------------------------------------------


async def test_stream_tool_calls_and_multiple_choices(nursery: trio.Nursery) -> None:
    call = {
        "index": 0,
        "id": "call_1",
        "type": "function",
        "function": {"name": "f", "arguments": ""},
    }
    events = [
        chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]),
        chunk(
            [
                {"index": 0, "delta": {"content": "A"}, "finish_reason": None},
                {"index": 1, "delta": {"tool_calls": [call]}, "finish_reason": None},
            ]
        ),
        chunk(
            [
                {
                    "index": 1,
                    "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"a"'}}]},
                }
            ]
        ),
        chunk(
            [
                {
                    "index": 1,
                    "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ":1}"}}]},
                }
            ]
        ),
        chunk([{"index": 0, "delta": {}, "finish_reason": "length"}]),
        chunk([{"index": 1, "delta": {}, "finish_reason": "tool_calls"}]),
        chunk([], usage={"prompt_tokens": 11, "completion_tokens": 9, "total_tokens": 20}),
        b"[DONE]",
        chunk([{"index": 0, "delta": {"content": "ignored after DONE"}}]),
    ]
    async with backend_for(await start_scripted(nursery, reply(sse_response(events)))) as backend:
        items = await collect(backend.chat(chat(stream=True, n=2)))
    assert items == [
        Delta(text="A"),
        Delta(choice=1, tool_calls=(ToolCallDelta(index=0, id="call_1", name="f"),)),
        Delta(choice=1, tool_calls=(ToolCallDelta(index=0, arguments='{"a"'),)),
        Delta(choice=1, tool_calls=(ToolCallDelta(index=0, arguments=":1}"),)),
        Delta(finish_reason="length"),
        Delta(choice=1, finish_reason="tool_calls"),
        Usage(11, 9),
    ]


async def test_non_stream_tool_calls_and_multiple_choices(nursery: trio.Nursery) -> None:
    body = {
        "choices": [
            {
                "index": 1,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{}"},
                        },
                        {
                            "id": "c2",
                            "type": "function",
                            "function": {"name": "g", "arguments": "[]"},
                        },
                    ],
                },
                "finish_reason": "tool_calls",
            },
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hey"},
                "finish_reason": "weird",
            },
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4},
    }
    url = await start_scripted(nursery, reply(http_response(200, orjson.dumps(body))))
    async with backend_for(url) as backend:
        items = await collect(backend.chat(chat(n=2)))
    assert items == [
        Delta(text="hey", finish_reason="stop"),
        Delta(
            choice=1,
            tool_calls=(
                ToolCallDelta(index=0, id="c1", name="f", arguments="{}"),
                ToolCallDelta(index=1, id="c2", name="g", arguments="[]"),
            ),
            finish_reason="tool_calls",
        ),
        Usage(3, 4),
    ]


async def test_usage_is_estimated_when_upstream_sends_none(nursery: trio.Nursery) -> None:
    stream = sse_response(
        [chunk([{"index": 0, "delta": {"content": c}}]) for c in ("a", "b", "c")]
        + [chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]), b"[DONE]"]
    )
    whole = http_response(
        200, orjson.dumps({"choices": [{"index": 0, "text": "12345678", "finish_reason": None}]})
    )
    handlers = iter([stream, whole])

    async def handler(request: ScriptedRequest, s: trio.SocketStream) -> bool:
        await s.send_all(next(handlers))
        return True

    async with backend_for(await start_scripted(nursery, handler)) as backend:
        items = await collect(backend.chat(chat(stream=True)))
        # "hi there": ceil(8 / 4) + 4 per message; one token per streamed piece.
        assert items[-1] == Usage(6, 3)
        items = await collect(backend.complete(completion()))
        assert items == [Delta(text="12345678", finish_reason="stop"), Usage(3, 2)]


async def test_stream_answered_with_json_is_translated_whole(nursery: trio.Nursery) -> None:
    body = {"choices": [{"index": 0, "message": {"content": "x"}, "finish_reason": "stop"}]}
    url = await start_scripted(nursery, reply(http_response(200, orjson.dumps(body))))
    async with backend_for(url) as backend:
        items = await collect(backend.chat(chat(stream=True)))
    assert items == [Delta(text="x", finish_reason="stop"), Usage(6, 1)]


async def test_stream_without_done_but_finished_is_accepted(nursery: trio.Nursery) -> None:
    event = chunk([{"index": 0, "delta": {"content": "x"}, "finish_reason": "stop"}])
    # The second answer's last event lacks its blank line; the third ends with a
    # "[DONE]" line lacking it.
    unterminated = b"data: " + event + b"\n"
    answers = iter(
        [
            sse_head() + sse_chunk(event) + LAST_CHUNK,
            sse_head() + b"%x\r\n%s\r\n" % (len(unterminated), unterminated) + LAST_CHUNK,
            sse_head() + sse_chunk(event) + b"d\r\ndata: [DONE]\n\r\n" + LAST_CHUNK,
        ]
    )

    async def handler(request: ScriptedRequest, stream: trio.SocketStream) -> bool:
        await stream.send_all(next(answers))
        return True

    async with backend_for(await start_scripted(nursery, handler)) as backend:
        for _ in range(3):
            items = await collect(backend.chat(chat(stream=True)))
            assert items == [Delta(text="x", finish_reason="stop"), Usage(6, 1)]


async def test_done_then_slow_end_of_body_keeps_the_connection(nursery: trio.Nursery) -> None:
    stats = MockStats()

    async def handler(request: ScriptedRequest, stream: trio.SocketStream) -> bool:
        await stream.send_all(sse_head() + sse_chunk(chunk([STOP], usage={"prompt_tokens": 2})))
        await stream.send_all(sse_chunk(b"[DONE]"))
        await trio.lowlevel.checkpoint()
        await stream.send_all(LAST_CHUNK)
        return True

    async with backend_for(await start_scripted(nursery, handler, stats)) as backend:
        for _ in range(3):
            items = await collect(backend.chat(chat(stream=True)))
            assert items == [Delta(finish_reason="stop"), Usage(2, 0)]
    assert stats.accepted == 1


async def test_done_without_end_of_body_gives_up_after_a_while(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What follows [DONE] is sent once the client drains: nothing (the drain gives up
    at exactly ``response_drain_timeout``), far too much, or garbage (it gives up at once,
    with the clock stopped)."""
    stats = MockStats()
    drains = calls(monkeypatch, UpstreamBackend, "_drain")
    sent = trio.Semaphore(0)

    async def handler(request: ScriptedRequest, stream: trio.SocketStream) -> bool:
        tail = [b"", sse_chunk(b"x" * 300_000), b"zz\r\n"][stats.requests - 1]
        await stream.send_all(sse_head() + sse_chunk(chunk([STOP])) + sse_chunk(b"[DONE]"))
        await drains.acquire()
        await stream.send_all(tail)
        sent.release()
        await trio.sleep_forever()
        return False  # pragma: no cover

    async with backend_for(await start_scripted(nursery, handler, stats)) as backend:

        def stream() -> Awaitable[list[Item]]:
            return collect(backend.chat(chat(stream=True)))

        drained = DRAIN_SECONDS
        assert await finishes_at(mock_clock, drained, stream, sent.acquire) == [
            STOPPED,
            Usage(6, 0),
        ]
        for _ in range(2):
            assert await finishes_untimed(stream, sent.acquire) == [STOPPED, Usage(6, 0)]
    assert stats.accepted == 3


# -- choices the upstream gets wrong -----------------------------------------------------------


def text_chunk(index: int, text: str) -> bytes:
    return chunk([{"index": index, "delta": {"content": text}, "finish_reason": None}])


@pytest.mark.parametrize("index", [1, 99_999_999])
async def test_a_choice_index_outside_n_is_an_invalid_response(
    nursery: trio.Nursery, index: int
) -> None:
    stream = sse_response([text_chunk(0, "a"), text_chunk(index, "b"), chunk([STOP]), b"[DONE]"])
    whole = http_response(200, orjson.dumps({"choices": [WHOLE, {**WHOLE, "index": index}]}))
    url = await start_scripted(nursery, replies(stream, whole))
    async with backend_for(url) as backend:
        for request in (chat(stream=True), chat()):
            with pytest.raises(BackendError, match="invalid response") as caught:
                await collect(backend.chat(request))
            assert caught.value.code == "backend_error"


async def test_choice_indexes_of_completions_count_every_prompt(nursery: trio.Nursery) -> None:
    def answer(*indexes: int) -> bytes:
        choices = [{"index": i, "text": str(i), "finish_reason": "stop"} for i in indexes]
        return http_response(200, orjson.dumps({"choices": choices}))

    url = await start_scripted(nursery, replies(answer(0, 3), answer(0, 4)))
    request = CompletionRequest(model="ours", prompt=("a", "b"), n=2, raw={"prompt": ["a", "b"]})
    async with backend_for(url) as backend:
        items = await collect(backend.complete(request))
        assert [i.choice for i in items if isinstance(i, Delta)] == [0, 3]
        with pytest.raises(BackendError, match="invalid response"):
            await collect(backend.complete(request))


async def test_done_before_a_finish_reason_makes_it_stop(nursery: trio.Nursery) -> None:
    """As a whole body's choice without a finish reason reads: the upstream said
    the output was complete, it left out why it stopped."""
    events = [
        text_chunk(0, "a"),
        text_chunk(1, "b"),
        chunk([{"index": 1, "delta": {}, "finish_reason": "length"}]),
        chunk([{"index": 2, "delta": {"role": "assistant"}, "finish_reason": None}]),
        b"[DONE]",
    ]
    # The same without [DONE]: accepted because a finish reason came.
    url = await start_scripted(nursery, replies(sse_response(events), sse_response(events[:-1])))
    async with backend_for(url) as backend:
        for _ in range(2):
            items = await collect(backend.chat(chat(stream=True, n=3)))
            assert [i for i in items if isinstance(i, Delta) and i.finish_reason] == [
                Delta(choice=1, finish_reason="length"),
                Delta(choice=0, finish_reason="stop"),
                Delta(choice=2, finish_reason="stop"),
            ]


async def test_an_answer_without_choices_is_an_invalid_response(nursery: trio.Nursery) -> None:
    stream = sse_response([chunk([], usage={"prompt_tokens": 1}), b"[DONE]"])
    whole = http_response(200, b'{"choices": [], "usage": {"prompt_tokens": 1}}')
    url = await start_scripted(nursery, replies(stream, whole))
    async with backend_for(url) as backend:
        for request in (chat(stream=True), chat()):
            with pytest.raises(BackendError, match="invalid response"):
                await collect(backend.chat(request))


# -- logprobs ---------------------------------------------------------------------------------


def token(text: str, logprob: float, *alternatives: tuple[str, float]) -> dict[str, Any]:
    """A chat token's logprob as the spec has it (and OpenAI sends it)."""
    top = [{"token": t, "logprob": p, "bytes": list(t.encode())} for t, p in alternatives]
    return {"token": text, "logprob": logprob, "bytes": list(text.encode()), "top_logprobs": top}


async def test_chat_logprobs_are_carried_streamed_and_not(nursery: trio.Nursery) -> None:
    hi, there = token("hi", -0.1, ("hi", -0.1), ("yo", -2.5)), token(" there", -0.25)
    # What the upstream adds beyond the spec is left out, what it omits filled in.
    sent_hi = {**hi, "extra": 1}
    sent_there = {k: v for k, v in there.items() if k not in ("bytes", "top_logprobs")}
    expected_there = {**there, "bytes": None}
    stream = sse_response(
        [
            chunk([{"index": 0, "delta": {"role": "assistant"}, "logprobs": None}]),
            chunk([{"index": 0, "delta": {"content": "hi"}, "logprobs": {"content": [sent_hi]}}]),
            # A token whose text is empty still carries its logprob.
            chunk([{"index": 0, "delta": {"content": ""}, "logprobs": {"content": [sent_there]}}]),
            chunk([STOP]),
            b"[DONE]",
        ]
    )
    logprobs = {"content": [sent_hi, sent_there], "refusal": None}
    whole = {"index": 0, "message": {"content": "hi there"}, "logprobs": logprobs}
    url = await start_scripted(
        nursery, replies(stream, http_response(200, orjson.dumps({"choices": [whole]})))
    )
    async with backend_for(url) as backend:
        items = await collect(backend.chat(chat(stream=True, logprobs=True, top_logprobs=2)))
        assert items[:3] == [
            Delta(text="hi", logprobs={"content": [hi], "refusal": None}),
            Delta(logprobs={"content": [expected_there], "refusal": None}),
            Delta(finish_reason="stop"),
        ]
        # The objects, not just equal dicts: both keys present, nothing else.
        first = items[0]
        assert isinstance(first, Delta) and first.logprobs == {"content": [hi], "refusal": None}
        items = await collect(backend.chat(chat(logprobs=True)))
        assert items[0] == Delta(
            "hi there", 0, (), "stop", {"content": [hi, expected_there], "refusal": None}
        )


async def test_completion_logprobs_are_carried(nursery: trio.Nursery) -> None:
    legacy = {
        "tokens": [" once", " more"],
        "token_logprobs": [None, -0.5],
        "top_logprobs": [None, {" more": -0.5, " again": -1.5}],
        "text_offset": [0, 5],
    }
    answer = {"choices": [{"index": 0, "text": " once more", "logprobs": legacy}]}
    stream = sse_response(
        [
            orjson.dumps(
                {"choices": [{"index": 0, "text": " once", "logprobs": {"tokens": [" once"]}}]}
            ),
            orjson.dumps({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}),
            b"[DONE]",
        ]
    )
    url = await start_scripted(nursery, replies(http_response(200, orjson.dumps(answer)), stream))
    raw = {"model": "ours", "prompt": "p", "logprobs": 2}
    async with backend_for(url) as backend:
        request = CompletionRequest(model="ours", prompt="p", logprobs=2, raw=raw)
        items = await collect(backend.complete(request))
        assert items[0] == Delta(" once more", 0, (), "stop", legacy)
        request = CompletionRequest(
            model="ours", prompt="p", logprobs=2, stream=True, raw={**raw, "stream": True}
        )
        items = await collect(backend.complete(request))
        assert items[0] == Delta(
            " once",
            logprobs={
                "tokens": [" once"],
                "token_logprobs": [],
                "top_logprobs": [],
                "text_offset": [],
            },
        )


@pytest.mark.parametrize(
    "logprobs",
    [
        [1],
        {"content": "x"},
        {"content": [{"token": "a"}]},
        {"content": [{"token": "a", "logprob": "high"}]},
        {"content": [{"token": "a", "logprob": -1, "bytes": [300]}]},
        {"content": [{"token": "a", "logprob": -1, "top_logprobs": {}}]},
    ],
)
async def test_malformed_logprobs_are_an_invalid_response(
    nursery: trio.Nursery, logprobs: object
) -> None:
    answer = {"choices": [{**WHOLE, "logprobs": logprobs}]}
    url = await start_scripted(nursery, reply(http_response(200, orjson.dumps(answer))))
    async with backend_for(url) as backend:
        with pytest.raises(BackendError, match="invalid response"):
            await collect(backend.chat(chat(logprobs=True)))
        # Not asked for, what the upstream sends is not looked at.
        assert (await collect(backend.chat(chat())))[0] == Delta("ok", finish_reason="stop")


# -- garbage from upstream -------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        sse_response([b"{not json"]),
        sse_response([b"[1, 2]"]),
        sse_response([chunk([{"index": "0", "delta": {"content": "x"}}])]),
        sse_response([chunk([{"index": 0, "delta": {"content": 5}}])]),
        sse_response([chunk([{"index": 0, "delta": {"tool_calls": [{"index": "a"}]}}])]),
        sse_response([chunk([{"index": 0, "delta": {}, "finish_reason": 3}])]),
        sse_response([chunk([], usage={"prompt_tokens": -1})]),
        sse_response([chunk([], usage=[1])]),
        sse_response([orjson.dumps({"error": {"message": "CUDA out of memory at 0x7f"}})]),
        sse_response([chunk([{"index": 0, "delta": {"content": "x"}}])]),
        sse_head() + b'9\r\ndata: {"a\r\n' + LAST_CHUNK,
        sse_head() + sse_chunk(chunk([{"index": 0, "delta": {"content": "x"}}]))[:-7],
        http_response(200, b"{}", content_type="application/json"),
        http_response(200, b'{"choices": [{"message": {"content": ["x"]}}]}'),
    ],
    ids=[
        "invalid-json",
        "not-object",
        "bad-index",
        "bad-text",
        "bad-tool-call",
        "bad-finish",
        "bad-usage",
        "usage-not-object",
        "error-event",
        "no-finish-no-done",
        "partial-line",
        "truncated-body",
        "json-without-choices",
        "json-bad-content",
    ],
)
async def test_garbage_streams_are_backend_errors(nursery: trio.Nursery, data: bytes) -> None:
    async def handler(request: ScriptedRequest, stream: trio.SocketStream) -> bool:
        await stream.send_all(data)
        return False

    async with backend_for(await start_scripted(nursery, handler)) as backend:
        with pytest.raises(BackendError) as info:
            await collect(backend.chat(chat(stream=True)))
    assert "CUDA" not in info.value.message
    assert info.value.status == 502


@pytest.mark.parametrize("body", [b"garbage", b'{"choices": "x"}', b'{"choices": [{"index": -1}]}'])
async def test_garbage_non_stream_bodies_are_backend_errors(
    nursery: trio.Nursery, body: bytes
) -> None:
    url = await start_scripted(nursery, reply(http_response(200, body)))
    async with backend_for(url) as backend:
        with pytest.raises(BackendError):
            await collect(backend.chat(chat()))


# -- error mapping ----------------------------------------------------------------------------


def error_body(message: str, **fields: Any) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": "invalid_request_error", **fields}})


@pytest.mark.parametrize(
    ("status", "body", "headers", "expected", "message", "param", "code"),
    [
        (
            400,
            error_body("bad temperature", param="temperature", code="invalid_value"),
            (),
            InvalidRequestError,
            "bad temperature",
            "temperature",
            "invalid_value",
        ),
        (
            404,
            error_body("The model `their-model` does not exist", code=404),
            (),
            NotFoundError,
            "The model `ours` does not exist",
            "model",
            "model_not_found",
        ),
        (
            404,
            b"<html>Not Found</html>",
            (),
            BackendError,
            "answered with HTTP 404",
            None,
            "backend_error",
        ),
        (
            422,
            orjson.dumps({"object": "error", "message": "field required", "param": "x"}),
            (),
            InvalidRequestError,
            "field required",
            "x",
            None,
        ),
        (
            400,
            orjson.dumps({"error": "plain string"}),
            (),
            InvalidRequestError,
            "plain string",
            None,
            None,
        ),
        (400, b"[]", (), InvalidRequestError, "rejected", None, None),
        (
            413,
            error_body("too big"),
            (),
            RequestTooLargeError,
            "too big",
            None,
            "request_too_large",
        ),
        (
            401,
            error_body("Incorrect API key provided: sk-abc"),
            (),
            BackendError,
            "rejected our credentials",
            None,
            "backend_error",
        ),
        (403, b"", (), BackendError, "rejected our credentials", None, "backend_error"),
        (
            429,
            error_body("Rate limit reached for org-secret"),
            (("retry-after-ms", "1500"),),
            BackendUnavailableError,
            "busy",
            None,
            "upstream_busy",
        ),
        (
            500,
            error_body("Traceback (most recent call last): secret"),
            (),
            BackendError,
            "failed (HTTP 500)",
            None,
            "backend_error",
        ),
        (
            503,
            b"",
            (("retry-after", "7"),),
            BackendUnavailableError,
            "unavailable",
            None,
            "backend_unavailable",
        ),
        (504, b"", (), BackendTimeoutError, "timed out", None, "backend_timeout"),
        (418, b"", (), BackendError, "HTTP 418", None, "backend_error"),
    ],
)
async def test_upstream_status_mapping(
    nursery: trio.Nursery,
    status: int,
    body: bytes,
    headers: tuple[tuple[str, str], ...],
    expected: type[OpenAIError],
    message: str,
    param: str | None,
    code: str | None,
) -> None:
    url = await start_scripted(nursery, reply(http_response(status, body, headers=headers)))
    async with backend_for(url, upstream_models={"ours": "their-model"}) as backend:
        for request in (chat(), chat(stream=True)):
            with pytest.raises(OpenAIError) as info:
                await collect(backend.chat(request))
            error = info.value
            assert type(error) is expected
            assert message in error.message
            assert (error.param, error.code) == (param, code)
            assert "secret" not in error.message
            assert isinstance(error.__cause__, UpstreamError)
            assert error.__cause__.status == status


async def test_refused_port_is_unavailable(closed_port: int) -> None:
    async with backend_for(f"http://127.0.0.1:{closed_port}/v1") as backend:
        with pytest.raises(BackendUnavailableError) as info:
            await collect(backend.chat(chat(stream=True)))
        assert info.value.retry_after == 1.0
        with pytest.raises(BackendUnavailableError):
            await backend.check_ready()


async def test_timeouts(
    nursery: trio.Nursery,
    mock_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    arrived = trio.Semaphore(0)

    async def never(request: ScriptedRequest, stream: trio.SocketStream) -> bool:
        arrived.release()
        await trio.sleep_forever()
        return False  # pragma: no cover

    async with backend_for(await start_scripted(nursery, never), read_timeout=30) as backend:
        with pytest.raises(BackendTimeoutError, match="did not answer"):
            await finishes_at(
                mock_clock, 30, lambda: collect(backend.chat(chat(stream=True))), arrived.acquire
            )
        with pytest.raises(BackendTimeoutError):
            await finishes_at(
                mock_clock, 30, lambda: collect(backend.complete(completion())), arrived.acquire
            )
        with pytest.raises(BackendTimeoutError):
            await finishes_at(mock_clock, 5.0, backend.check_ready, arrived.acquire)

    async def hang(host: str, port: int) -> trio.SocketStream:
        await trio.sleep_forever()
        raise AssertionError  # pragma: no cover

    # No socket from here on: the clock may jump by itself.
    mock_clock.autojump_threshold = 0
    monkeypatch.setattr(trio, "open_tcp_stream", hang)
    async with backend_for("http://127.0.0.1:9/v1") as backend:
        with pytest.raises(BackendTimeoutError, match="Connecting"):
            await collect(backend.chat(chat()))


# -- cancellation --------------------------------------------------------------------------------


def first_piece_then_wait(closed: trio.Event) -> Handler:
    async def handler(request: ScriptedRequest, stream: trio.SocketStream) -> bool:
        await stream.send_all(
            sse_head() + sse_chunk(chunk([{"index": 0, "delta": {"content": "a"}}]))
        )
        with contextlib.suppress(trio.BrokenResourceError):
            while await stream.receive_some():
                pass  # pragma: no cover
        closed.set()
        return False

    return handler


async def test_cancellation_closes_the_upstream_connection(nursery: trio.Nursery) -> None:
    closed = trio.Event()
    async with backend_for(await start_scripted(nursery, first_piece_then_wait(closed))) as backend:
        generation = backend.chat(chat(stream=True))
        with trio.CancelScope() as scope:
            assert await generation.__anext__() == Delta(text="a")
            scope.cancel()
            await generation.__anext__()
        await closed.wait()


async def test_aclose_after_first_piece_closes_the_upstream_connection(
    nursery: trio.Nursery,
) -> None:
    closed = trio.Event()
    async with backend_for(await start_scripted(nursery, first_piece_then_wait(closed))) as backend:
        generation = backend.chat(chat(stream=True))
        assert await generation.__anext__() == Delta(text="a")
        await generation.aclose()
        await closed.wait()


# -- embeddings and readiness ---------------------------------------------------------------------


async def test_embeddings_float_and_base64(nursery: trio.Nursery) -> None:
    vector = (0.5, -0.25, 0.125, 1.0, 0.0, -1.0, 0.75, 0.0625)
    async with backend_for(await start_mock(nursery)) as backend:
        raw = {"model": "ours", "input": ["a", "b"]}
        result = await backend.embed(EmbeddingRequest(model="ours", input=("a", "b"), raw=raw))
        assert result == EmbeddingResult(vectors=(vector, vector), usage=Usage(6))
        raw = {"model": "ours", "input": "a", "encoding_format": "base64"}
        request = EmbeddingRequest(model="ours", input="a", encoding_format="base64", raw=raw)
        assert (await backend.embed(request)).vectors == (vector,)


async def test_replies_over_the_limits_are_a_clear_502(nursery: trio.Nursery) -> None:
    vectors = {"data": [{"index": 0, "embedding": [0.5] * 400}], "usage": {"prompt_tokens": 1}}
    answer = orjson.dumps(
        {"choices": [{"index": 0, "message": {"content": "x" * 3000}, "finish_reason": "stop"}]}
    )

    async def handler(request: ScriptedRequest, stream: trio.SocketStream) -> bool:
        embeddings = request.path.endswith("/embeddings")
        await stream.send_all(http_response(200, orjson.dumps(vectors) if embeddings else answer))
        return True

    url = await start_scripted(nursery, handler)
    limits = {"max_response_bytes": 2000, "max_embeddings_response_bytes": 4000}
    async with backend_for(url, **limits) as backend:
        for request in (chat(), chat(stream=True)):  # a stream answered with JSON too
            with pytest.raises(BackendError) as caught:
                await collect(backend.chat(request))
            assert caught.value.code == "backend_error"
            assert caught.value.message == (
                "The upstream model server's reply is larger than the 2000 bytes "
                "this gateway accepts."
            )
        # Embeddings have their own, larger limit: 2,000 bytes pass it.
        raw = {"model": "ours", "input": "a"}
        result = await backend.embed(EmbeddingRequest(model="ours", input="a", raw=raw))
        assert len(result.vectors[0]) == 400
    async with backend_for(url, max_embeddings_response_bytes=1000) as backend:
        with pytest.raises(BackendError, match="larger than the 1000 bytes"):
            await backend.embed(EmbeddingRequest(model="ours", input="a", raw=raw))


async def test_embeddings_order_estimate_and_errors(nursery: trio.Nursery) -> None:
    packed = base64.b64encode(struct.pack("<2f", 1.0, 2.0)).decode()
    answers = iter(
        [
            http_response(
                200,
                orjson.dumps(
                    {
                        "data": [
                            {"index": 1, "embedding": [3, 4.5]},
                            {"index": 0, "embedding": packed},
                        ]
                    }
                ),
            ),
            http_response(200, orjson.dumps({"data": [{"index": 0, "embedding": [1.0]}]})),
            http_response(200, orjson.dumps({"data": [{"embedding": ["x"]}, {"embedding": [1]}]})),
            http_response(200, orjson.dumps({"data": [{"embedding": "@@"}, {"embedding": [1]}]})),
            http_response(400, error_body("input too long", param="input")),
        ]
    )

    async def handler(request: ScriptedRequest, stream: trio.SocketStream) -> bool:
        await stream.send_all(next(answers))
        return True

    request = EmbeddingRequest(
        model="ours", input=("abcdefgh", "x"), raw={"model": "ours", "input": ["abcdefgh", "x"]}
    )
    async with backend_for(await start_scripted(nursery, handler)) as backend:
        result = await backend.embed(request)
        assert result == EmbeddingResult(vectors=((1.0, 2.0), (3.0, 4.5)), usage=Usage(3))
        for _ in range(3):
            with pytest.raises(BackendError):
                await backend.embed(request)
        with pytest.raises(InvalidRequestError, match="input too long"):
            await backend.embed(request)


async def test_check_ready(nursery: trio.Nursery) -> None:
    async with backend_for(await start_mock(nursery)) as backend:
        await backend.check_ready()
    url = await start_scripted(nursery, reply(http_response(500, b"")))
    async with backend_for(url) as backend:
        with pytest.raises(BackendError):
            await backend.check_ready()
