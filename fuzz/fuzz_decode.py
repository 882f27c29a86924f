"""Atheris target: the request-body decoders.

The rule: :func:`~ostiary.protocol.decoding.decode_chat`, ``decode_completion`` and
``decode_embedding`` either succeed or raise an
:class:`~ostiary.protocol.errors.OpenAIError`, for any bytes at all; any other
exception is a crash (the server would answer it with a 500).

The first byte of an input picks the decoder (``byte % 3``: chat, completion,
embeddings), the mode (``byte // 3 % 2``) and the limits (``byte // 6 % 2``: the
defaults, or limits so tight that every count is reached): the rest is either the
body itself (mode 0; the seed corpus in ``fuzz/corpus/decode`` starts with ``0``,
``1`` or ``2`` and is this mode), or (mode 1) the entropy from which a JSON object is
built out of the request types' own field names and awkward values, which reaches
the field checks far more often than mutated bytes do; it may repeat a key of the
object (the decoder must refuse it).

The same bytes are also tried as a ``content-type`` value, and a token-array
embeddings request that decodes is turned into text with a codec that fails on any
id outside cl100k's text tokens (the range check must come first).

Run: ``python fuzz/fuzz_decode.py fuzz/corpus/decode -runs=20000`` (any libFuzzer
flags; add ``-artifact_prefix=DIR/`` to keep crash files out of the working tree).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import atheris

with atheris.instrument_imports(include=["ostiary", "cattrs"]):
    import attrs
    import orjson

    from ostiary.protocol import requests
    from ostiary.protocol.decoding import (
        check_content_type,
        decode_chat,
        decode_completion,
        decode_embedding,
    )
    from ostiary.protocol.errors import OpenAIError
    from ostiary.protocol.request_limits import RequestLimits
    from ostiary.protocol.tokens import CL100K_TEXT_TOKENS, embedding_as_text

__all__ = ["main", "test_one_input"]

LIMITS = (
    RequestLimits(),
    RequestLimits(
        max_json_depth=4,
        max_json_containers=8,
        max_json_keys=10,
        max_messages=2,
        max_content_parts=2,
        max_tool_calls=1,
        max_stop_sequences=1,
        max_tools=1,
        max_batch_inputs=2,
        max_token_ids=3,
        max_logit_bias=1,
        max_message_chars=8,
    ),
)
DECODERS: tuple[Callable[[bytes, RequestLimits], object], ...] = (
    decode_chat,
    decode_completion,
    decode_embedding,
)
BASES: tuple[dict[str, Any], ...] = (
    {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    {"model": "m", "prompt": "hi"},
    {"model": "m", "input": "hi"},
)


def _field_names() -> tuple[str, ...]:
    names: set[str] = set()
    for name in requests.__all__:
        cls = getattr(requests, name)
        if attrs.has(cls):
            names.update(f.name for f in attrs.fields(cls))
    return tuple(sorted(names))


#: Keys: every field of every request type, the JSON names the decoder reads by
#: hand, and keys that are awkward inside an error path (``a[b``, ``x.y``).
KEYS = sorted(
    {
        *_field_names(),
        "image_url",
        "input_audio",
        "file",
        "url",
        "strict",
        "description",
        "parameters",
        "a[b",
        "[0]",
        "x.y",
        "",
    }
)
WORDS = [
    "m",
    "",
    "user",
    "assistant",
    "system",
    "developer",
    "tool",
    "function",
    "text",
    "refusal",
    "image_url",
    "auto",
    "none",
    "required",
    "json_object",
    "json_schema",
    "float",
    "base64",
    "\u0000",
    "\ud7ff",
    "x" * 300,
]
INTS = [0, 1, -1, 2, 5, 8, 9, 20, 21, 128, 129, 65_536, 2**31, 2**53 + 1, 2**63 - 1, -(2**63)]


def _value(fdp: atheris.FuzzedDataProvider, depth: int) -> Any:
    kind = fdp.ConsumeIntInRange(0, 11 if depth < 4 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return fdp.ConsumeBool()
    if kind == 2:
        return fdp.PickValueInList(INTS)
    if kind == 3:
        return fdp.ConsumeRegularFloat()
    if kind == 4:
        return fdp.PickValueInList(WORDS)
    if kind == 5:
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 12))
    if kind == 6:
        return fdp.ConsumeIntInRange(-3, 40)
    if kind == 7:
        return [_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    if kind == 8:
        return [fdp.PickValueInList(INTS) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    if kind == 9:
        return [[fdp.ConsumeIntInRange(0, 9)] for _ in range(fdp.ConsumeIntInRange(0, 2))]
    return _object(fdp, depth + 1)


def _object(fdp: atheris.FuzzedDataProvider, depth: int) -> dict[str, Any]:
    return {
        fdp.PickValueInList(KEYS): _value(fdp, depth) for _ in range(fdp.ConsumeIntInRange(0, 3))
    }


def _containers(node: Any, out: list[dict[str, Any] | list[Any]]) -> None:
    if isinstance(node, dict):
        out.append(node)
        for value in node.values():
            _containers(value, out)
    elif isinstance(node, list):
        out.append(node)
        for value in node:
            _containers(value, out)


def _structured(endpoint: int, data: bytes) -> bytes:
    """A body built from ``data``: the endpoint's minimal valid body, then a few
    edits, each setting a key (or a list item) somewhere in it to a fuzzed value."""
    fdp = atheris.FuzzedDataProvider(data)
    body = orjson.loads(orjson.dumps(BASES[endpoint]))
    for _ in range(fdp.ConsumeIntInRange(0, 6)):
        targets: list[dict[str, Any] | list[Any]] = []
        _containers(body, targets)
        target = fdp.PickValueInList(targets)
        value = _value(fdp, 1)
        if isinstance(target, dict):
            target[fdp.PickValueInList(KEYS)] = value
        elif target and fdp.ConsumeBool():
            target[fdp.ConsumeIntInRange(0, len(target) - 1)] = value
        else:
            target.append(value)
    encoded: bytes = orjson.dumps(body)
    if fdp.ConsumeBool():
        again = orjson.dumps({fdp.PickValueInList(sorted(body)): _value(fdp, 1)})
        encoded = encoded[:-1] + b"," + again[1:]
    return encoded


class _StrictCodec:
    """Decodes only what the core may pass: ids checked into cl100k's text range."""

    def decode(self, ids: Sequence[int]) -> str:
        if not all(0 <= i < CL100K_TEXT_TOKENS for i in ids):
            raise AssertionError(f"an unchecked id reached the codec: {ids}")
        return "t" * len(ids)

    def count(self, text: str, limit: int) -> int:
        return min(len(text), limit + 1)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    endpoint = data[0] % 3
    body = data[1:] if (data[0] // 3) % 2 == 0 else _structured(endpoint, data[1:])
    limits = LIMITS[(data[0] // 6) % 2]
    with contextlib.suppress(OpenAIError):
        check_content_type(((b"content-type", data[1:200]),))
    with contextlib.suppress(OpenAIError):
        request = DECODERS[endpoint](body, limits)
        if isinstance(request, requests.EmbeddingRequest):
            embedding_as_text(request, _StrictCodec())


def main(argv: Sequence[str] | None = None) -> int:
    """Run libFuzzer with ``argv`` (``sys.argv`` by default; ``argv[0]`` is the
    program name). Returns 0 when the run ends without a crash."""
    args = list(sys.argv if argv is None else argv)
    atheris.Setup(args, test_one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
