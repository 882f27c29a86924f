"""Function calling for the embedded model, by grammar-constrained generation.

SmolLM2's chat template knows no tools, and a 135M model asked in prose for a tool
call writes prose. So the model is told about the tools in a system message and its
output is held to a JSON Schema that llama.cpp turns into a grammar
(``response_format`` ``json_schema``): every token it samples keeps the output a
prefix of a valid document, so what it ends is well-formed and its arguments
satisfy each tool's ``parameters``.

The document, by ``tool_choice`` (and ``parallel_tool_calls``):

* a named function or ``required``: ``{"name": <one of the functions>,
  "arguments": <its parameters>}``, or with ``parallel_tool_calls: true``
  ``{"tool_calls": [<call>, ...]}`` (at least one);
* ``auto``: that, or ``{"content": <text>}``, the model's answer in words; but
  right after a ``tool`` message, plain text: the results are in, and a 135M model
  held to "call or answer" calls the same function again rather than answer.

The output is read whole when generation ends (llama.cpp does not pause between
tokens, so there is nothing to gain by parsing it midway): calls become one
:class:`ToolCallDelta` each (ids are the gateway's), ``content`` becomes text.
Output cut by ``max_tokens`` is passed on as the raw text it is, with
``finish_reason: "length"``; output that does not parse otherwise is a 502.

The conversation is rewritten for the template: an assistant message's tool calls
become its content (the same JSON document when the output is held to the plan,
a sentence otherwise), and a ``tool`` message becomes a user message carrying the
function's result. A parallel plan allows as many calls as there are functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from ostiary.protocol.errors import BackendError
from ostiary.protocol.generation import Delta, ToolCallDelta
from ostiary.protocol.requests import ChatCompletionRequest, ChatMessage, FunctionDefinition

__all__ = ["ToolPlan", "plan_tools", "template_messages"]

_ANY_OBJECT: dict[str, Any] = {"type": "object"}


def _call_schema(fn: FunctionDefinition) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "name": {"const": fn.name},
            "arguments": fn.parameters if fn.parameters is not None else _ANY_OBJECT,
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _describe(functions: Sequence[FunctionDefinition]) -> str:
    lines = []
    for fn in functions:
        params = orjson.dumps(fn.parameters or _ANY_OBJECT).decode()
        about = f" - {fn.description}" if fn.description else ""
        lines.append(f"- {fn.name}{about}. Arguments (JSON Schema): {params}")
    return "\n".join(lines)


class ToolPlan:
    """How one request with tools is run: the schema its output is held to, the
    messages the model reads, and the reading of what it wrote."""

    def __init__(
        self,
        functions: tuple[FunctionDefinition, ...],
        *,
        parallel: bool,
        auto: bool,
    ) -> None:
        self.functions = functions
        self.parallel = parallel
        self.auto = auto

    def schema(self) -> dict[str, Any]:
        calls = [_call_schema(fn) for fn in self.functions]
        call: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
        if self.parallel:
            call = {
                "type": "object",
                "properties": {
                    "tool_calls": {
                        "type": "array",
                        "items": call,
                        "minItems": 1,
                        "maxItems": len(self.functions),
                    }
                },
                "required": ["tool_calls"],
                "additionalProperties": False,
            }
        if not self.auto:
            return call
        content = {
            "type": "object",
            "properties": {"content": {"type": "string"}},
            "required": ["content"],
            "additionalProperties": False,
        }
        return {"anyOf": [call, content]}

    def instructions(self) -> str:
        shape = (
            '{"tool_calls": [{"name": <function>, "arguments": {...}}, ...]}'
            if self.parallel
            else '{"name": <function>, "arguments": {...}}'
        )
        text = (
            "You can call these functions:\n"
            f"{_describe(self.functions)}\n"
            f"To call a function, answer with the JSON object {shape}."
        )
        if self.auto:
            text += ' To answer the user in words instead, answer {"content": <your answer>}.'
        return text

    def messages(self, messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
        """The conversation as the template takes it, the tools explained first."""
        return template_messages(
            messages, self.instructions(), parallel=self.parallel, as_json=True
        )

    def read(self, text: str, reason: str | None) -> list[Delta]:
        """The deltas for the model's whole output ``text`` (see the module
        docstring)."""
        if reason == "length":
            return [Delta(text=text, finish_reason="length")]
        try:
            document = orjson.loads(text)
        except orjson.JSONDecodeError:
            raise BackendError("The embedded model's tool-call output is not JSON.") from None
        if not isinstance(document, dict):
            raise BackendError("The embedded model's tool-call output is not an object.")
        if "content" in document and isinstance(document["content"], str):
            return [Delta(text=document["content"], finish_reason=reason or "stop")]
        calls = document.get("tool_calls") if self.parallel else [document]
        if not isinstance(calls, list) or not calls:
            raise BackendError("The embedded model's output makes no tool call.")
        pieces = []
        for index, call in enumerate(calls):
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                raise BackendError("The embedded model's tool call has no function name.")
            arguments = orjson.dumps(call.get("arguments", {})).decode()
            pieces.append(ToolCallDelta(index, name=call["name"], arguments=arguments))
        return [Delta(tool_calls=tuple(pieces), finish_reason="tool_calls")]


def template_messages(
    messages: Sequence[ChatMessage],
    instructions: str | None = None,
    *,
    parallel: bool = False,
    as_json: bool = False,
) -> list[dict[str, Any]]:
    """``messages`` as a template without tools takes them (see the module
    docstring), ``instructions`` added to the system message (one is made). Past
    calls are the JSON document the plan asks for when ``as_json``; otherwise
    prose, so that a model answering in words does not imitate JSON."""
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}
    system = instructions
    for message in messages:
        role = "system" if message.role == "developer" else message.role
        if role == "system" and not out and system is instructions:
            system = message.text() + ("\n\n" + instructions if instructions else "")
            continue
        if message.tool_calls:
            calls = []
            for call in message.tool_calls:
                names[call.id] = call.function.name
                try:
                    arguments = orjson.loads(call.function.arguments or "{}")
                except orjson.JSONDecodeError:
                    arguments = call.function.arguments
                calls.append({"name": call.function.name, "arguments": arguments})
            document: Any = {"tool_calls": calls} if parallel or len(calls) > 1 else calls[0]
            content = (
                orjson.dumps(document).decode()
                if as_json
                else " ".join(
                    f"I called {c['name']} with {orjson.dumps(c['arguments']).decode()}."
                    for c in calls
                )
            )
            out.append({"role": "assistant", "content": content})
        elif role == "tool":
            name = names.get(message.tool_call_id or "", "the function")
            out.append({"role": "user", "content": f"Result of {name}: {message.text()}"})
        else:
            entry: dict[str, Any] = {"role": role, "content": message.text()}
            if message.name is not None:
                entry["name"] = message.name
            out.append(entry)
    if system is None:
        return out
    return [{"role": "system", "content": system}, *out]


def plan_tools(request: ChatCompletionRequest) -> ToolPlan | None:
    """The plan for a request whose tools the model is to use (None: no tools,
    ``tool_choice: "none"``, or ``auto`` right after a tool's result)."""
    tools = request.tools
    choice = request.tool_choice
    if not tools or (choice is not None and choice.mode == "none"):
        return None
    if (choice is None or choice.mode == "auto") and request.messages[-1].role == "tool":
        return None
    functions = tuple(t.function for t in tools)
    if choice is not None and choice.mode == "function":
        functions = tuple(fn for fn in functions if fn.name == choice.function)
    auto = choice is None or choice.mode == "auto"
    return ToolPlan(functions, parallel=request.parallel_tool_calls is True, auto=auto)
