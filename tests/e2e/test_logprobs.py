"""Logprobs through the ``openai`` backend kind, end to end: a real Ostiary relaying
to :mod:`tests.e2e.quirky_upstream`, read with the strict SDK, every body checked
against the spec."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

from tests.e2e.conftest import Api
from tests.e2e.quirky_upstream import LOGPROBS_MODEL, LOGPROBS_TOKENS, quirky_upstream

if TYPE_CHECKING:
    from tests.e2e.conftest import Launcher, ServerProcess
    from tests.e2e.spec import OpenAPI

MESSAGES: list[Any] = [{"role": "user", "content": "Greet me"}]
TEXTS = [t for t, _ in LOGPROBS_TOKENS]
LOGPROBS = [p for _, p in LOGPROBS_TOKENS]


@pytest.fixture(scope="module")
def logprobs_api(launch_server: Launcher, openapi: OpenAPI) -> Iterator[Api]:
    with quirky_upstream() as port:
        server: ServerProcess = launch_server(
            "logprobs-relay",
            "[[backends]]\n"
            'name = "up"\n'
            'kind = "openai"\n'
            f'models = ["{LOGPROBS_MODEL}"]\n'
            f'base_url = "http://127.0.0.1:{port}/v1"\n'
            "connect_timeout = 2.0\n"
            "read_timeout = 10.0\n",
        )
        api = Api(server, openapi)
        yield api
        api.close()


def test_chat_logprobs_whole(logprobs_api: Api) -> None:
    response = logprobs_api.client.chat.completions.create(
        model=LOGPROBS_MODEL, messages=MESSAGES, logprobs=True, top_logprobs=2
    )
    body = logprobs_api.json("CreateChatCompletionResponse")
    logprobs = response.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None and logprobs.refusal is None
    assert [(t.token, t.logprob) for t in logprobs.content] == list(LOGPROBS_TOKENS)
    assert [len(t.top_logprobs) for t in logprobs.content] == [2, 2, 2]
    # The upstream's field beyond the spec does not pass.
    assert "extra" not in body["choices"][0]["logprobs"]["content"][0]


def test_chat_logprobs_streamed(logprobs_api: Api) -> None:
    stream = logprobs_api.client.chat.completions.create(
        model=LOGPROBS_MODEL, messages=MESSAGES, logprobs=True, top_logprobs=2, stream=True
    )
    tokens = [
        (t.token, t.logprob)
        for chunk in stream
        for choice in chunk.choices
        if choice.logprobs is not None and choice.logprobs.content
        for t in choice.logprobs.content
    ]
    logprobs_api.sse("CreateChatCompletionStreamResponse")
    assert tokens == list(LOGPROBS_TOKENS)


def test_completion_logprobs_whole_and_streamed(logprobs_api: Api) -> None:
    response = logprobs_api.client.completions.create(
        model=LOGPROBS_MODEL, prompt="Greet me", logprobs=2
    )
    logprobs_api.json("CreateCompletionResponse")
    logprobs = response.choices[0].logprobs
    assert logprobs is not None
    assert (logprobs.tokens, logprobs.token_logprobs) == (TEXTS, LOGPROBS)
    assert logprobs.text_offset == [0, 3, 5]
    # Streamed completions chunks carry finish_reason null, which the strict SDK
    # refuses (the spec's own gap, see spec.completion_chunk_schema): not strict here.
    client = logprobs_api.sdk(logprobs_api.server.key, strict=False)
    stream = client.completions.create(
        model=LOGPROBS_MODEL, prompt="Greet me", logprobs=2, stream=True
    )
    pieces = [c.choices[0].logprobs for c in stream if c.choices and c.choices[0].logprobs]
    logprobs_api.sse(logprobs_api.spec.COMPLETION_CHUNK)
    assert [p.tokens for p in pieces] == [[t] for t in TEXTS]
    assert [p.text_offset for p in pieces] == [[0], [3], [5]]
