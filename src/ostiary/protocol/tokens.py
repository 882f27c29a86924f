"""Token ids sent in place of text, for backends that take text.

OpenAI's embeddings (and completions) endpoints accept a prompt as cl100k token ids,
and some clients send them by default: LangChain's ``OpenAIEmbeddings`` splits and
encodes every input itself and sends ``input: [[15339, 1917]]``. A backend that takes
text (embedded, ollama, scripted) needs the text back, so the ids are decoded here
with a :class:`TokenCodec` the runtime loads once at start-up (the core never imports
a tokenizer). Every id is checked first: cl100k's text tokens are ``0 .. 100255``;
from 100256 up are special tokens or unassigned, and a tokenizer given one may raise
something that is not an ``Exception`` at all, or worse.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import attrs

from .errors import InvalidRequestError
from .requests import EmbeddingRequest

__all__ = ["CL100K_TEXT_TOKENS", "TokenCodec", "embedding_as_text"]

#: Token ids below this are cl100k's byte-pair tokens; the rest are not text.
CL100K_TEXT_TOKENS = 100_256


class TokenCodec(Protocol):
    """A tokenizer, loaded by the runtime and passed in."""

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` (each ``0 <= id < CL100K_TEXT_TOKENS``; callers check),
        with bytes that are not UTF-8 replaced by U+FFFD: a client that splits a long
        text into token chunks may cut one character in two."""
        ...

    def count(self, text: str, limit: int) -> int:
        """The number of tokens in ``text`` if it is at most ``limit``, else some
        number above ``limit`` (counting stops there)."""
        ...


def _check_ids(ids: Sequence[int], param: str) -> None:
    if not ids or (min(ids) >= 0 and max(ids) < CL100K_TEXT_TOKENS):
        return
    j = next(j for j, token in enumerate(ids) if not 0 <= token < CL100K_TEXT_TOKENS)
    raise InvalidRequestError(
        f"Invalid '{param}[{j}]': {ids[j]} is not a cl100k text token id (expected "
        f"0 to {CL100K_TEXT_TOKENS - 1}).",
        param=f"{param}[{j}]",
        code="invalid_value",
    )


def embedding_as_text(request: EmbeddingRequest, codec: TokenCodec) -> EmbeddingRequest:
    """``request`` with every token-array input decoded to text by ``codec``.

    A request of strings is returned as it is. Otherwise every id is checked before
    any is decoded (a 400 names the first bad one, ``input[i][j]``, or ``input[j]``
    for a single array of ids), and the result holds one string per input, in
    ``input`` and in ``raw`` alike. The request came through
    :func:`~ostiary.protocol.decoding.decode_embedding`, which bounds the ids
    (``[limits] max_token_ids``).
    """
    items = request.inputs()
    if all(isinstance(item, str) for item in items):
        return request
    single = isinstance(request.input[0], int)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            _check_ids(item, "input" if single else f"input[{i}]")
    texts = tuple(item if isinstance(item, str) else codec.decode(item) for item in items)
    if single:
        return attrs.evolve(request, input=texts[0], raw={**request.raw, "input": texts[0]})
    return attrs.evolve(request, input=texts, raw={**request.raw, "input": list(texts)})
