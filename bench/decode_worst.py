"""How long one request body can hold the event loop while it is decoded.

Each case is a body shape an attacker can choose, grown until it fills the body limit
(``[limits] max_body_bytes``, 4 MiB by default); the script prints the CPU time of the
decoder on it (the best of a few runs, so other processes on the machine count
little) and what the decoder answered. The decoder runs on the event loop's thread,
so this is how long every other connection waits.

    python bench/decode_worst.py [--runs 5] [--only SUBSTRING ...]
    python bench/decode_worst.py --duplicates

``--duplicates`` prints instead what finding a repeated key costs, by the method
:mod:`ostiary.protocol.json_body` uses (orjson writes back what it parsed and its
strings are counted, against the count the scan of the body made for the limits) and
by two others (the standard library's parser with a hook on every object; a walk
counting the keys of the parsed value), beside parsing and the scan alone.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import orjson

from ostiary.protocol.decoding import decode_chat, decode_completion, decode_embedding
from ostiary.protocol.errors import OpenAIError
from ostiary.protocol.json_body import _string_count, _structure
from ostiary.protocol.request_limits import RequestLimits

LIMITS = RequestLimits()
USER = {"role": "user", "content": "x"}
TEXT_PART = {"type": "text", "text": ""}
CALL = {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}


def _chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [USER], **fields}


def _tool(parameters: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": "f", "parameters": parameters}}


def _nested(levels: int) -> Any:
    value: Any = []
    for _ in range(levels - 1):
        value = [value]
    return value


Decoder = Callable[[bytes, RequestLimits], object]
#: name → (decoder, body of size n).
CASES: dict[str, tuple[Decoder, Callable[[int], dict[str, Any]]]] = {
    "empty text parts, one message": (
        decode_chat,
        lambda n: {"model": "m", "messages": [{"role": "user", "content": [TEXT_PART] * n}]},
    ),
    "text parts, 1024 messages": (
        decode_chat,
        lambda n: {"model": "m", "messages": [{"role": "user", "content": [TEXT_PART] * n}] * 1024},
    ),
    "image parts": (
        decode_chat,
        lambda n: {
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}] * n}],
        },
    ),
    "many messages": (decode_chat, lambda n: {"model": "m", "messages": [USER] * n}),
    "1024 long messages": (
        decode_chat,
        lambda n: {"model": "m", "messages": [{"role": "user", "content": "x" * n}] * 1024},
    ),
    "tool calls": (
        decode_chat,
        lambda n: {"model": "m", "messages": [{"role": "assistant", "tool_calls": [CALL] * n}]},
    ),
    "logit_bias entries": (
        decode_chat,
        lambda n: _chat(logit_bias={str(i): 1 for i in range(n)}),
    ),
    "stop strings": (decode_chat, lambda n: _chat(stop=["x"] * n)),
    "tools": (decode_chat, lambda n: _chat(tools=[_tool({})] * n)),
    "128 tools, long parameter arrays": (
        decode_chat,
        lambda n: _chat(tools=[_tool({"a": [0] * n})] * 128),
    ),
    "empty arrays in parameters": (decode_chat, lambda n: _chat(tools=[_tool({"a": [[]] * n})])),
    "arrays 30 deep in parameters": (
        decode_chat,
        lambda n: _chat(tools=[_tool({"a": [_nested(25)] * n})]),
    ),
    "empty objects in parameters": (decode_chat, lambda n: _chat(tools=[_tool({"a": [{}] * n})])),
    "keys in parameters": (
        decode_chat,
        lambda n: _chat(tools=[_tool({str(i): 0 for i in range(n)})]),
    ),
    "strings in parameters": (decode_chat, lambda n: _chat(tools=[_tool({"a": [""] * n})])),
    "a duplicate key at the end": (
        decode_chat,
        lambda n: _chat(tools=[_tool({"a": [""] * n})]),
    ),
    "completion: 2048 token arrays": (
        decode_completion,
        lambda n: {"model": "m", "prompt": [[0] * n] * 2048},
    ),
    "completion: one token array": (decode_completion, lambda n: {"model": "m", "prompt": [1] * n}),
    "embeddings: 2048 token arrays": (
        decode_embedding,
        lambda n: {"model": "m", "input": [[1] * n] * 2048},
    ),
    "embeddings: 2048 strings": (
        decode_embedding,
        lambda n: {"model": "m", "input": ["x" * n] * 2048},
    ),
}


def _encode(name: str, body: dict[str, Any]) -> bytes:
    raw = orjson.dumps(body)
    if name == "a duplicate key at the end":
        raw = raw[:-1] + b',"model":"m"}'
    return raw


def largest(name: str, make: Callable[[int], dict[str, Any]], limit: int) -> tuple[bytes, int]:
    """The largest body of this shape within ``limit`` bytes, and its size parameter."""
    high = 1
    while len(_encode(name, make(high))) <= limit:
        high *= 2
    low = high // 2
    while low < high - 1:
        mid = (low + high) // 2
        if len(_encode(name, make(mid))) <= limit:
            low = mid
        else:
            high = mid
    return _encode(name, make(max(low, 1))), low


def cpu_ms(decode: Decoder, body: bytes, runs: int) -> tuple[float, str]:
    best = float("inf")
    outcome = "accepted"
    for _ in range(runs):
        start = time.process_time()
        try:
            decode(body, LIMITS)
        except OpenAIError as error:
            outcome = f"{error.status} {error.param or error.code}"
        best = min(best, time.process_time() - start)
    return best * 1000, outcome


def _pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("repeated key")
    return obj


def _walk_keys(value: Any) -> int:
    keys, level = 0, [value]
    while level:
        below: list[Any] = []
        for node in level:
            children = node.values() if type(node) is dict else node
            keys += len(node) if type(node) is dict else 0
            below.extend(c for c in children if type(c) is dict or type(c) is list)
        level = below
    return keys


def duplicates(runs: int) -> None:
    typical = _chat(
        messages=[
            {"role": "system", "content": "You are a helpful assistant. " * 4},
            {"role": "user", "content": "Tell me about the Roman empire, in detail. " * 30},
        ],
        temperature=0.7,
        max_tokens=512,
        stream=True,
        stream_options={"include_usage": True},
        tools=[_tool({"type": "object", "properties": {"city": {"type": "string"}}})],
    )
    bodies = {
        "typical chat": orjson.dumps(typical),
        "4 MiB: one long message": orjson.dumps(
            _chat(messages=[{"role": "user", "content": 'a "b" \\ ' * 380_000}])
        ),
        "4 MiB: 1.4M short strings": largest(
            "strings in parameters", CASES["strings in parameters"][1], LIMITS.max_body_bytes
        )[0],
        "4 MiB: 2M token ids": largest(
            "completion: 2048 token arrays",
            CASES["completion: 2048 token arrays"][1],
            LIMITS.max_body_bytes,
        )[0],
    }

    def best(work: Callable[[], object]) -> float:
        times = []
        for _ in range(runs):
            start = time.process_time()
            work()
            times.append(time.process_time() - start)
        return min(times) * 1e6

    header = ("body", "bytes", "parse", "scan", "rewrite+count", "stdlib hook", "walk")
    print("{:26s} {:>8s} {:>7s} {:>7s} {:>14s} {:>12s} {:>7s}  (us of CPU)".format(*header))
    for name, body in bodies.items():
        value = orjson.loads(body)
        parse = best(partial(orjson.loads, body))
        scan = best(partial(_structure, body))
        ours = best(partial(_string_count, orjson.dumps(value)))
        ours += best(partial(orjson.dumps, value))
        hook = best(partial(json.loads, body, object_pairs_hook=_pairs_hook))
        walk = best(partial(_walk_keys, value))
        print(
            f"{name:26s} {len(body):8d} {parse:7.0f} {scan:7.0f} {ours:14.0f} {hook:12.0f} "
            f"{walk:7.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--only", nargs="*", default=[])
    parser.add_argument("--duplicates", action="store_true")
    args = parser.parse_args()
    if args.duplicates:
        duplicates(args.runs)
        return
    worst = 0.0
    for name, (decode, make) in CASES.items():
        if args.only and not any(word in name for word in args.only):
            continue
        body, n = largest(name, make, LIMITS.max_body_bytes)
        ms, outcome = cpu_ms(decode, body, args.runs)
        worst = max(worst, ms)
        print(f"{name:34s} n={n:>8d} {len(body) / 2**20:5.2f} MiB {ms:8.1f} ms  {outcome}")
    print(f"worst: {worst:.1f} ms of CPU for one body")


if __name__ == "__main__":
    main()
