"""Turning normalized backend output into OpenAI response bodies and SSE bytes.

Streams are encoded by :class:`SseEncoder`, which pre-renders the constant head of
every chunk (``id``, ``object``, ``created``, ``model``) once per response, so that a
chunk costs one small ``orjson.dumps`` of its choices.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterable
from typing import Any

import orjson

from .errors import OpenAIError
from .generation import Delta, EmbeddingResult, ToolCallDelta, Usage

__all__ = [
    "ChoiceAccumulator",
    "SseEncoder",
    "encode_embeddings",
    "encode_model",
    "encode_models",
    "error_body",
    "sse_error",
    "usage_dict",
]

DONE = b"data: [DONE]\n\n"


def usage_dict(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def error_body(error: OpenAIError) -> bytes:
    return orjson.dumps(error.to_dict())


def sse_error(error: OpenAIError) -> bytes:
    """An error event for a stream that has already started."""
    return b"data: " + error_body(error) + b"\n\n"


def _tool_call_delta(tc: ToolCallDelta) -> dict[str, Any]:
    out: dict[str, Any] = {"index": tc.index}
    if tc.id is not None:
        out["id"] = tc.id
        out["type"] = "function"
    function: dict[str, str] = {"arguments": tc.arguments}
    if tc.name is not None:
        function["name"] = tc.name
    out["function"] = function
    return out


class SseEncoder:
    """Encodes one streamed chat or text completion as ``data:`` events.

    ``chat=True`` gives ``chat.completion.chunk`` events (the first event of each
    choice carries ``role``); otherwise ``text_completion`` events.
    """

    __slots__ = ("_chat", "_head", "_include_usage", "_started", "_tail")

    def __init__(
        self, *, response_id: str, created: int, model: str, chat: bool, include_usage: bool
    ) -> None:
        self._chat = chat
        self._include_usage = include_usage
        obj = "chat.completion.chunk" if chat else "text_completion"
        head: dict[str, Any] = {
            "id": response_id,
            "object": obj,
            "created": created,
            "model": model,
        }
        # '{"id":...,"model":"m"' without its closing brace; chunks append the rest.
        self._head = b"data: " + orjson.dumps(head)[:-1] + b',"choices":'
        # The chat chunk schema has a nullable ``usage``; the completion one does not.
        self._tail = b',"usage":null}\n\n' if include_usage and chat else b"}\n\n"
        self._started: set[int] = set()

    def _choice(self, delta: Delta) -> dict[str, Any]:
        if not self._chat:
            return {
                "index": delta.choice,
                "text": delta.text,
                "logprobs": None,
                "finish_reason": delta.finish_reason,
            }
        body: dict[str, Any] = {}
        if delta.choice not in self._started:
            self._started.add(delta.choice)
            body["role"] = "assistant"
            body["content"] = delta.text
        elif delta.text or not delta.tool_calls:
            body["content"] = delta.text
        if delta.tool_calls:
            body["tool_calls"] = [_tool_call_delta(tc) for tc in delta.tool_calls]
        return {
            "index": delta.choice,
            "delta": body,
            "logprobs": None,
            "finish_reason": delta.finish_reason,
        }

    def encode(self, deltas: Iterable[Delta]) -> bytes:
        """One event per delta, concatenated."""
        head, tail = self._head, self._tail
        return b"".join(head + orjson.dumps([self._choice(d)]) + tail for d in deltas)

    def usage(self, usage: Usage) -> bytes:
        """The final usage event (``choices: []``), only when the client asked for it."""
        if not self._include_usage:
            return b""
        return self._head + b'[],"usage":' + orjson.dumps(usage_dict(usage)) + b"}\n\n"

    @staticmethod
    def done() -> bytes:
        return DONE


class ChoiceAccumulator:
    """Collects the pieces of each choice for a non-streamed response."""

    __slots__ = ("_finish", "_text", "_tools")

    def __init__(self) -> None:
        self._text: dict[int, list[str]] = {}
        self._tools: dict[int, dict[int, dict[str, Any]]] = {}
        self._finish: dict[int, str | None] = {}

    def add(self, delta: Delta) -> None:
        i = delta.choice
        self._text.setdefault(i, []).append(delta.text)
        if delta.tool_calls:
            calls = self._tools.setdefault(i, {})
            for tc in delta.tool_calls:
                call = calls.get(tc.index)
                if call is None:
                    call = calls[tc.index] = {
                        "id": tc.id or "",
                        "type": "function",
                        "function": {"name": tc.name or "", "arguments": ""},
                    }
                else:
                    if tc.id:
                        call["id"] = tc.id
                    if tc.name:
                        call["function"]["name"] += tc.name
                call["function"]["arguments"] += tc.arguments
        if delta.finish_reason is not None:
            self._finish[i] = delta.finish_reason

    def _indexes(self) -> list[int]:
        return sorted(self._text.keys() | self._finish.keys()) or [0]

    def chat_choices(self) -> list[dict[str, Any]]:
        out = []
        for i in self._indexes():
            text = "".join(self._text.get(i, ()))
            tools = self._tools.get(i)
            message: dict[str, Any] = {
                "role": "assistant",
                "content": text if text or not tools else None,
                "refusal": None,
            }
            if tools:
                message["tool_calls"] = [tools[k] for k in sorted(tools)]
            out.append(
                {
                    "index": i,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": self._finish.get(i) or "stop",
                }
            )
        return out

    def text_choices(self) -> list[dict[str, Any]]:
        return [
            {
                "index": i,
                "text": "".join(self._text.get(i, ())),
                "logprobs": None,
                "finish_reason": self._finish.get(i) or "stop",
            }
            for i in self._indexes()
        ]


def encode_embeddings(result: EmbeddingResult, *, model: str, encoding_format: str) -> bytes:
    data = []
    for i, vector in enumerate(result.vectors):
        embedding: Any
        if encoding_format == "base64":
            packed = struct.pack(f"<{len(vector)}f", *vector)
            embedding = base64.b64encode(packed).decode("ascii")
        else:
            embedding = vector
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    return orjson.dumps(
        {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {
                "prompt_tokens": result.usage.prompt_tokens,
                "total_tokens": result.usage.prompt_tokens,
            },
        }
    )


def encode_model(model_id: str, *, created: int, owned_by: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by}


def encode_models(models: Iterable[dict[str, Any]]) -> bytes:
    return orjson.dumps({"object": "list", "data": list(models)})
