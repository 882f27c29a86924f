"""The scripted backend behaves like a model where tests and benchmarks rely on it:
``stop`` and the token budget cut its output (issue 7, item 15)."""

from __future__ import annotations

from typing import Any

import attrs
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from ostiary.backends.base import Generation
from ostiary.backends.scripted import ScriptedBackend, ScriptedSettings
from ostiary.protocol.generation import Delta, Usage
from ostiary.protocol.requests import ChatCompletionRequest, ChatMessage, CompletionRequest

REPLY = "Hello from Ostiary's scripted backend. This reply is deterministic."
# 'Hello fro', 'm Ostiary', "'s script", 'ed backe', 'nd. This', ' reply i', ...
SCRIPT = ScriptedSettings(reply=REPLY, chunks=8)


def chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest(
        model="scripted", messages=(ChatMessage(role="user", content="Say hi"),), **fields
    )


async def run(generation: Generation) -> tuple[list[Delta], Usage]:
    items = [item async for item in generation]
    assert isinstance(items[-1], Usage), "exactly one Usage, last"
    deltas = [item for item in items[:-1] if isinstance(item, Delta)]
    assert len(deltas) == len(items) - 1
    return deltas, items[-1]


def text(deltas: list[Delta], choice: int = 0) -> str:
    return "".join(d.text for d in deltas if d.choice == choice)


def finish(deltas: list[Delta], choice: int = 0) -> str | None:
    reasons = [d.finish_reason for d in deltas if d.choice == choice and d.finish_reason]
    assert len(reasons) == 1, "one finish_reason per choice"
    assert deltas[-1].finish_reason is not None, "and it comes last"
    return reasons[0]


async def test_a_stop_inside_one_token_ends_the_text_before_it() -> None:
    deltas, usage = await run(ScriptedBackend(SCRIPT).chat(chat(stop=("script",))))
    assert text(deltas) == "Hello from Ostiary's "
    assert finish(deltas) == "stop"
    assert usage.completion_tokens == 3  # 'Hello fro', 'm Ostiary', "'s script"


async def test_a_stop_spanning_two_tokens_is_not_sent() -> None:
    # "from" is 'fro' + 'm': the first token must not leak "fro".
    deltas, usage = await run(ScriptedBackend(SCRIPT).chat(chat(stop=("from",))))
    assert text(deltas) == "Hello "
    assert finish(deltas) == "stop"
    assert usage.completion_tokens == 2
    assert [d.text for d in deltas] == ["Hello ", ""]


async def test_a_stop_spanning_three_tokens_counts_every_token_it_took() -> None:
    deltas, usage = await run(ScriptedBackend(SCRIPT).chat(chat(stop=("fro" + "m Ostiary's",))))
    assert text(deltas) == "Hello "
    assert usage.completion_tokens == 3
    assert [d.text for d in deltas] == ["Hello ", "", ""]


async def test_the_first_sequence_to_complete_stops_generation() -> None:
    request = chat(stop=("deterministic", "backend", "Ostiary"))
    deltas, usage = await run(ScriptedBackend(SCRIPT).chat(request))
    assert text(deltas) == "Hello from "
    assert usage.completion_tokens == 2


async def test_a_stop_at_the_very_start_gives_empty_text() -> None:
    deltas, usage = await run(ScriptedBackend(SCRIPT).chat(chat(stop=("Hell",))))
    assert text(deltas) == ""
    assert finish(deltas) == "stop"
    assert usage.completion_tokens == 1


async def test_a_stop_that_never_appears_changes_nothing() -> None:
    deltas, usage = await run(ScriptedBackend(SCRIPT).chat(chat(stop=("xyz", "Hello!"))))
    assert text(deltas) == REPLY
    assert finish(deltas) == "stop"
    assert usage.completion_tokens == 8


async def test_the_budget_ends_the_output_with_length() -> None:
    backend = ScriptedBackend(SCRIPT)
    for request in (chat(max_tokens=3), chat(max_completion_tokens=3, max_tokens=7)):
        deltas, usage = await run(backend.chat(request))
        assert text(deltas) == "Hello from Ostiary's script"
        assert finish(deltas) == "length"
        assert usage.completion_tokens == 3


