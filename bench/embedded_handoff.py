"""The embedded backend's own cost per token, without the model.

A stand-in for xllamacpp's server calls the stream callback as fast as it returns
(OpenAI-shaped chunks, one token each), so what is measured is the backend alone:
turning chunks into deltas, carrying them from the worker thread to Trio, and the
reader. Reports the ceiling in tokens/s and the process CPU per token (both threads),
median and best of several runs. A real model makes a token every few milliseconds;
this is the part of each that Ostiary adds.

    .venv/bin/python bench/embedded_handoff.py [--runs 7] [--tokens 20000]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import trio

from ostiary.backends.embedded import EmbeddedBackend, EmbeddedEngine, EmbeddedSettings
from ostiary.protocol.generation import Delta, Usage
from ostiary.protocol.requests import ChatCompletionRequest, ChatMessage

SETTINGS = EmbeddedSettings(models=("smollm2-135m-instruct",))


class InstantServer:
    """Answers every chat request with ``tokens`` one-token chunks, then usage."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens

    def handle_chat_completions(self, body: Any, callback: Callable[[Any], bool]) -> None:
        for i in range(self.tokens):
            chunk = {"choices": [{"index": 0, "delta": {"content": " word"}}]}
            if i == self.tokens - 1:
                chunk["choices"][0]["finish_reason"] = "length"
            if callback(chunk):
                return
        callback({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": self.tokens}})


async def one_run(tokens: int) -> tuple[float, float]:
    engine = EmbeddedEngine(SETTINGS, server=InstantServer(tokens))
    request = ChatCompletionRequest(
        model=SETTINGS.chat_model, messages=(ChatMessage(role="user", content="hi"),)
    )
    async with EmbeddedBackend(SETTINGS, engine=engine) as backend:
        pieces = 0
        started, cpu = time.perf_counter(), time.process_time()
        async for item in backend.chat(request):
            if isinstance(item, Delta):
                pieces += 1
            else:
                assert isinstance(item, Usage) and item.completion_tokens == tokens
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    assert pieces == tokens
    return tokens / elapsed, 1e6 * cpu / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=20000)
    args = parser.parse_args()
    results = [trio.run(one_run, args.tokens) for _ in range(args.runs)]
    rates = [rate for rate, _ in results]
    cpu = [us for _, us in results]
    print(f"runs: {args.runs}, tokens per run: {args.tokens}")
    print(
        f"ceiling: median {statistics.median(rates):9.0f}  best {max(rates):9.0f} tok/s; "
        f"CPU median {statistics.median(cpu):6.1f}  best {min(cpu):6.1f} us/token"
    )


if __name__ == "__main__":
    main()
