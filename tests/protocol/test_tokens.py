"""Token-array embedding input becomes text for backends that take text."""

from __future__ import annotations

from collections.abc import Sequence

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ostiary.protocol.decoding import decode_embedding
from ostiary.protocol.errors import InvalidRequestError
from ostiary.protocol.request_limits import RequestLimits
from ostiary.protocol.requests import EmbeddingRequest
from ostiary.protocol.tokens import CL100K_TEXT_TOKENS, TokenCodec, embedding_as_text


class LetterCodec:
    """Token i is the letter chr(97 + i % 26); refuses, loudly, ids it should not get."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, ...]] = []

    def decode(self, ids: Sequence[int]) -> str:
        assert all(0 <= i < CL100K_TEXT_TOKENS for i in ids)
        self.calls.append(tuple(ids))
        return "".join(chr(97 + i % 26) for i in ids)

    def count(self, text: str, limit: int) -> int:
        return min(len(text), limit + 1)


def embedding(value: object) -> EmbeddingRequest:
    return decode_embedding(orjson.dumps({"model": "e", "input": value}), RequestLimits())


def test_token_arrays_become_text() -> None:
    codec: TokenCodec = LetterCodec()
    req = embedding_as_text(embedding([[7, 4, 11], [100255]]), codec)
    assert req.input == ("hel", "z")
    assert req.raw == {"model": "e", "input": ["hel", "z"]}
    assert req.inputs() == ("hel", "z")
    single = embedding_as_text(embedding([0, 1]), codec)
    assert (single.input, single.raw["input"], single.inputs()) == ("ab", "ab", ("ab",))


def test_text_is_left_as_it_is() -> None:
    codec = LetterCodec()
    for value in ("hello", ["a", "b"]):
        req = embedding(value)
        assert embedding_as_text(req, codec) is req
    assert codec.calls == []


@pytest.mark.parametrize(
    ("value", "param"),
    [
        ([[1, 2], [3, 100256]], "input[1][1]"),
        ([[1], [-1]], "input[1][0]"),
        ([1, 2, 100257], "input[2]"),
        ([[2**63 - 1]], "input[0][0]"),
        ([[5, 200_000, 3]], "input[0][1]"),
    ],
)
def test_ids_outside_cl100k_text_are_refused_before_any_decoding(value: object, param: str) -> None:
    codec = LetterCodec()
    with pytest.raises(InvalidRequestError) as info:
        embedding_as_text(embedding(value), codec)
    assert (info.value.status, info.value.param, info.value.code) == (400, param, "invalid_value")
    assert codec.calls == []


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.lists(st.integers(-5, CL100K_TEXT_TOKENS + 5), min_size=1, max_size=5),
        min_size=1,
        max_size=4,
    )
)
def test_any_token_arrays_decode_or_get_a_400(value: list[list[int]]) -> None:
    codec = LetterCodec()
    try:
        req = embedding_as_text(embedding(value), codec)
    except InvalidRequestError as error:
        assert error.param is not None and error.param.startswith("input[")
    else:
        assert all(isinstance(text, str) for text in req.inputs())
        assert [len(text) for text in req.inputs()] == [len(ids) for ids in value]
