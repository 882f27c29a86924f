"""The cl100k codec the runtime loads once and hands to the core."""

from __future__ import annotations

import orjson
import pytest

from ostiary.protocol.decoding import decode_embedding
from ostiary.protocol.errors import InvalidRequestError
from ostiary.protocol.request_limits import RequestLimits
from ostiary.protocol.tokens import CL100K_TEXT_TOKENS, TokenCodec, embedding_as_text
from ostiary.runtime.tokenizer import Cl100kCodec, load_cl100k


@pytest.fixture(scope="module")
def codec() -> Cl100kCodec:
    return load_cl100k()


def test_langchains_default_input_becomes_text(codec: Cl100kCodec) -> None:
    # What LangChain's OpenAIEmbeddings sends for ["hello world", "Hello"].
    body = {"model": "e", "input": [[15339, 1917], [9906]]}
    req = decode_embedding(orjson.dumps(body), RequestLimits())
    as_codec: TokenCodec = codec
    assert embedding_as_text(req, as_codec).inputs() == ("hello world", "Hello")


def test_ids_at_the_edges(codec: Cl100kCodec) -> None:
    assert codec.decode([]) == ""
    assert codec.decode([CL100K_TEXT_TOKENS - 1]) == " Conveyor"
    for bad in ([CL100K_TEXT_TOKENS], [100257], [-1], [10**9], [2**63 - 1]):
        with pytest.raises(ValueError, match=r"0\.\.100255"):
            codec.decode(bad)
    body = {"model": "e", "input": [[15339, 100257]]}
    with pytest.raises(InvalidRequestError) as info:
        embedding_as_text(decode_embedding(orjson.dumps(body), RequestLimits()), codec)
    assert info.value.param == "input[0][1]"


def test_a_character_cut_in_two_is_replaced(codec: Cl100kCodec) -> None:
    ids = [9468, 236, 231]  # "🎉" is three byte tokens
    assert codec.decode(ids) == "🎉"
    assert codec.decode(ids[:2]) == "\ufffd"
    assert codec.decode(ids[1:]).startswith("\ufffd")


def test_count_stops_past_the_limit(codec: Cl100kCodec) -> None:
    assert codec.count("hello world", 10) == 2
    assert codec.count("", 0) == 0
    assert codec.count("hello world", 1) > 1
    long = "word " * 50_000  # one token per word, and more than one piece
    assert 50_000 <= codec.count(long, 10**6) <= 50_000 + 7
    assert 1000 < codec.count(long, 1000) <= 50_000


def test_without_the_private_counter_the_public_encoder_counts_the_same(
    codec: Cl100kCodec,
) -> None:
    """A bpe-openai whose private bindings changed still counts, through the public
    encoder: the same figures as the Rust counter gives."""
    public = Cl100kCodec(codec._encoding, counter=None)
    for text in ("hello world", "", "naïve café ☕ " * 40, "\udcff lone surrogate"):
        for limit in (0, 1, 5, 10_000):
            assert public.count(text, limit) == codec.count(text, limit)
