"""Tool-call output made regular, sans I/O: one component for both response paths.

Backends hand on tool-call pieces as their upstream sent them (see
:class:`~ostiary.protocol.generation.ToolCallDelta`). :class:`ToolCallNormalizer`
turns them into OpenAI's regular delta shape: the first piece of each call carries
``index``, ``id`` and the name (``type: "function"`` is added by the encoder); later
pieces carry argument fragments only; a choice that made calls ends with
``finish_reason: "tool_calls"``. A streamed response encodes what :meth:`feed`
returns; a non-streamed one collects the very same deltas, so both paths agree.

The repairs, per choice:

* empty argument fragments are dropped;
* the name (or id) repeated on later pieces counts only the first time: names are
  never concatenated;
* a call without an id, or whose id an earlier call of the exchange already has,
  gets ``<id_prefix>_<choice>_<index>``: deterministic, no randomness. An id that
  only arrives after the call started (ids on the last piece) is not waited for:
  the call keeps the id it started with, ours;
* a call starts once its name is known; argument fragments that come earlier are
  held (bounded) and sent with the start;
* arguments sent again whole after the fragments already formed a complete JSON
  value (equal as JSON) are dropped; other text after a complete value is a
  :class:`BackendError`;
* pieces without ``index`` (``index=None``) belong to the choice's latest
  index-less call unless they start a new one: a piece starts a new call when its
  id differs from that call's id, when it names another function, or when it names
  one after that call's arguments formed a complete JSON value (unless it just
  repeats the call whole, or brings its late id with no arguments). Such a call
  starts with its first non-empty argument fragment, and one that only repeats the
  call before it (same name, same arguments, or none) is dropped, so a name
  repeated after the end is no phantom call. Without an index an id that comes
  late cannot always be told from the next call's: give an index, or ids on the
  first piece. Calls get indexes in the order they start, so a client that
  merges by position (the OpenAI SDK does) sees each call's start before any
  later call's;
* a call that never got arguments gets ``{}``; a call never named is a
  :class:`BackendError`;
* ``stop`` (or ``function_call``) after calls becomes ``tool_calls``; ``tool_calls``
  without any call becomes ``stop``.

Memory is bounded: at most ``max_calls`` calls per choice, ``max_argument_bytes``
of arguments per call, ``max_choices`` choices; beyond them a
:class:`BackendError` (502).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import orjson

from .errors import BackendError
from .generation import Delta, ToolCallDelta
from .requests import FunctionCall, ToolCall

__all__ = ["ToolCallNormalizer"]

_SIGNIFICANT = re.compile(r'[\\"{}\[\]]')


class _JsonEnd:
    """Finds where a JSON object or array ends, fed in fragments, in linear time."""

    __slots__ = ("depth", "done", "escape", "in_string")

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escape = False
        self.done = False

    def feed(self, text: str) -> None:
        i = 0
        if self.escape:
            self.escape = False
            i = 1
        end = len(text)
        search = _SIGNIFICANT.search
        while (m := search(text, i)) is not None:
            pos = m.start()
            ch = text[pos]
            i = pos + 1
            if self.in_string:
                if ch == "\\":
                    if i >= end:
                        self.escape = True
                        return
                    i += 1
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            else:
                self.depth -= 1
                if self.depth == 0:
                    self.done = True
                    return
                if self.depth < 0:
                    self.depth = -(1 << 30)  # never a complete value


class _Call:
    __slots__ = ("end", "id", "index", "name", "parts", "prior", "size", "upstream_id")

    def __init__(self) -> None:
        #: The index-less call before this one, which a held start may just repeat.
        self.prior: _Call | None = None
        self.upstream_id: str | None = None
        self.id: str | None = None
        self.name: str | None = None
        #: The output index; None until the call started.
        self.index: int | None = None
        self.parts: list[str] = []
        self.size = 0
        self.end = _JsonEnd()

    def arguments(self) -> str:
        if len(self.parts) > 1:
            self.parts[:] = ["".join(self.parts)]
        return self.parts[0] if self.parts else ""


class _Choice:
    __slots__ = ("by_index", "calls", "closed", "latest", "started")

    def __init__(self) -> None:
        self.closed = False
        self.by_index: dict[int, _Call] = {}
        self.calls: list[_Call] = []
        #: The latest call named by pieces without an index.
        self.latest: _Call | None = None
        self.started = 0


def _same_json(a: str, b: str) -> bool:
    try:
        return bool(orjson.loads(a) == orjson.loads(b))
    except orjson.JSONDecodeError:
        return False


class ToolCallNormalizer:
    """Makes one exchange's tool-call output regular; see the module docstring.

    ``id_prefix`` makes the ids the normalizer assigns (``call_<request_id>``
    gives ``call_<request_id>_<choice>_<index>``).
    """

    __slots__ = ("_choices", "_id_prefix", "_ids", "_max_bytes", "_max_calls", "_max_choices")

    def __init__(
        self,
        id_prefix: str,
        *,
        max_calls: int = 128,
        max_argument_bytes: int = 1024 * 1024,
        max_choices: int = 128,
    ) -> None:
        self._id_prefix = id_prefix
        self._max_calls = max_calls
        self._max_bytes = max_argument_bytes
        self._max_choices = max_choices
        self._choices: dict[int, _Choice] = {}
        self._ids: set[str] = set()

    def feed(self, deltas: Iterable[Delta]) -> list[Delta]:
        """The regular deltas for ``deltas``: text passes through; deltas left with
        nothing to say are dropped. Raises :class:`BackendError` past a bound, or
        for output no repair can make sense of."""
        out: list[Delta] = []
        for delta in deltas:
            if not delta.tool_calls and delta.finish_reason is None:
                if delta.text or delta.logprobs is not None:
                    out.append(delta)
                continue
            state = self._choice(delta.choice)
            pieces: list[ToolCallDelta] = []
            for piece in delta.tool_calls:
                self._piece(delta.choice, state, piece, pieces)
            reason = delta.finish_reason
            if reason is not None:
                reason = self._close(delta.choice, state, reason, pieces)
            if delta.text or pieces or reason is not None or delta.logprobs is not None:
                out.append(Delta(delta.text, delta.choice, tuple(pieces), reason, delta.logprobs))
        return out

    def finish(self) -> list[Delta]:
        """The end of the output: what the choices that made calls still owe
        (held starts, ``{}`` arguments, the finish reason)."""
        out: list[Delta] = []
        for choice, state in sorted(self._choices.items()):
            if state.calls and not state.closed:
                pieces: list[ToolCallDelta] = []
                reason = self._close(choice, state, "tool_calls", pieces)
                out.append(Delta("", choice, tuple(pieces), reason))
        return out

    def choices(self) -> tuple[int, ...]:
        """The choices that sent tool-call pieces or a finish reason, in order."""
        return tuple(sorted(self._choices))

    def calls(self, choice: int = 0) -> tuple[ToolCall, ...]:
        """The calls of ``choice`` so far that have started, in index order."""
        state = self._choices.get(choice)
        if state is None:
            return ()
        started = sorted((c for c in state.calls if c.index is not None), key=_index_of)
        return tuple(
            ToolCall(c.id or "", FunctionCall(c.name or "", c.arguments() or "{}")) for c in started
        )

    # -- the repairs -----------------------------------------------------------------

    def _choice(self, choice: int) -> _Choice:
        state = self._choices.get(choice)
        if state is None:
            if len(self._choices) >= self._max_choices:
                raise BackendError(f"The backend sent more than {self._max_choices} choices.")
            state = self._choices[choice] = _Choice()
        return state

    def _find(self, state: _Choice, piece: ToolCallDelta) -> _Call | None:
        """The call ``piece`` belongs to (None: a new one)."""
        if piece.index is not None:
            return state.by_index.get(piece.index)
        latest = state.latest
        if latest is None:
            return None
        if piece.id and latest.upstream_id:
            return latest if piece.id == latest.upstream_id else None
        if piece.name and latest.name and piece.name != latest.name:
            return None
        if latest.end.done:
            if piece.arguments and _same_json(piece.arguments, latest.arguments()):
                return latest  # the call again, whole
            if piece.id and not piece.arguments:
                return latest  # its id, late
            if piece.name:
                return None
        return latest

    def _piece(
        self, choice: int, state: _Choice, piece: ToolCallDelta, out: list[ToolCallDelta]
    ) -> None:
        call = self._find(state, piece)
        if call is None:
            if len(state.calls) >= self._max_calls:
                raise BackendError(
                    f"The backend made more than {self._max_calls} tool calls in one choice."
                )
            call = _Call()
            state.calls.append(call)
            if piece.index is None:
                call.prior = state.latest
                state.latest = call
            else:
                state.by_index[piece.index] = call
        fragment = piece.arguments
        owner = call
        if fragment and self._repeats_prior(call, fragment, piece.id):
            fragment = ""
            assert call.prior is not None
            owner = call.prior  # the prior call again, whole: its id, if any
        if piece.id and owner.upstream_id is None:
            owner.upstream_id = piece.id
        if piece.name and call.name is None:
            call.name = piece.name
        if fragment:
            if call.end.done:
                if fragment.isspace() or _same_json(fragment, call.arguments()):
                    fragment = ""
                else:
                    raise BackendError(
                        f"The backend sent arguments after the complete arguments of tool "
                        f"call '{call.name or ''}'."
                    )
            else:
                call.size += len(fragment.encode())
                if call.size > self._max_bytes:
                    raise BackendError(
                        f"The backend sent tool-call arguments over {self._max_bytes} bytes."
                    )
                call.parts.append(fragment)
                call.end.feed(fragment)
        if call.index is None:
            held = piece.index is None and not call.parts
            if call.name is not None and not held:
                out.append(self._start(choice, state, call))
        elif fragment:
            out.append(ToolCallDelta(call.index, arguments=fragment))

    @staticmethod
    def _repeats_prior(call: _Call, fragment: str, piece_id: str | None) -> bool:
        """A held index-less call whose first arguments are its prior's again."""
        prior = call.prior
        own_id = call.upstream_id or piece_id
        return (
            prior is not None
            and call.index is None
            and not call.parts
            and (own_id is None or prior.upstream_id in (None, own_id))
            and call.name in (None, prior.name)
            and _same_json(fragment, prior.arguments())
        )

    def _start(self, choice: int, state: _Choice, call: _Call) -> ToolCallDelta:
        index = call.index = state.started
        state.started += 1
        call_id = call.upstream_id
        if not call_id or call_id in self._ids:
            call_id = f"{self._id_prefix}_{choice}_{index}"
            while call_id in self._ids:
                call_id += "_"
        self._ids.add(call_id)
        call.id = call_id
        return ToolCallDelta(index, id=call_id, name=call.name, arguments=call.arguments())

    def _close(self, choice: int, state: _Choice, reason: str, out: list[ToolCallDelta]) -> str:
        """Settle the choice's calls at its end; the finish reason it then has."""
        for call in state.calls:
            if call.index is None:
                prior = call.prior
                phantom = (
                    not call.parts
                    and prior is not None
                    and (call.upstream_id is None or prior.upstream_id is None)
                    and call.name in (None, prior.name)
                )
                if phantom:
                    continue
                if call.name is None:
                    raise BackendError("The backend sent a tool call without a function name.")
                out.append(self._start(choice, state, call))
            if not call.parts:
                call.parts.append("{}")
                out.append(ToolCallDelta(call.index, arguments="{}"))
        state.calls = [c for c in state.calls if c.index is not None]
        state.latest = None
        state.closed = True
        if state.calls:
            return "tool_calls" if reason in ("stop", "function_call") else reason
        return "stop" if reason == "tool_calls" else reason


def _index_of(call: _Call) -> int:
    assert call.index is not None
    return call.index