async def test_a_budget_as_long_as_the_reply_is_a_natural_stop() -> None:
    deltas, usage = await run(ScriptedBackend(SCRIPT).chat(chat(max_tokens=8)))
    assert text(deltas) == REPLY
    assert finish(deltas) == "stop"
    assert usage.completion_tokens == 8


async def test_a_stop_beyond_the_budget_is_never_reached() -> None:
    deltas, usage = await run(ScriptedBackend(SCRIPT).chat(chat(max_tokens=2, stop=("script",))))
    assert text(deltas) == "Hello from Ostiary"
    assert finish(deltas) == "length"
    assert usage.completion_tokens == 2


async def test_a_stop_completed_by_the_last_budgeted_token_wins_over_length() -> None:
    deltas, usage = await run(ScriptedBackend(SCRIPT).chat(chat(max_tokens=2, stop=("from",))))
    assert text(deltas) == "Hello "
    assert finish(deltas) == "stop"
    assert usage.completion_tokens == 2


async def test_stop_and_budget_hold_for_every_choice_and_completions() -> None:
    backend = ScriptedBackend(SCRIPT)
    deltas, usage = await run(backend.chat(chat(n=2, stop=("from",))))
    for choice in (0, 1):
        assert text(deltas, choice) == "Hello "
        assert finish(deltas, choice) == "stop"
    assert usage.completion_tokens == 2 * 2
    request = CompletionRequest(model="scripted", prompt=("a", "b c"), stop=("Ostiary",))
    deltas, usage = await run(backend.complete(request))
    assert [text(deltas, c) for c in (0, 1)] == ["Hello from "] * 2
    assert usage == Usage(prompt_tokens=3, completion_tokens=2 * 2)
    deltas, usage = await run(backend.complete(attrs.evolve(request, stop=None, max_tokens=1)))
    assert finish(deltas, 1) == "length"
    assert usage.completion_tokens == 2


async def test_stream_and_non_stream_requests_give_the_same_output() -> None:
    backend = ScriptedBackend(SCRIPT)
    request = chat(stop=("s det", "backe"), max_tokens=6)
    streamed, streamed_usage = await run(backend.chat(attrs.evolve(request, stream=True)))
    whole, whole_usage = await run(backend.chat(request))
    assert streamed == whole
    assert streamed_usage == whole_usage
    assert text(whole) == "Hello from Ostiary's scripted "


def reference(
    pieces: tuple[str, ...], stop: tuple[str, ...], limit: int | None
) -> tuple[str, int, str]:
    """What a model server does, naively: after each token, look for every stop
    sequence in all the text so far."""
    budget = len(pieces) if limit is None else min(limit, len(pieces))
    produced = ""
    for count in range(1, budget + 1):
        produced += pieces[count - 1]
        hits = [i for s in stop if (i := produced.find(s)) >= 0]
        if hits:
            return produced[: min(hits)], count, "stop"
    return produced, budget, "length" if budget < len(pieces) else "stop"


@settings(max_examples=300, deadline=None)
@given(
    reply=st.text(alphabet="abc ", max_size=40),
    chunks=st.integers(1, 12),
    stop=st.lists(st.text(alphabet="abc ", min_size=1, max_size=5), max_size=4),
    limit=st.none() | st.integers(1, 14),
)
def test_the_cut_matches_a_model_that_rescans_after_every_token(
    reply: str, chunks: int, stop: list[str], limit: int | None
) -> None:
    backend = ScriptedBackend(ScriptedSettings(reply=reply, chunks=chunks))
    request = chat(stop=tuple(stop) or None, max_tokens=limit)
    deltas, usage = trio.run(run, backend.chat(request))
    want_text, want_tokens, want_finish = reference(backend._pieces, tuple(stop), limit)
    assert text(deltas) == want_text
    assert usage.completion_tokens == want_tokens == len(deltas)
    assert finish(deltas) == want_finish
