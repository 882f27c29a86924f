"""What backends produce, normalized: the one vocabulary between backends and core.

A generation is an async stream of :class:`Delta` (text or tool-call pieces for one
choice, possibly with a finish reason) ending with one :class:`Usage`. Embeddings are
an :class:`EmbeddingResult`.
"""

from __future__ import annotations

from typing import Any

import attrs

__all__ = ["Delta", "EmbeddingResult", "FinishReason", "Logprobs", "ToolCallDelta", "Usage"]

#: The finish reasons OpenAI's API defines.
FinishReason = str
FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter", "function_call"})


@attrs.frozen
class ToolCallDelta:
    """A piece of one tool call, the shape every backend produces.

    ``index`` says which call of the choice the piece belongs to (calls of one
    choice may interleave); ``None`` when the upstream sent none (the normalizer
    then goes by the order of the pieces, :mod:`ostiary.protocol.toolcalls`). The
    first piece of a call carries its ``id`` and ``name``; later pieces carry only
    ``arguments`` fragments, which concatenate, in order, to the call's JSON
    arguments. A backend that gets a call whole (Ollama)
    yields one piece with all four. The choice's last :class:`Delta` has
    ``finish_reason="tool_calls"``. Backends that receive quirky upstream shapes
    (names repeated, ids late or missing, arguments sent whole at the end) hand them
    on as they come: making them regular is the core's job, in one place, not each
    backend's.
    """

    index: int | None
    id: str | None = None
    name: str | None = None
    arguments: str = ""


#: The log probabilities of a piece's tokens, in OpenAI's shape and checked by the
#: backend that made it: for chat ``{"content": [...] | None, "refusal": [...] |
#: None}`` (lists of ``{token, logprob, bytes, top_logprobs}``); for completions
#: ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``, four lists.
#: The pieces of one choice concatenate, list by list.
Logprobs = dict[str, Any]


@attrs.frozen
class Delta:
    """New output for choice ``choice``; ``finish_reason`` set on its last piece;
    ``logprobs`` only when the request asked for them (and the model gave them)."""

    text: str = ""
    choice: int = 0
    tool_calls: tuple[ToolCallDelta, ...] = ()
    finish_reason: FinishReason | None = None
    logprobs: Logprobs | None = attrs.field(default=None, hash=False)


@attrs.frozen
class Usage:
    prompt_tokens: int
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@attrs.frozen
class EmbeddingResult:
    vectors: tuple[tuple[float, ...], ...]
    usage: Usage
