"""Where the time of one admission through Redis goes: TCP or a Unix socket, and floors.

One ``SharedLimits.decide`` (the realistic three-layer admission of ``limits.py``)
over TCP and over a Unix socket, each with its own client, in one Trio run against
one private ``redis-server`` listening on both, interleaved call by call (ABBA:
every other iteration runs them in the opposite order, so a machine that speeds up
or slows down favours neither). And floors, in the same loop: a PING on a bare
blocking socket (the process sleeps in ``recv``: its CPU may go idle) and on a bare
non-blocking socket spun on (``recv`` until the reply is there: this CPU never
idles, so what is left is the kernel, Redis' work and Redis' own wake-up); their
difference is what waking this process costs, the most any busy poll here could
save. Then admissions per second with ``--callers`` concurrent callers, each
transport in turn for ``--rounds`` rounds (ABBA again), with this process' CPU per
admission.

    python bench/redis_wait.py [--requests 4000] [--callers 16] [--rounds 4]
    taskset -c 1 python bench/redis_wait.py   # one core: the private Redis inherits it

A busy poll in the client (the run loop, with nothing runnable and a reply due,
polling its epoll instead of parking) was tried with this bench and left out: on
this VM, idle, it took 3% off the median over TCP and nothing over a Unix socket,
added up to 20 µs pinned to one core, and cost 2-13% of the admissions per second
with 16 callers (all of them waiting on Redis leave the loop idle, so it spins
under exactly that load).
"""

from __future__ import annotations

import argparse
import functools
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import trio

from ostiary.runtime.redis_client import RedisAddress, RedisClient
from ostiary.runtime.redis_limits import RedisLimitStore
from ostiary.runtime.shared_limits import SharedLimits

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from limits import SLOTS, charges
from tests.runtime.redis_server import redis_server

PING = b"*1\r\n$4\r\nPING\r\n"
PONG = b"+PONG\r\n"
clock = time.perf_counter_ns


def connect(address: RedisAddress) -> socket.socket:
    if address.path is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(address.path)
        return sock
    sock = socket.create_connection((address.host, address.port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def blocking_ping(sock: socket.socket) -> float:
    t0 = clock()
    sock.sendall(PING)
    got = sock.recv(64)
    while len(got) < len(PONG):
        got += sock.recv(64)
    elapsed = (clock() - t0) / 1000
    assert got == PONG
    return elapsed


def spinning_ping(sock: socket.socket) -> float:
    t0 = clock()
    sock.send(PING)
    got = b""
    while len(got) < len(PONG):
        try:  # noqa: SIM105  (a spin: no context manager per turn)
            got += sock.recv(64)
        except BlockingIOError:
            pass
    elapsed = (clock() - t0) / 1000
    assert got == PONG
    return elapsed


def percentiles(samples: list[float]) -> tuple[float, float]:
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99)]


async def measure(urls: dict[str, str], args: argparse.Namespace) -> None:
    variants: dict[str, SharedLimits] = {}
    async with AsyncExitStack() as stack:
        for transport, url in urls.items():
            client = RedisClient.from_url(url, timeout=1.0, pool_size=16)
            await stack.enter_async_context(client)
            variants[transport] = SharedLimits(RedisLimitStore(client, prefix="bench:w:"))
        for shared in variants.values():  # warm up: connections, scripts
            for _ in range(200):
                decision = await shared.decide(charges(700), SLOTS)
                assert decision is not None and decision.hold is not None
                await shared.store.settle(decision.hold, 650)

        floors: dict[str, Callable[[], float]] = {}
        for transport, url in urls.items():
            address = RedisAddress.from_url(url)
            blocking, spun = connect(address), connect(address)
            spun.setblocking(False)
            floors[f"PING, {transport}, blocking socket"] = functools.partial(
                blocking_ping, blocking
            )
            floors[f"PING, {transport}, spinning socket"] = functools.partial(spinning_ping, spun)

        async def decide(shared: SharedLimits) -> float:
            t0 = clock()
            decision = await shared.decide(charges(700), SLOTS)
            elapsed = (clock() - t0) / 1000
            assert decision is not None and decision.hold is not None
            await shared.store.settle(decision.hold, 650)
            return elapsed

        steps: list[tuple[str, Callable[[], Awaitable[float]] | Callable[[], float]]] = [
            (name, lambda s=shared: decide(s)) for name, shared in variants.items()
        ]
        steps += list(floors.items())
        samples: dict[str, list[float]] = {name: [] for name, _ in steps}
        for i in range(args.requests):
            for name, step in steps if i % 2 == 0 else steps[::-1]:
                got = step()
                samples[name].append(await got if not isinstance(got, float) else got)
        print(f"one at a time, µs (median, p99), {args.requests} each, interleaved:")
        for name, values in samples.items():
            median, p99 = percentiles(values)
            label = f"decide, {name}" if name in variants else name
            print(f"  {label:42} {median:8.1f} {p99:8.1f}")
        rates: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
        order = list(variants.items())
        per_caller = max(1, args.requests // args.callers)
        for round_ in range(args.rounds):
            for name, shared in order if round_ % 2 == 0 else order[::-1]:

                async def caller(shared: SharedLimits = shared) -> None:
                    for _ in range(per_caller):
                        decision = await shared.decide(charges(700), SLOTS)
                        assert decision is not None and decision.hold is not None
                        await shared.store.settle(decision.hold, 650)

                started, cpu = time.perf_counter(), time.process_time()
                async with trio.open_nursery() as nursery:
                    for _ in range(args.callers):
                        nursery.start_soon(caller)
                done = per_caller * args.callers
                wall, cpu = time.perf_counter() - started, time.process_time() - cpu
                rates[name].append((done / wall, cpu / done * 1e6))
        print(
            f"admit + settle with {args.callers} callers, per second (median of "
            f"{args.rounds} rounds; rounds), and this process' CPU µs per admission:"
        )
        for name, runs in rates.items():
            per_s = [r for r, _ in runs]
            cpu_us = statistics.median(c for _, c in runs)
            listed = ", ".join(f"{r:.0f}" for r in per_s)
            print(f"  {name:42} {statistics.median(per_s):8.0f} ({listed}); CPU {cpu_us:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "redis.sock")
        with redis_server(unix_socket=path) as server:
            trio.run(measure, {"tcp": server.url, "unix": server.unix_url}, args)


if __name__ == "__main__":
    main()
