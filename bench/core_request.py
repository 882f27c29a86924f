"""CPU cost per request of the sans-IO gateway alone: no trio, no h11, no backend.

Each request is the four events of a non-stream chat through one backend
(``RequestReceived``, one ``BackendChunk``, ``BackendFinished``, ``ResponseSent``),
with the scripted backend's reply captured once beforehand. What is left is the
core's own Python per request (admission, decoding, scheduling, output, counts).

    python bench/core_request.py [--requests 30000] [--limits]
                                 [--callgrind [--pythonpath OTHER/src]]

``--limits`` adds a realistic set of limits in the memory store (the principal's
requests and tokens per minute and per day and its concurrency, an IP layer and a
model layer; none refuses), prompts counted with cl100k as ``ostiary serve`` does.

``--callgrind`` counts instead the instructions per request under valgrind's
callgrind (from zero after a warm-up: repeatable to a fraction of a percent), with
and without ``--limits`` — what the limits cost the core — for this checkout and,
with ``--pythonpath``, another checkout's ``src`` in the same run.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import trio

from ostiary.backends.scripted import ScriptedBackend, ScriptedSettings
from ostiary.protocol.actions import Dispatch
from ostiary.protocol.auth import ApiKey, KeyTable, digest_secret, format_secret
from ostiary.protocol.events import BackendChunk, BackendFinished, RequestReceived, ResponseSent
from ostiary.protocol.exchange import BackendPolicy
from ostiary.protocol.gateway import Gateway, ModelRoute
from ostiary.protocol.generation import Delta, Usage
from ostiary.protocol.requests import ChatCompletionRequest

SECRET = format_secret("0123456789ab", "x" * 43)
TARGET = "/v1/chat/completions"
BODY = orjson.dumps(
    {"model": "s", "messages": [{"role": "user", "content": "hello there"}], "stream": False}
)
HEADERS = (
    (b"host", b"bench"),
    (b"content-type", b"application/json"),
    (b"authorization", b"Bearer " + SECRET.encode()),
    (b"content-length", str(len(BODY)).encode()),
)


def limited() -> dict[str, Any]:
    """The ``Gateway`` arguments of ``--limits``: a realistic set of limits in the
    memory store that never refuses (the principal's requests and tokens per minute,
    its requests per day and concurrency; an IP layer; a model layer), and the cl100k
    counter ``ostiary serve`` loads."""
    from ostiary.protocol.access import AccessPolicy, RateLimitLayer, Role, Scope
    from ostiary.runtime.tokenizer import load_cl100k

    big = 10**8
    role = Role(
        name="admin",
        endpoints=("chat.completions", "models", "queue", "metrics"),
        requests_per_minute=big,
        tokens_per_minute=100 * big,
        requests_per_day=10 * big,
        max_concurrent=100_000,
    )
    layers = (
        RateLimitLayer(scope=Scope.IP, requests_per_minute=big),
        RateLimitLayer(scope=Scope.MODEL, requests_per_minute=big, tokens_per_minute=100 * big),
    )
    return {"access": AccessPolicy([role], layers), "tokens": load_cl100k()}


def build(limits: bool = False) -> Gateway:
    keys = KeyTable.of([ApiKey("0123456789ab", "bench", "admin", digest_secret(SECRET))])
    policy = BackendPolicy(name="scripted", max_concurrency=1024, max_queue=1024)
    extra = limited() if limits else {}
    return Gateway(routes=[ModelRoute("s", "scripted")], keys=keys, backends=[policy], **extra)


def one(gateway: Gateway, rid: str, now: float, pieces: tuple[Delta | Usage, ...]) -> list[object]:
    admission = gateway.admits("POST", TARGET, HEADERS, "127.0.0.1")
    event = RequestReceived(rid, admission, "POST", TARGET, HEADERS, BODY, now, 1.0)
    actions: list[object] = list(gateway.handle(event))
    actions += gateway.handle(BackendChunk(rid, pieces, now))
    actions += gateway.handle(BackendFinished(rid, now))
    actions += gateway.handle(ResponseSent(rid, now))
    return actions


async def reply(gateway: Gateway) -> tuple[Delta | Usage, ...]:
    """The scripted backend's pieces for the bench request."""
    backend = ScriptedBackend(ScriptedSettings(models=("s",), chunks=1))
    admission = gateway.admits("POST", TARGET, HEADERS, "127.0.0.1")
    event = RequestReceived("probe", admission, "POST", TARGET, HEADERS, BODY, 0.0, 1.0)
    dispatch = next(a for a in gateway.handle(event) if isinstance(a, Dispatch))
    assert isinstance(dispatch.call, ChatCompletionRequest)
    pieces = tuple([piece async for piece in backend.chat(dispatch.call)])
    gateway.handle(BackendChunk("probe", pieces, 0.0))
    gateway.handle(BackendFinished("probe", 0.0))
    gateway.handle(ResponseSent("probe", 0.0))
    return pieces


def callgrind(requests: int, limits: bool, pythonpath: str | None) -> float:
    """Instructions per request of a child run under callgrind (``pythonpath``: the
    ``src`` it imports instead of this checkout's)."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    with tempfile.TemporaryDirectory() as tmp:
        child = [sys.executable, __file__, "--child", "--requests", str(requests)]
        subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={tmp}/callgrind.out",
                *child,
                *(["--limits"] if limits else []),
            ],
            env=env,
            check=True,
            capture_output=True,
        )
        dump = next(Path(tmp).glob("callgrind.out.*"))  # the one the child took
        total = re.search(r"^summary: (\d+)", dump.read_text(), re.M)
        assert total, "no totals in the callgrind dump"
        return int(total.group(1)) / requests


def control(command: str) -> None:
    """Zero (``-z``) or dump (``-d``) this process' callgrind counters."""
    subprocess.run(
        ["callgrind_control", command, str(os.getpid())], check=True, capture_output=True
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=30000)
    parser.add_argument("--limits", action="store_true")
    parser.add_argument("--callgrind", action="store_true")
    parser.add_argument("--pythonpath", help="with --callgrind: another checkout's src too")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.callgrind:
        for name in ("this checkout", args.pythonpath):
            if name is not None:
                path = None if name == "this checkout" else name
                plain, limited = (callgrind(args.requests, x, path) for x in (False, True))
                print(
                    f"instructions per request, {name}: {plain:,.0f} without limits, "
                    f"{limited:,.0f} with ({limited - plain:+,.0f})"
                )
        return
    gateway = build(args.limits)
    pieces = trio.run(reply, gateway)
    if args.child:  # under callgrind: a warm-up, then the requests counted
        for i in range(500):
            one(gateway, f"w{i}", i * 1e-3, pieces)
        control("-z")
        for i in range(args.requests):
            one(gateway, f"r{i}", 1.0 + i * 1e-3, pieces)
        control("-d")
        return
    started = time.process_time()
    for i in range(args.requests):
        one(gateway, f"r{i}", i * 1e-3, pieces)
    spent = time.process_time() - started
    each = spent / args.requests * 1e6
    print(f"{args.requests} requests, {spent:.2f} s CPU: {each:.1f} us per request")


if __name__ == "__main__":
    main()
