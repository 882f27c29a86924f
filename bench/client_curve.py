"""Throughput of HttpClient (and of OpenAIBackend on top of it) against the mock
upstream as concurrency grows: does the rate hold from 1 to 200 in flight?

Runs ``bench/mock_upstream.py`` in a child process (one core each for client and
mock on a 2-core box) and prints, per concurrency: non-streaming requests/s and
streams/s (20 chunks each), first for the bare client (streams parsed with
SseDecoder), then through OpenAIBackend (JSON decoding and Delta translation too).

    python bench/client_curve.py [--seconds 2] [--concurrency 1 16 64 200]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio
from serving import running

from ostiary.backends.httpclient import HttpClient
from ostiary.backends.openai_compat import OpenAIBackend, OpenAISettings
from ostiary.protocol.requests import ChatCompletionRequest, ChatMessage
from ostiary.protocol.sse import SseDecoder

CHUNKS = 20
BODY = b'{"model":"mock-model","messages":[{"role":"user","content":"hi"}]}'
STREAM_BODY = BODY[:-1] + b',"stream":true}'


def cpu_seconds(pid: int | None = None) -> float:
    """CPU (user + system) used so far by this process, or by process ``pid``."""
    if pid is None:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Cell:
    """One measurement: operations/s, our CPU per operation, the mock's CPU share."""

    def __init__(self, rate: float, cpu_us: float, mock_share: float) -> None:
        self.rate, self.cpu_us, self.mock_share = rate, cpu_us, mock_share

    def __str__(self) -> str:
        return f"{self.rate:>7,.0f} {self.cpu_us:>5.0f}us {self.mock_share:>4.0%}"


async def measure(
    concurrency: int, seconds: float, mock_pid: int, one: Callable[[], Awaitable[None]]
) -> Cell:
    """Operations per second over ``seconds`` after a short warm-up, with the CPU
    this process spent per operation (robust to other load on the box) and the
    share of a core the mock used (near 100%: the mock is the bottleneck)."""
    done = 0
    counting = False

    async def worker() -> None:
        nonlocal done
        while True:
            await one()
            if counting:
                done += 1

    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
        await trio.sleep(min(0.5, seconds / 4))
        counting = True
        start, cpu, mock_cpu = trio.current_time(), cpu_seconds(), cpu_seconds(mock_pid)
        await trio.sleep(seconds)
        elapsed = trio.current_time() - start
        cpu, mock_cpu = cpu_seconds() - cpu, cpu_seconds(mock_pid) - mock_cpu
        counting = False
        nursery.cancel_scope.cancel()
    return Cell(done / elapsed, cpu / max(done, 1) * 1e6, mock_cpu / elapsed)


async def client_rates(url: str, level: int, seconds: float, mock_pid: int) -> tuple[Cell, Cell]:
    async with HttpClient(url, max_connections=max(level, 256)) as client:

        async def request() -> None:
            status, _, body = await client.request("POST", "/chat/completions", body=BODY)
            assert status == 200 and body

        async def stream() -> None:
            events = 0
            decoder = SseDecoder()
            async with client.stream("POST", "/chat/completions", body=STREAM_BODY) as response:
                async for chunk in response.iter_bytes():
                    events += len(decoder.feed(chunk))
            assert events == CHUNKS + 2, events

        return (
            await measure(level, seconds, mock_pid, request),
            await measure(level, seconds, mock_pid, stream),
        )


async def backend_rates(url: str, level: int, seconds: float, mock_pid: int) -> tuple[Cell, Cell]:
    settings = OpenAISettings(
        name="bench", models=("mock-model",), base_url=url, max_connections=max(level, 256)
    )
    messages = (ChatMessage(role="user", content="hi"),)
    raw = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}
    plain = ChatCompletionRequest(model="mock-model", messages=messages, raw=raw)
    streamed = ChatCompletionRequest(
        model="mock-model", messages=messages, stream=True, raw={**raw, "stream": True}
    )
    async with OpenAIBackend(settings) as backend:

        async def request() -> None:
            async for _ in backend.chat(plain):
                pass

        async def stream() -> None:
            pieces = 0
            async for _ in backend.chat(streamed):
                pieces += 1
            assert pieces == CHUNKS + 1, pieces

        return (
            await measure(level, seconds, mock_pid, request),
            await measure(level, seconds, mock_pid, stream),
        )


async def run(url: str, levels: list[int], seconds: float, mock_pid: int) -> None:
    print("each cell: operations/s, our CPU per operation, mock's share of a core")
    columns = ("client req/s", "client streams/s", "backend req/s", "backend streams/s")
    print(f"{'conc':>4} | " + " | ".join(f"{c:<20}" for c in columns))
    print("-" * 96)
    for level in levels:
        cells = (
            *await client_rates(url, level, seconds, mock_pid),
            *await backend_rates(url, level, seconds, mock_pid),
        )
        print(f"{level:>4} | " + " | ".join(f"{c!s:<20}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=2.0, help="measuring time per cell")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 200])
    args = parser.parse_args()
    mock = Path(__file__).with_name("mock_upstream.py")
    command = [sys.executable, str(mock), "--port", "0", "--chunks", str(CHUNKS)]
    with running(command) as (process, port):
        url = f"http://127.0.0.1:{port}/v1"
        trio.run(run, url, args.concurrency, args.seconds, process.pid)


if __name__ == "__main__":
    main()
