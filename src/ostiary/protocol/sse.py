"""Server-sent events, sans I/O: the encoder for our streamed responses and the
decoder for an upstream's ``text/event-stream`` bodies (the WHATWG SSE format).

:class:`SseEncoder` pre-renders the constant head of every chunk (``id``,
``object``, ``created``, ``model``) once per response, so that a chunk costs one
small ``orjson.dumps`` of its choices.

:class:`SseDecoder` turns arbitrarily split bytes into the ``data`` payloads of
complete events, the only field an OpenAI-style stream uses (``event``, ``id``,
``retry`` and comments are ignored). It works on whole buffers: everything a
``feed`` completes is decoded and split at once, with a fast path for the common
one-line ``data: ...`` event, so a receive holding twenty upstream chunks costs one
pass, not twenty.

The result never depends on how the bytes were split. Line endings may be ``\\n``,
``\\r\\n`` or ``\\r`` (a ``\\r\\n`` split across two feeds counts once). An event, in
bytes with its line endings normalized to ``\\n`` and not counting the blank line
that ends it, may be at most ``max_event_bytes``; a larger one, complete or still
arriving, raises :class:`~ostiary.protocol.errors.BackendError`, so memory stays
bounded whatever the upstream sends.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from .errors import BackendError, OpenAIError
from .generation import Delta, ToolCallDelta, Usage
from .responses import error_body, usage_dict

__all__ = ["DONE", "SseDecoder", "SseEncoder", "sse_error"]

DONE = b"data: [DONE]\n\n"

#: Default bound on one event's size: far above any OpenAI chunk.
DEFAULT_MAX_EVENT_BYTES = 1024 * 1024


def sse_error(error: OpenAIError) -> bytes:
    """An error event for a stream that has already started."""
    return b"data: " + error_body(error) + b"\n\n"


def _tool_call_delta(tc: ToolCallDelta) -> dict[str, Any]:
    out: dict[str, Any] = {"index": 0 if tc.index is None else tc.index}
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
                "logprobs": delta.logprobs,
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
            "logprobs": delta.logprobs,
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


class SseDecoder:
    """Incremental SSE decoder: ``feed`` bytes in, ``data`` payloads out."""

    __slots__ = ("_after_cr", "_buffer", "_max_event_bytes", "_started")

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        if max_event_bytes < 1:
            raise ValueError(f"max_event_bytes must be at least 1, got {max_event_bytes}")
        self._max_event_bytes = max_event_bytes
        #: Normalized bytes of the event in progress; never holds a blank line. It
        #: grows in place, so an event trickling in is copied once, not per feed.
        self._buffer = bytearray()
        #: The last byte fed was ``\r``, so a ``\n`` starting the next feed is its pair.
        self._after_cr = False
        self._started = False

    def feed(self, data: bytes) -> list[str]:
        """Add bytes; return the ``data`` of every event they complete, in order.

        Multi-line data is joined with ``\\n``. Raises :class:`BackendError` if an
        event exceeds ``max_event_bytes``. The cost is linear in the bytes fed:
        only the new bytes are searched for the end of an event.
        """
        if not data:
            return []
        if self._after_cr and data[0] == 0x0A:
            data = data[1:]
        self._after_cr = data.endswith(b"\r")
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buffer = self._buffer
        if buffer:
            # The buffer holds no blank line, so one can only start at its last byte.
            start = len(buffer) - 1
            buffer += data
            end = buffer.rfind(b"\n\n", start)
            if end < 0:
                self._check_partial(buffer)
                return []
            block = buffer[:end]
            del buffer[: end + 2]
            self._check_partial(buffer)
            return self._dispatch(block.rstrip(b"\n"))
        # A blank line with no event before it dispatches nothing: drop it here so
        # that the buffer holds only the event in progress.
        event = data.lstrip(b"\n")
        if len(event) != len(data):
            self._started = True  # the stream did not start with a BOM
        end = event.rfind(b"\n\n")
        if end < 0:
            self._check_partial(event)
            buffer += event
            return []
        rest = event[end + 2 :]
        self._check_partial(rest)
        buffer += rest
        return self._dispatch(event[:end].rstrip(b"\n"))

    def close(self) -> list[str]:
        """End of stream. An event whose lines are all complete but that lacks the
        final blank line is dispatched (lenient to servers that omit it); a stream
        that stops in the middle of a line raises :class:`BackendError` (the body
        was truncated). The decoder is then reset."""
        rest, self._buffer, self._after_cr = bytes(self._buffer), bytearray(), False
        if not rest:
            return []
        if not rest.endswith(b"\n"):
            raise BackendError(
                "The upstream model server ended its response in the middle of an event."
            )
        return self._dispatch(rest[:-1])

    def _check_partial(self, partial: bytes | bytearray) -> None:
        if len(partial) > self._max_event_bytes:
            self._too_large()

    def _too_large(self) -> None:
        self._buffer = bytearray()
        raise BackendError(
            f"The upstream model server sent a stream event larger than the "
            f"{self._max_event_bytes} bytes this gateway accepts."
        )

    def _dispatch(self, block: bytes | bytearray) -> list[str]:
        """Payloads of the events in ``block``: complete events separated by blank
        lines, without the blank lines that end the last one."""
        if len(block) >= self._max_event_bytes:
            limit = self._max_event_bytes
            for raw in block.split(b"\n\n"):
                if len(raw.lstrip(b"\n")) + 1 > limit:
                    self._too_large()
        text = block.decode("utf-8", "replace")
        if not self._started:
            self._started = True
            if text.startswith("\ufeff"):
                text = text[1:]
        events = text.split("\n\n")
        count = len(events) - 1
        # The usual case, settled in three C calls: every event is one "data: " line.
        if (
            text.startswith("data: ")
            and text.count("\n") == 2 * count
            and text.count("\n\ndata: ") == count
        ):
            return [event[6:] for event in events]
        payloads: list[str] = []
        for event in events:
            if event.startswith("data:") and "\n" not in event:
                value = event[5:]
                payloads.append(value[1:] if value.startswith(" ") else value)
            elif event:
                _parse_event(event, payloads)
        return payloads


def _parse_event(event: str, payloads: list[str]) -> None:
    """The general path: any mix of fields and comments. ``event`` holds no blank
    line after its first field (events were split at blank lines), so it is one
    event; a leading blank line parses as an ignored empty field name."""
    data: list[str] = []
    for line in event.split("\n"):
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        payloads.append("\n".join(data))
