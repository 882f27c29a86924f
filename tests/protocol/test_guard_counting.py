"""How the guard counts a prompt for token reservations: text by text, only as far as
the limit needs, with a bounded memo per principal that never changes a figure."""

from __future__ import annotations

from collections.abc import Sequence

import orjson
from hypothesis import given
from hypothesis import strategies as st

from ostiary.protocol import guard as guard_module
from ostiary.protocol.decoding import decode_chat, decode_completion
from ostiary.protocol.guard import Guard
from ostiary.protocol.request_limits import RequestLimits
from ostiary.protocol.requests import ChatCompletionRequest


class WordCounter:
    """A TokenCodec counting words, which records every text it was asked about."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(map(str, ids))

    def count(self, text: str, limit: int) -> int:
        self.asked.append(text)
        words = len(text.split())
        return words if words <= limit else limit + 1


def chat(*contents: str) -> ChatCompletionRequest:
    messages = [{"role": "user", "content": c} for c in contents]
    body = orjson.dumps({"model": "m", "messages": messages})
    return decode_chat(body, RequestLimits())


def test_a_chat_is_counted_message_by_message_with_openai_s_overhead() -> None:
    counter = WordCounter()
    guard = Guard(tokens=counter)
    call = chat("one two three", "four five")
    # 3 + 2 words, 4 a message, 3 to prime the reply.
    assert guard._prompt_tokens(call, 1000, "key:a") == 5 + 2 * 4 + 3
    assert counter.asked == ["one two three", "four five"]


def test_a_conversation_s_earlier_turns_are_counted_once_per_principal() -> None:
    counter = WordCounter()
    guard = Guard(tokens=counter)
    first = guard._prompt_tokens(chat("system says", "hello"), 1000, "key:a")
    second = guard._prompt_tokens(chat("system says", "hello", "and more"), 1000, "key:a")
    assert second == first + 2 + 4
    assert counter.asked == ["system says", "hello", "and more"]
    # Another principal's same texts are counted afresh: a memo hit never tells one
    # tenant what another sent.
    guard._prompt_tokens(chat("system says"), 1000, "key:b")
    assert counter.asked[-1] == "system says" and len(counter.asked) == 4


def test_counting_stops_at_the_limit_and_a_count_cut_short_is_not_remembered() -> None:
    counter = WordCounter()
    guard = Guard(tokens=counter)
    long = " ".join(["w"] * 50)
    assert guard._prompt_tokens(chat(long, "never asked"), 20, "key:a") == 21
    assert counter.asked == [long]  # the second message is not counted at all
    # Under a larger limit the same text gets its exact count.
    assert guard._prompt_tokens(chat(long), 1000, "key:a") == 50 + 4 + 3
    assert counter.asked == [long, long]
    # Remembered now; a smaller limit still gets "more than the limit".
    assert guard._prompt_tokens(chat(long), 20, "key:a") == 21
    assert len(counter.asked) == 2


def test_completion_prompt_lists_count_strings_and_token_ids() -> None:
    guard = Guard(tokens=WordCounter())
    body = orjson.dumps({"model": "m", "prompt": [[1, 2, 3], [4]]})
    assert guard._prompt_tokens(decode_completion(body, RequestLimits()), 100, "k") == 4
    body = orjson.dumps({"model": "m", "prompt": ["a b", "c"]})
    assert guard._prompt_tokens(decode_completion(body, RequestLimits()), 100, "k") == 3
    assert guard._prompt_tokens(decode_completion(body, RequestLimits()), 1, "k") == 2


def test_the_memo_is_bounded() -> None:
    guard = Guard(tokens=WordCounter())
    for i in range(guard_module._MEMO_SIZE + 10):
        guard._count(f"text {i}", 100, "key:a")
    assert 0 < len(guard._memo) <= guard_module._MEMO_SIZE
    long = "x " * guard_module._MEMO_CHARS
    guard._memo.clear()
    assert guard._count(long, 10_000, "key:a") == guard_module._MEMO_CHARS
    assert not guard._memo  # long texts are counted, never kept


@given(
    st.lists(st.text(alphabet="ab ", max_size=12), min_size=1, max_size=6),
    st.integers(min_value=0, max_value=40),
    st.lists(st.sampled_from(["key:a", "key:b"]), min_size=1, max_size=4),
)
def test_the_memo_never_changes_a_count(texts: list[str], limit: int, whos: list[str]) -> None:
    remembering = Guard(tokens=WordCounter())
    for who in whos:
        fresh = Guard(tokens=WordCounter())
        call = chat(*texts)
        expected = fresh._prompt_tokens(call, limit, who)
        assert remembering._prompt_tokens(call, limit, who) == expected
