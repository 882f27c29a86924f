"""A deterministic backend for tests and benchmarks.

It answers every chat or completion request with the same reply, cut into ``chunks``
pieces that arrive ``chunk_delay`` seconds apart, and embeds text into unit vectors
derived from a hash of it. Everything it reports is computed, not made up: a "token"
here is one chunk of the reply, and prompt tokens are whitespace-separated words.

It honours ``stop`` and the token budget as a model does. Generation stops after the
first token that completes a stop sequence, and the text ends where the earliest
sequence completed by that token begins (the sequence itself is never sent, also
when it spans two tokens): ``finish_reason`` "stop". A budget that runs out first
ends it with "length". Usage counts the tokens produced, the stopping one included.
The reply is known in advance, so the cut is found once per request with
``str.find`` (no text is held back while streaming and no chunk is re-scanned), and
stream and non-stream give the same text.

Function calling and structured output are computed too. A chat request with
``tools`` (and a ``tool_choice`` other than ``none``) gets tool calls instead of
text: the named function, or with ``auto`` / ``required`` the first one, or every
declared function in order when ``parallel_tool_calls`` is true; each call's
arguments are a small instance of its ``parameters`` (:mod:`.instances`), streamed
in three fragments after a first piece with the id and name; the finish reason is
``tool_calls``. With ``response_format`` ``json_object`` the reply is the JSON object
``{"reply": <the reply>}``; with ``json_schema``, a small instance of the schema;
either is cut into ``chunks`` pieces as the text would be.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
import struct
from collections.abc import Sequence

import attrs
import orjson
import trio

from ostiary.protocol.capabilities import RESPONSE_FORMATS, Capabilities
from ostiary.protocol.errors import InvalidRequestError
from ostiary.protocol.generation import Delta, EmbeddingResult, ToolCallDelta, Usage
from ostiary.protocol.requests import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    FunctionDefinition,
)

from .base import BackendSettings, ConfiguredBackend, Generation
from .instances import Unsatisfiable, instance_of

__all__ = ["ScriptedBackend", "ScriptedSettings"]


@attrs.frozen(kw_only=True)
class ScriptedSettings(BackendSettings):
    kind: str = "scripted"
    name: str = "scripted"
    models: tuple[str, ...] = ("scripted",)
    #: The reply every generation produces (cut into ``chunks`` pieces).
    reply: str = "Hello from Ostiary's scripted backend. This reply is deterministic."
    #: Pieces the reply is cut into; each counts as one completion token.
    chunks: int = attrs.field(default=8, validator=attrs.validators.ge(1))
    #: Seconds between pieces (0: as fast as the consumer takes them).
    chunk_delay: float = attrs.field(default=0.0, validator=attrs.validators.ge(0.0))
    #: Dimensions of the embeddings it returns.
    embedding_dimensions: int = attrs.field(default=384, validator=attrs.validators.ge(1))

    def capabilities(self, model: str) -> Capabilities:
        # Choices, token-id prompts and inputs, dimensions, tool calls and JSON
        # output are computed for real; logprobs it cannot give.
        return Capabilities(
            kind=self.kind_of(model),
            max_n=128,
            tools=True,
            response_formats=RESPONSE_FORMATS,
            token_prompts=True,
            token_inputs=True,
            dimensions=True,
        )


def _cut(text: str, pieces: int) -> tuple[str, ...]:
    """``text`` in ``pieces`` near-equal parts (empty parts when it is too short)."""
    size, extra = divmod(len(text), pieces)
    out = []
    start = 0
    for i in range(pieces):
        end = start + size + (1 if i < extra else 0)
        out.append(text[start:end])
        start = end
    return tuple(out)


def _words(text: str) -> int:
    return len(text.split())


class ScriptedBackend(ConfiguredBackend):
    """Deterministic output with configurable timing (see module docstring)."""

    _settings: ScriptedSettings

    def __init__(self, settings: ScriptedSettings) -> None:
        self._settings = settings
        self._pieces = _cut(settings.reply, settings.chunks)
        #: Where each piece ends in the reply.
        self._ends = tuple(itertools.accumulate(len(p) for p in self._pieces))

    async def __aenter__(self) -> ScriptedBackend:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    async def check_ready(self) -> None:
        return None

    def chat(self, request: ChatCompletionRequest) -> Generation:
        prompt = sum(_words(m.text()) for m in request.messages)
        calls = _called(request)
        if calls:
            return self._call_tools(prompt, request.n or 1, calls)
        fmt = request.response_format
        if fmt is not None and fmt.type != "text":
            text = _json_reply(self._settings.reply, fmt.json_schema)
            pieces = _cut(text, self._settings.chunks)
            return self._generate(
                prompt, request.n or 1, request.output_limit, request.stop, (text, pieces)
            )
        return self._generate(prompt, request.n or 1, request.output_limit, request.stop)

    async def _call_tools(
        self, prompt_tokens: int, choices: int, calls: tuple[FunctionDefinition, ...]
    ) -> Generation:
        arguments = [_arguments(fn) for fn in calls]
        delay = self._settings.chunk_delay
        pieces = 0
        for index, (fn, args) in enumerate(zip(calls, arguments, strict=True)):
            fragments = [p for p in _cut(args, 3) if p]
            steps = [ToolCallDelta(index, id=f"call_{index}", name=fn.name)]
            steps += [ToolCallDelta(index, arguments=p) for p in fragments]
            for step in steps:
                if delay:
                    await trio.sleep(delay)
                pieces += 1
                for choice in range(choices):
                    yield Delta(choice=choice, tool_calls=(step,))
        await trio.lowlevel.checkpoint()
        for choice in range(choices):
            yield Delta(choice=choice, finish_reason="tool_calls")
        yield Usage(prompt_tokens=prompt_tokens, completion_tokens=pieces * choices)

    def complete(self, request: CompletionRequest) -> Generation:
        prompts = request.prompts()
        words = sum(_words(p) if isinstance(p, str) else len(p) for p in prompts)
        choices = (request.n or 1) * len(prompts)
        return self._generate(words, choices, request.output_limit, request.stop)

    def _output(
        self,
        limit: int | None,
        stop: Sequence[str] | None,
        reply: tuple[str, tuple[str, ...]] | None = None,
    ) -> tuple[Sequence[str], str]:
        """The pieces this request produces (one per token) and its finish reason;
        ``reply``: another text than the configured one, and its pieces."""
        full, all_pieces = reply if reply is not None else (self._settings.reply, self._pieces)
        pieces: Sequence[str] = all_pieces if limit is None else all_pieces[:limit]
        finish = "length" if len(pieces) < len(all_pieces) else "stop"
        if not stop or not pieces:
            return pieces, finish
        ends = self._ends if reply is None else tuple(itertools.accumulate(len(p) for p in pieces))
        text = full[: ends[len(pieces) - 1]]
        found = [(i, i + len(s)) for s in stop if (i := text.find(s)) >= 0]
        if not found:
            return pieces, finish
        # The token that completes a sequence first stops generation; the text ends
        # where the earliest sequence it completes begins.
        last = min(bisect.bisect_left(ends, end) for _, end in found)
        cut = min(start for start, end in found if end <= ends[last])
        # Pieces wholly before the cut, the one it falls in (cut < ends[last]), then
        # the tokens up to the stopping one, which carried only the sequence.
        whole = bisect.bisect_right(ends, cut)
        begins = ends[whole - 1] if whole else 0
        out = [*pieces[:whole], pieces[whole][: cut - begins]]
        out.extend("" for _ in range(whole, last))
        return out, "stop"

    async def _generate(
        self,
        prompt_tokens: int,
        choices: int,
        limit: int | None,
        stop: Sequence[str] | None,
        reply: tuple[str, tuple[str, ...]] | None = None,
    ) -> Generation:
        pieces, finish = self._output(limit, stop, reply)
        delay = self._settings.chunk_delay
        last = len(pieces) - 1
        for i, piece in enumerate(pieces):
            if delay:
                await trio.sleep(delay)
            elif i % 32 == 31:
                await trio.lowlevel.checkpoint()  # never hog the event loop
            for choice in range(choices):
                yield Delta(text=piece, choice=choice, finish_reason=finish if i == last else None)
        yield Usage(prompt_tokens=prompt_tokens, completion_tokens=len(pieces) * choices)

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        dims = self._settings.embedding_dimensions
        if request.dimensions is not None and request.dimensions > dims:
            raise InvalidRequestError(
                f"Invalid 'dimensions': this model gives at most {dims}.",
                param="dimensions",
                code="invalid_value",
            )
        wanted = request.dimensions or dims
        vectors = []
        tokens = 0
        for item in request.inputs():
            text = item if isinstance(item, str) else " ".join(map(str, item))
            tokens += _words(text) if isinstance(item, str) else len(item)
            vectors.append(_unit_vector(text, wanted))
        return EmbeddingResult(vectors=tuple(vectors), usage=Usage(prompt_tokens=tokens))


def _called(request: ChatCompletionRequest) -> tuple[FunctionDefinition, ...]:
    """The functions a request with tools gets calls to (none: answer in text)."""
    tools = request.tools
    choice = request.tool_choice
    if not tools or (choice is not None and choice.mode == "none"):
        return ()
    functions = tuple(t.function for t in tools)
    if choice is not None and choice.mode == "function":
        return tuple(fn for fn in functions if fn.name == choice.function)
    return functions if request.parallel_tool_calls is True else functions[:1]


def _arguments(fn: FunctionDefinition) -> str:
    schema = fn.parameters if fn.parameters is not None else {"type": "object"}
    try:
        value = instance_of(schema)
    except Unsatisfiable:
        value = {}
    return orjson.dumps(value if isinstance(value, dict) else {}).decode()


def _json_reply(reply: str, spec: dict[str, object] | None) -> str:
    if spec is None:
        return orjson.dumps({"reply": reply}).decode()
    try:
        value = instance_of(spec.get("schema", {}))
    except Unsatisfiable:
        value = {}
    return orjson.dumps(value).decode()


def _unit_vector(text: str, dims: int) -> tuple[float, ...]:
    """A unit vector determined by ``text`` alone (SHA-256 in counter mode)."""
    raw = bytearray()
    counter = 0
    seed = text.encode("utf-8", "surrogateescape")
    while len(raw) < dims * 2:
        raw += hashlib.sha256(counter.to_bytes(4, "big") + seed).digest()
        counter += 1
    values = [v / 32768.0 - 1.0 for v in struct.unpack(f">{dims}H", bytes(raw[: dims * 2]))]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return tuple(v / norm for v in values)
