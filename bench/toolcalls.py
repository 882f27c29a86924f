"""Cost of the tool-call normalizer: tool-call pieces per second, regular and quirky.

Four parallel calls, each ~1 KB of JSON arguments sent in 8-byte fragments, once in
OpenAI's regular shape and once with every quirk at once (names and ids repeated,
empty fragments, arguments sent whole again at the end); and the same calls
without an index, one after the other. Prints pieces/s and µs per call.

    python bench/toolcalls.py [--rounds 200]
"""

from __future__ import annotations

import argparse
import time

import orjson

from ostiary.protocol.generation import Delta, ToolCallDelta
from ostiary.protocol.toolcalls import ToolCallNormalizer


def shape(quirky: bool, indexed: bool) -> list[Delta]:
    deltas = []
    for i in range(4):
        args = orjson.dumps({"n": i, "text": "x" * 900, "list": list(range(20))}).decode()
        index = i if indexed else None
        deltas.append(Delta(tool_calls=(ToolCallDelta(index, id=f"c{i}", name="get"),)))
        for k in range(0, len(args), 8):
            name = "get" if quirky else None
            call_id = f"c{i}" if quirky else None
            deltas.append(Delta(tool_calls=(ToolCallDelta(index, call_id, name, args[k : k + 8]),)))
            if quirky:
                deltas.append(Delta(tool_calls=(ToolCallDelta(index, arguments=""),)))
        if quirky:
            deltas.append(Delta(tool_calls=(ToolCallDelta(index, arguments=args),)))
    deltas.append(Delta(finish_reason="stop"))
    return deltas


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=200)
    rounds = parser.parse_args().rounds
    for label, quirky, indexed in (
        ("regular", False, True),
        ("quirky", True, True),
        ("no index", False, False),
        ("no index, quirky", True, False),
    ):
        deltas = shape(quirky, indexed)
        start = time.perf_counter()
        for _ in range(rounds):
            norm = ToolCallNormalizer("call_r")
            norm.feed(deltas)
            norm.finish()
        took = time.perf_counter() - start
        pieces = len(deltas) * rounds
        print(
            f"{label:>18}: {pieces / took:12,.0f} pieces/s  "
            f"{took / rounds / 4 * 1e6:8.1f} µs per call"
        )


if __name__ == "__main__":
    main()
