"""CPU cost per request of the whole server stack, in one process, without sockets.

Clients talk to ``HttpServer.serve_connection`` over in-memory streams, so the
kernel and the load generator are out of the picture: what is left is Ostiary's
own Python (h11, driver, gateway, backend) per request. Run it under
``valgrind --tool=callgrind`` for instruction counts that repeat exactly, or plainly
for microseconds of CPU per request.

    python bench/inprocess.py [--requests 20000] [--connections 16] [--stream]
                              [--access-log off|logging|fast] [--limits]

``--access-log`` writes JSON access-log lines to ``os.devnull``: through ``logging``
(what embedders get), or through the runtime's ``AccessLog`` (what ``ostiary serve``
uses by default). ``--limits`` adds the same limits in the memory store as
``core_request.py --limits`` (none refuses).
"""

from __future__ import annotations

import argparse
import os
import time

import orjson
import trio
import trio.testing
from core_request import limited  # the same limits (bench/ is on the path)

from ostiary.backends.scripted import ScriptedBackend, ScriptedSettings
from ostiary.protocol.auth import ApiKey, KeyTable, digest_secret, format_secret
from ostiary.protocol.exchange import BackendPolicy
from ostiary.protocol.gateway import Gateway, ModelRoute
from ostiary.runtime.access_log import AccessLog
from ostiary.runtime.driver import Driver
from ostiary.runtime.http import HttpServer, HttpSettings
from ostiary.runtime.logs import setup_logging

SECRET = format_secret("0123456789ab", "x" * 43)


def build(chunks: int, access_log: str, limits: bool) -> tuple[HttpServer, AccessLog | None]:
    backend = ScriptedBackend(ScriptedSettings(models=("s",), chunks=chunks))
    keys = KeyTable.of([ApiKey("0123456789ab", "bench", "admin", digest_secret(SECRET))])
    policy = BackendPolicy(name="scripted", max_concurrency=1024, max_queue=1024)
    extra = limited() if limits else {}
    gateway = Gateway(routes=[ModelRoute("s", "scripted")], keys=keys, backends=[policy], **extra)
    writer = None
    if access_log == "logging":
        setup_logging("info", "json", open(os.devnull, "w"))  # noqa: SIM115
    elif access_log == "fast":
        writer = AccessLog(open(os.devnull, "wb"))  # noqa: SIM115
    chosen = writer if writer is not None else access_log != "off"
    driver = Driver(gateway, {"scripted": backend}, access_log=chosen)
    return HttpServer(driver, HttpSettings()), writer


def request_bytes(stream: bool) -> bytes:
    body = orjson.dumps(
        {"model": "s", "messages": [{"role": "user", "content": "hello there"}], "stream": stream}
    )
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
        b"authorization: Bearer "
        + SECRET.encode()
        + b"\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


async def client(stream: trio.abc.Stream, raw: bytes, count: int, end: bytes) -> None:
    buffer = b""
    for _ in range(count):
        await stream.send_all(raw)
        while True:
            cut = buffer.find(end)
            if cut >= 0:
                buffer = buffer[cut + len(end) :]
                break
            buffer += await stream.receive_some(65536)
    await stream.aclose()


async def run(
    requests: int, connections: int, streaming: bool, chunks: int, access_log: str, limits: bool
) -> float:
    server, writer = build(chunks, access_log, limits)
    raw = request_bytes(streaming)
    # A non-streamed answer ends with its JSON; a stream with the final chunk.
    end = b"0\r\n\r\n" if streaming else b'"total_tokens":'
    started = time.process_time()
    async with trio.open_nursery() as nursery:
        if writer is not None:
            await nursery.start(writer.run)
        async with trio.open_nursery() as clients:
            for _ in range(connections):
                a, b = trio.testing.memory_stream_pair()
                nursery.start_soon(server.serve_connection, b)
                clients.start_soon(client, a, raw, requests // connections, end)
        nursery.cancel_scope.cancel()
    return time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--chunks", type=int, default=1)
    parser.add_argument("--access-log", choices=["off", "logging", "fast"], default="off")
    parser.add_argument("--limits", action="store_true")
    args = parser.parse_args()
    cpu = trio.run(
        run,
        args.requests,
        args.connections,
        args.stream,
        args.chunks,
        args.access_log,
        args.limits,
    )
    per = cpu / args.requests * 1e6
    print(
        f"{args.requests} requests, {cpu:.2f} s CPU: {per:.1f} us per request"
        + (f", {per / args.chunks:.2f} us per chunk" if args.stream else "")
    )


if __name__ == "__main__":
    main()
