"""Tokens per second: xllamacpp called directly vs. through Ostiary.

Three paths, same prompt and settings: xllamacpp's server engine called directly,
``EmbeddedBackend.chat()`` in this process, and (``--http``) a real ``ostiary serve``
process over loopback HTTP with SSE streaming, the client timing from request to
``[DONE]`` (so the HTTP path includes the request's whole trip through the server).

Both paths share one loaded engine (same model, slots, threads) and send the same
request: the direct path replays the exact body the backend sent (greedy,
``max_tokens`` tokens, streamed with usage). Rounds alternate the two paths so that
machine noise hits both alike; the report gives the median and the best run of each
(the best is the least disturbed by other load on the machine), the process CPU time
per token, and the resident memory.

    .venv/bin/python bench/embedded_tokens.py [--runs 11] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trio
from serving import running

from ostiary.backends.embedded import EmbeddedBackend, EmbeddedEngine, EmbeddedSettings
from ostiary.protocol.generation import Delta, Usage
from ostiary.protocol.requests import ChatCompletionRequest, ChatMessage

PROMPT = "Write a long, detailed story about a lighthouse keeper and a storm."


class RecordingServer:
    """Stands in for the xllamacpp server to record the body the backend sends."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.body: dict[str, Any] = {}

    def handle_chat_completions(self, body: dict[str, Any], callback: Any) -> None:
        self.body = body
        self.inner.handle_chat_completions(body, callback)


def direct_run(engine: EmbeddedEngine, body: dict[str, Any]) -> tuple[float, float]:
    """(tokens/s, process CPU ms per token) of one streamed request straight to the
    xllamacpp server."""
    usage: dict[str, Any] = {}

    def on_chunk(chunk: Any) -> bool:
        if isinstance(chunk, dict) and chunk.get("usage"):
            usage.update(chunk["usage"])
        return False

    started, cpu = time.perf_counter(), time.process_time()
    engine.server.handle_chat_completions(body, on_chunk)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    tokens = int(usage["completion_tokens"])
    return tokens / elapsed, 1000 * cpu / tokens


async def backend_run(
    engine: EmbeddedEngine, settings: EmbeddedSettings, max_tokens: int
) -> tuple[float, float]:
    """The same measures for the same request through the backend's generation."""
    request = ChatCompletionRequest(
        model=settings.chat_model,
        messages=(ChatMessage(role="user", content=PROMPT),),
        max_tokens=max_tokens,
        temperature=0.0,
    )
    async with EmbeddedBackend(settings, engine=engine) as backend:
        usage = None
        pieces = 0
        started, cpu = time.perf_counter(), time.process_time()
        async for item in backend.chat(request):
            if isinstance(item, Delta):
                pieces += 1
            elif isinstance(item, Usage):
                usage = item
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    assert usage is not None and pieces > 0
    return usage.completion_tokens / elapsed, 1000 * cpu / usage.completion_tokens


def http_run(port: int, key: str, max_tokens: int) -> tuple[float, float]:
    """(tokens/s, 0) of one streamed request through a running server; the
    tokens come from the stream's own usage chunk."""
    body = json.dumps(
        {
            "model": "smollm2-135m-instruct",
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    started = time.perf_counter()
    conn.request(
        "POST",
        "/v1/chat/completions",
        body,
        {"authorization": f"Bearer {key}", "content-type": "application/json"},
    )
    response = conn.getresponse()
    data = response.read()
    elapsed = time.perf_counter() - started
    conn.close()
    usage = None
    for line in data.split(b"\n"):
        if line.startswith(b"data: {"):
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
    assert usage is not None, data[-300:]
    return int(usage["completion_tokens"]) / elapsed, 0.0


@contextlib.contextmanager
def ostiary_server() -> Iterator[tuple[int, str]]:
    """``ostiary serve`` with no config (the embedded default) on a port it picks."""
    with tempfile.TemporaryDirectory() as tmp:
        serve = [sys.executable, "-m", "ostiary.runtime.cli", "serve", "--port", "0"]
        with running(serve, cwd=Path(tmp)) as (_, port):
            yield port, (Path(tmp) / ".ostiary" / "admin.key").read_text().strip()


def rss_mib() -> tuple[float, float]:
    """(current, peak) resident set size of this process."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=11)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--http", action="store_true", help="also through ostiary serve")
    args = parser.parse_args()

    settings = EmbeddedSettings()
    before = rss_mib()[0]
    engine = EmbeddedEngine.load(settings)
    loaded = rss_mib()[0]
    try:
        # Warm up, recording the exact body the backend sends to llama.cpp.
        recorder = RecordingServer(engine.server)
        engine.server = recorder
        trio.run(backend_run, engine, settings, args.max_tokens)
        engine.server, body = recorder.inner, recorder.body
        direct_run(engine, body)
        direct: list[tuple[float, float]] = []
        through: list[tuple[float, float]] = []
        served: list[tuple[float, float]] = []
        with contextlib.ExitStack() as stack:
            server = stack.enter_context(ostiary_server()) if args.http else None
            if server is not None:
                http_run(*server, args.max_tokens)  # warm-up
            for _ in range(args.runs):
                direct.append(direct_run(engine, body))
                through.append(trio.run(backend_run, engine, settings, args.max_tokens))
                if server is not None:
                    served.append(http_run(*server, args.max_tokens))
    finally:
        current, peak = rss_mib()
        engine.close()

    print(f"runs: {args.runs}, max_tokens: {args.max_tokens}, threads: {settings.n_threads}")
    summary = {}
    paths = [("xllamacpp direct", direct), ("EmbeddedBackend ", through)]
    if served:
        paths.append(("ostiary over HTTP", served))
    for label, measures in paths:
        rates = [rate for rate, _ in measures]
        median, best = statistics.median(rates), max(rates)
        cpu = statistics.median(ms for _, ms in measures)
        summary[label] = (median, best)
        runs = ", ".join(f"{x:.0f}" for x in rates)
        # The server's CPU is another process's: not measured from here.
        cpu_text = f"CPU {cpu:5.2f} ms/token" if cpu else "CPU in the server process"
        print(f"{label}: median {median:6.1f}  best {best:6.1f} tok/s, {cpu_text}  ({runs})")
    d_median, d_best = summary["xllamacpp direct"]
    for label, (median, best) in summary.items():
        if label != "xllamacpp direct":
            print(
                f"{label.strip()}: {median / d_median:.1%} of direct's median, "
                f"{best / d_best:.1%} of its best"
            )
    print(
        f"RSS: {before:.0f} MiB before load, {loaded:.0f} MiB loaded, "
        f"{current:.0f} MiB after runs, {peak:.0f} MiB peak"
    )


if __name__ == "__main__":
    main()
