"""OpenAI response bodies from normalized backend output: completions collected
whole (:class:`ChoiceAccumulator`), embeddings, models, usage and error bodies.

Streamed responses are encoded by :class:`~ostiary.protocol.sse.SseEncoder`.
"""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Iterable
from typing import Any

import orjson

from .errors import MethodNotAllowedError, OpenAIError
from .generation import Delta, EmbeddingResult, Logprobs, Usage
from .requests import ChatCompletionRequest, CompletionRequest

__all__ = [
    "DEFAULT_RETRY_AFTER",
    "JSON_CONTENT",
    "MAX_RETRY_AFTER",
    "ChoiceAccumulator",
    "completion_body",
    "encode_embeddings",
    "encode_model",
    "encode_models",
    "error_body",
    "error_headers",
    "retry_after_headers",
    "usage_dict",
]


Header = tuple[bytes, bytes]
JSON_CONTENT: Header = (b"content-type", b"application/json")


def usage_dict(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def error_body(error: OpenAIError) -> bytes:
    return orjson.dumps(error.to_dict())


#: Seconds a 429 or 503 asks the client to wait when its cause names no time.
DEFAULT_RETRY_AFTER = 1.0
#: The longest wait ever asked for: a longer hint (an upstream's ``retry-after:
#: 1e306``) is clamped to it, and a hint that is not a finite number is ignored.
MAX_RETRY_AFTER = 3600.0


#: Our own rate limits know their waits exactly; a per-day bucket in debt may need
#: up to two days.
MAX_LIMIT_RETRY_AFTER = 2 * 86_400.0


def retry_after_headers(
    seconds: float | None, ceiling: float = MAX_RETRY_AFTER
) -> tuple[Header, Header]:
    """``retry-after-ms`` (the wait, in whole milliseconds rounded up) and
    ``retry-after`` (whole seconds, rounded up, so the two agree) for a wait of
    ``seconds``, clamped to (0, ceiling]."""
    if seconds is None or not math.isfinite(seconds):
        seconds = DEFAULT_RETRY_AFTER
    ms = max(1, math.ceil(min(max(seconds, 0.0), ceiling) * 1000))
    return (
        (b"retry-after", str(-(-ms // 1000)).encode()),
        (b"retry-after-ms", str(ms).encode()),
    )


def error_headers(error: OpenAIError, request_id: str) -> tuple[Header, ...]:
    """The headers of an error response: the one place that picks them."""
    headers: list[Header] = [JSON_CONTENT, (b"x-request-id", request_id.encode())]
    if error.status == 429:
        # Only Ostiary's own limits answer 429 (an upstream's becomes 503).
        headers.extend(retry_after_headers(error.retry_after, MAX_LIMIT_RETRY_AFTER))
    elif error.status == 503:
        headers.extend(retry_after_headers(error.retry_after))
    if error.status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="ostiary"'))
    elif isinstance(error, MethodNotAllowedError) and error.allow:
        headers.append((b"allow", ", ".join(error.allow).encode()))
    headers.extend(error.headers)
    return tuple(headers)


class ChoiceAccumulator:
    """Collects the pieces of each choice for a non-streamed response."""

    __slots__ = ("_finish", "_logprobs", "_text", "_tools")

    def __init__(self) -> None:
        self._logprobs: dict[int, Logprobs] = {}
        self._text: dict[int, list[str]] = {}
        self._tools: dict[int, dict[int, dict[str, Any]]] = {}
        self._finish: dict[int, str | None] = {}

    def add(self, delta: Delta) -> None:
        i = delta.choice
        self._text.setdefault(i, []).append(delta.text)
        if delta.tool_calls:
            calls = self._tools.setdefault(i, {})
            for tc in delta.tool_calls:
                index = 0 if tc.index is None else tc.index
                call = calls.get(index)
                if call is None:
                    call = calls[index] = {
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
        if delta.logprobs is not None:
            held = self._logprobs.get(i)
            if held is None:
                held = self._logprobs[i] = {}
            for key, values in delta.logprobs.items():
                if values is None:
                    held.setdefault(key, None)
                elif held.get(key) is None:
                    held[key] = list(values)
                else:
                    held[key].extend(values)

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
                    "logprobs": self._logprobs.get(i),
                    "finish_reason": self._finish.get(i) or "stop",
                }
            )
        return out

    def text_choices(self) -> list[dict[str, Any]]:
        return [
            {
                "index": i,
                "text": "".join(self._text.get(i, ())),
                "logprobs": self._logprobs.get(i),
                "finish_reason": self._finish.get(i) or "stop",
            }
            for i in self._indexes()
        ]


def completion_body(
    call: ChatCompletionRequest | CompletionRequest,
    response_id: str,
    created: int,
    collected: ChoiceAccumulator,
    usage: Usage,
) -> bytes:
    """The body of a non-streamed chat or text completion."""
    is_chat = isinstance(call, ChatCompletionRequest)
    body: dict[str, object] = {
        "id": response_id,
        "object": "chat.completion" if is_chat else "text_completion",
        "created": created,
        "model": call.model,
        "choices": collected.chat_choices() if is_chat else collected.text_choices(),
        "usage": usage_dict(usage),
    }
    return orjson.dumps(body)


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
