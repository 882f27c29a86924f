"""How one chat or text completion's backend output becomes its response.

A :class:`CompletionOutput` holds what turns normalized backend pieces into bytes:
an SSE encoder for a streamed request, a choice accumulator otherwise, and, when the
request has tools (or the output has tool calls all the same), the one tool-call
normalizer that both paths go through (so the streamed and the whole answer agree),
then, when the request asks for strict output, the
:class:`~.strict_output.StrictOutput` check. Broken tool-call output raises
:class:`~ostiary.protocol.errors.BackendError` from :meth:`feed` or :meth:`finish`;
output strict mode refuses, its ``InvalidModelOutput``.
"""

from __future__ import annotations

from collections.abc import Iterable

from .generation import Delta, Usage
from .request_limits import RequestLimits
from .requests import ChatCompletionRequest, CompletionRequest
from .responses import ChoiceAccumulator, completion_body
from .sse import SseEncoder
from .strict_output import StrictOutput
from .tool_validation import SchemaChecker
from .toolcalls import ToolCallNormalizer

__all__ = ["CompletionOutput"]


class CompletionOutput:
    __slots__ = (
        "_call",
        "_chat",
        "_collected",
        "_created",
        "_encoder",
        "_limits",
        "_request_id",
        "_response_id",
        "_strict",
        "_tool_calls",
    )

    def __init__(
        self,
        call: ChatCompletionRequest | CompletionRequest,
        request_id: str,
        created: int,
        limits: RequestLimits,
        checker: SchemaChecker | None = None,
    ) -> None:
        chat = self._chat = isinstance(call, ChatCompletionRequest)
        self._call = call
        self._created = created
        self._response_id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self._encoder: SseEncoder | None = None
        self._collected: ChoiceAccumulator | None = None
        if call.stream:
            self._encoder = SseEncoder(
                response_id=self._response_id,
                created=created,
                model=call.model,
                chat=chat,
                include_usage=call.include_usage,
            )
        else:
            self._collected = ChoiceAccumulator()
        self._request_id = request_id
        self._limits = limits
        self._tool_calls: ToolCallNormalizer | None = None
        if isinstance(call, ChatCompletionRequest) and call.tools:
            self._tool_calls = self._normalizer()
        self._strict: StrictOutput | None = None
        if isinstance(call, ChatCompletionRequest):
            self._strict = StrictOutput.of(call, checker, limits)

    def _normalizer(self) -> ToolCallNormalizer:
        return ToolCallNormalizer(
            f"call_{self._request_id}",
            max_calls=self._limits.max_output_tool_calls,
            max_argument_bytes=self._limits.max_output_argument_bytes,
        )

    @property
    def streaming(self) -> bool:
        return self._encoder is not None

    def feed(self, deltas: list[Delta]) -> bytes:
        """Take output; return the SSE bytes it makes (``b""``: nothing to send yet,
        and always for a request that is not streamed)."""
        calls = self._tool_calls
        if calls is None and self._chat and any(d.tool_calls for d in deltas):
            # Tool calls the request did not declare tools for (an upstream that
            # knows them some other way) are made regular all the same.
            calls = self._tool_calls = self._normalizer()
        if calls is not None:
            deltas = calls.feed(deltas)
        if self._strict is not None:
            deltas = self._strict.feed(deltas)
        return self._out(deltas)

    def _out(self, deltas: Iterable[Delta]) -> bytes:
        encoder = self._encoder
        if encoder is None:
            collected = self._collected
            assert collected is not None
            for delta in deltas:
                collected.add(delta)
            return b""
        deltas = list(deltas)
        return encoder.encode(deltas) if deltas else b""

    def finish(self, usage: Usage) -> bytes:
        """The end: a stream's last events (``[DONE]`` included), or the whole
        response body of a request that is not streamed."""
        calls = self._tool_calls
        tail = calls.finish() if calls is not None else []
        strict = self._strict
        if strict is not None:
            tail = strict.feed(tail)
            made = {} if calls is None else {c: calls.calls(c) for c in calls.choices()}
            tail += strict.finish(made)
        encoder = self._encoder
        if encoder is not None:
            return encoder.encode(tail) + encoder.usage(usage) + encoder.done()
        self._out(tail)
        collected = self._collected
        assert collected is not None
        return completion_body(self._call, self._response_id, self._created, collected, usage)
