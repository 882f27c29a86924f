"""Strict mode, sans I/O: a model's output checked against the client's schemas
before the response says it is finished.

A tool with ``strict: true`` promises the client that the arguments of every call
to it satisfy its ``parameters``; a ``response_format`` of type ``json_schema`` with
``strict: true`` promises the same of the content. The model's output is data, and
a small model's data can be wrong, so the promise is checked, not assumed:
:class:`StrictOutput` sits after the tool-call normalizer, keeps each choice's
content (bounded) and holds back each choice's finish reason; at the end it checks
every choice and only then lets the finish reasons out. Output that fails is an
:class:`InvalidModelOutput` (502 ``invalid_model_output``): a non-streamed
request gets that error instead of a response; a stream, which has sent the
output so far, ends with that error event where the chunk with the finish reason
and ``[DONE]`` would have come. A choice that ended for ``length`` or
``content_filter`` is not checked: its finish reason already says it is cut.

The schema check itself is the runtime's :class:`~.tool_validation.SchemaChecker`
(it needs a JSON Schema library); without one, output still has to parse as JSON.
The content checked is bounded by ``max_strict_output_bytes``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import orjson

from .errors import BackendError
from .generation import Delta
from .request_limits import RequestLimits
from .requests import ChatCompletionRequest, ToolCall
from .tool_validation import SchemaChecker

__all__ = ["InvalidModelOutput", "StrictOutput"]

#: Finish reasons that say the output is cut short: nothing to hold it to.
_CUT = frozenset({"length", "content_filter"})


class InvalidModelOutput(BackendError):
    """The model's output breaks the schema strict mode promised the client."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="invalid_model_output")


class StrictOutput:
    """One exchange's strict-mode checks; see the module docstring. Build it with
    :meth:`of`, which gives None when the request asks for no strict output."""

    __slots__ = (
        "_checker",
        "_declared",
        "_limit",
        "_reasons",
        "_schema",
        "_sizes",
        "_text",
        "_tools",
    )

    def __init__(
        self,
        tools: Mapping[str, Mapping[str, Any]],
        declared: frozenset[str],
        schema: Mapping[str, Any] | None,
        checker: SchemaChecker | None,
        limit: int,
    ) -> None:
        self._tools = tools
        self._declared = declared
        self._schema = schema
        self._checker = checker
        self._limit = limit
        self._text: dict[int, list[str]] = {}
        self._sizes: dict[int, int] = {}
        self._reasons: dict[int, str] = {}

    @classmethod
    def of(
        cls, call: ChatCompletionRequest, checker: SchemaChecker | None, limits: RequestLimits
    ) -> StrictOutput | None:
        choice = call.tool_choice
        tools: dict[str, Mapping[str, Any]] = {}
        declared: frozenset[str] = frozenset()
        if call.tools and not (choice is not None and choice.mode == "none"):
            declared = frozenset(t.function.name for t in call.tools)
            for tool in call.tools:
                fn = tool.function
                if fn.strict is True:
                    tools[fn.name] = fn.parameters if fn.parameters is not None else {}
        schema: Mapping[str, Any] | None = None
        fmt = call.response_format
        spec = fmt.json_schema if fmt is not None else None
        if spec is not None and spec.get("strict") is True:
            found = spec.get("schema")
            schema = found if isinstance(found, dict) else {}
        if not tools and schema is None:
            return None
        return cls(tools, declared, schema, checker, limits.max_strict_output_bytes)

    def feed(self, deltas: Iterable[Delta]) -> list[Delta]:
        """``deltas`` with their finish reasons held back (a delta left empty is
        dropped). Raises :class:`InvalidModelOutput` when a choice's content
        outgrows what strict mode checks."""
        out: list[Delta] = []
        for delta in deltas:
            if delta.text and self._schema is not None:
                parts = self._text.setdefault(delta.choice, [])
                parts.append(delta.text)
                size = self._sizes[delta.choice] = self._sizes.get(delta.choice, 0) + len(
                    delta.text
                )
                if size > self._limit:
                    raise InvalidModelOutput(
                        f"Strict mode: the model's content: longer than the {self._limit} "
                        "characters it checks."
                    )
            if delta.finish_reason is None:
                out.append(delta)
                continue
            self._reasons[delta.choice] = delta.finish_reason
            if delta.text or delta.tool_calls or delta.logprobs is not None:
                out.append(attrs.evolve(delta, finish_reason=None))
        return out

    def finish(self, calls: Mapping[int, tuple[ToolCall, ...]]) -> list[Delta]:
        """Check every choice (``calls``: each choice's final tool calls); the held
        finish reasons, or :class:`InvalidModelOutput`."""
        for choice in sorted(self._text.keys() | self._reasons.keys() | calls.keys()):
            if self._reasons.get(choice) in _CUT:
                continue
            made = calls.get(choice, ())
            for call in made:
                self._check_call(call)
            if self._schema is not None and not made:
                text = "".join(self._text.get(choice, ()))
                self._check("the model's content", text, self._schema)
        return [Delta("", choice, (), reason) for choice, reason in sorted(self._reasons.items())]

    def _check_call(self, call: ToolCall) -> None:
        name = call.function.name
        if self._tools and name not in self._declared:
            raise InvalidModelOutput(
                f"Strict mode: the model called {name!r}, which is not one of 'tools'."
            )
        schema = self._tools.get(name)
        if schema is not None:
            self._check(f"the arguments of the call to {name!r}", call.function.arguments, schema)

    def _check(self, what: str, text: str, schema: Mapping[str, Any]) -> None:
        if len(text) > self._limit:
            raise InvalidModelOutput(
                f"Strict mode: {what}: longer than the {self._limit} characters it checks."
            )
        try:
            instance = orjson.loads(text)
        except orjson.JSONDecodeError:
            raise InvalidModelOutput(f"Strict mode: {what}: not JSON.") from None
        verdict = self._checker.validate(instance, schema) if self._checker is not None else None
        if verdict is not None:
            raise InvalidModelOutput(f"Strict mode: {what}: does not match the schema: {verdict}")
