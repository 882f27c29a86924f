"""Admission cost of the limit stores: in memory, and through Redis on loopback.

The realistic shape: three layers (principal: requests and tokens per minute and a
concurrency slot; client IP: requests per minute; model: tokens per minute), every
request admitted. In memory: µs per ``admit`` (median of batches, CPU time and wall
time: on a shared machine the wall time includes other processes), and per
``admit`` + ``settle``; then the whole admission decision as the gateway makes it
(``Guard``: the request shape's charges with its prompt counted in cl100k, the
judgement, the ``x-ratelimit-*`` headers; then the settlement with real usage), for
the limits of ``core_request.py --limits`` (principal rpm, tpm, rpd and concurrency;
IP rpm; model rpm and tpm). Through Redis (a private ``redis-server`` on a free port, or
``--url``): median and p99 µs of one admission, one settlement and one ``PING``,
one call at a time; the same admission through :class:`SharedLimits` (as the driver
makes it: within ``[redis] timeout``); this process' CPU per admission and Redis' own
time per script call (``INFO commandstats``), neither of which counts the time other
processes of a busy machine take; and admissions per second with 16 concurrent callers.

The floors, measured in the same loop (each iteration runs every call once, so
drifts of a shared machine hit them alike): a ``PING`` on a bare blocking socket (no
event loop), on a bare non-blocking socket under Trio (``send``, ``wait_readable``,
``recv``: what any Trio client pays), and through our client. What the client adds is
its PING less the bare Trio one; what the admission adds is the admission less the
client's PING.

    python bench/limits.py [--requests 20000] [--url redis://127.0.0.1:6379/0]

The client runs its watchdog (``async with``), as the server's does (in
``SharedLimits.run``): no cancel scope per call.

``--callgrind`` counts instead the instructions of this process per admission
through ``SharedLimits.decide`` (valgrind's callgrind, from zero after a warm-up:
exactly repeatable), also for another checkout's ``src`` (``--pythonpath``), in
the same run against the same Redis::

    python bench/limits.py --callgrind [--requests 2000] [--pythonpath OTHER/src]

Pinned to one core: ``taskset -c 0 python bench/limits.py`` (the private
``redis-server`` inherits the affinity; an existing one does not). On this VM, a
round trip between processes on two cores costs some 70 µs more than on one, for
waking the other core's idle vCPU (a blocking-socket PING: ~80 µs across cores,
~9 µs on one), which dwarfs everything measured here; pinned, the figures show the
cost of the code rather than of the wake-ups. Real deployments see the unpinned case
(or Redis on another host); both are worth reporting.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import trio

from ostiary.protocol.buckets import BucketSpec, Charge, ConcurrencyLimit, Limit, Unit
from ostiary.protocol.limits import MemoryLimitStore
from ostiary.runtime.redis_client import RedisAddress, RedisClient
from ostiary.runtime.redis_limits import RedisLimitStore
from ostiary.runtime.shared_limits import SharedLimits

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tests.runtime.redis_server import redis_server

BIG = 10**9
PRINCIPAL = "principal:key:0123456789ab"
LIMITS = [
    Limit(PRINCIPAL, "rpm", BucketSpec.per(BIG, 60), Unit.REQUESTS),
    Limit(PRINCIPAL, "tpm", BucketSpec.per(BIG, 60), Unit.TOKENS),
    Limit("ip:10.1.2.3", "rpm", BucketSpec.per(BIG, 60), Unit.REQUESTS),
    Limit("model:smollm2", "tpm", BucketSpec.per(BIG, 60), Unit.TOKENS),
]
SLOTS = [ConcurrencyLimit(PRINCIPAL, BIG)]


def charges(tokens: int) -> list[Charge]:
    return [(lm, tokens if lm.unit is Unit.TOKENS else 1) for lm in LIMITS]


def memory(requests: int) -> dict[str, tuple[float, float]]:
    """µs per call, CPU time and wall time (the wall time counts other processes too)."""
    store = MemoryLimitStore()
    batch = 2000
    four = charges(700)
    three = four[:1] + four[2:]
    samples: dict[str, list[tuple[float, float]]] = {
        "admit (4 buckets + 1 slot, 3 layers)": [],
        "admit (3 buckets, 3 layers)": [],
        "admit + settle (4 buckets + 1 slot)": [],
    }
    clocks = (time.process_time, time.perf_counter)
    now = 0.0
    for _ in range(max(1, requests // batch)):
        t0 = [c() for c in clocks]
        decisions = [store.admit(four, SLOTS, now + i * 1e-4) for i in range(batch)]
        t1 = [c() for c in clocks]
        for d in decisions:
            assert d.hold is not None
            store.settle(d.hold, 650, now)
        t2 = [c() for c in clocks]
        decisions = [store.admit(three, (), now + i * 1e-4) for i in range(batch)]
        t3 = [c() for c in clocks]
        for d in decisions:
            assert d.hold is not None
            store.settle(d.hold, 0, now)
        now += 1.0
        for name, (start, end) in zip(samples, [(t0, t1), (t2, t3), (t0, t2)], strict=True):
            cpu, wall = ((e - s) / batch * 1e6 for s, e in zip(start, end, strict=True))
            samples[name].append((cpu, wall))
    return {
        name: (statistics.median(c for c, _ in runs), statistics.median(w for _, w in runs))
        for name, runs in samples.items()
    }


def guard_path(requests: int) -> dict[str, tuple[float, float]]:
    """µs per admission decision through the ``Guard`` (CPU time, wall time)."""
    from core_request import BODY, limited

    from ostiary.protocol.admission import Endpoint
    from ostiary.protocol.decoding import decode_chat
    from ostiary.protocol.exchange import Reservation
    from ostiary.protocol.generation import Usage
    from ostiary.protocol.guard import Guard
    from ostiary.protocol.request_limits import RequestLimits

    setup = limited()
    guard = Guard(setup["access"], tokens=setup["tokens"])
    principal = guard.access.principal("key:0123456789ab", guard.access.roles["admin"])
    call = decode_chat(BODY, RequestLimits())
    usage = Usage(prompt_tokens=9, completion_tokens=20)
    endpoint = Endpoint.CHAT
    batch = 2000
    clocks = (time.process_time, time.perf_counter)
    decide: list[tuple[float, float]] = []
    whole: list[tuple[float, float]] = []
    now = 0.0
    for _ in range(max(1, requests // batch)):
        t0 = [c() for c in clocks]
        held = []
        for i in range(batch):
            charges, slots, prompt = guard.charges(principal, "10.1.2.3", call, endpoint)
            decision = guard.judge(charges, slots, now + i * 1e-4)
            assert decision.hold is not None
            guard.headers(decision)
            held.append(Reservation(decision.hold, False, prompt))
        t1 = [c() for c in clocks]
        for reservation in held:
            guard.settle(reservation, usage, 0, now)
        t2 = [c() for c in clocks]
        now += 1.0
        for runs, (start, end) in ((decide, (t0, t1)), (whole, (t0, t2))):
            cpu, wall = ((e - s) / batch * 1e6 for s, e in zip(start, end, strict=True))
            runs.append((cpu, wall))
    return {
        name: (statistics.median(c for c, _ in runs), statistics.median(w for _, w in runs))
        for name, runs in (
            ("Guard: charges + judge + headers (6 + 1 slot)", decide),
            ("Guard: the same + settle with real usage", whole),
        )
    }


def percentiles(samples: list[float]) -> tuple[float, float]:
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99)]


PING = b"*1\r\n$4\r\nPING\r\n"
PONG = b"+PONG\r\n"


def blocking_ping(sock: socket.socket) -> float:
    """µs of one PING on a blocking socket: the kernel's and Redis' part alone."""
    t0 = time.perf_counter_ns()
    sock.sendall(PING)
    got = sock.recv(64)
    while len(got) < len(PONG):
        got += sock.recv(64)
    elapsed = (time.perf_counter_ns() - t0) / 1000
    assert got == PONG
    return elapsed


async def trio_ping(sock: socket.socket) -> float:
    """µs of one PING on a non-blocking socket under Trio: send, wait, receive."""
    t0 = time.perf_counter_ns()
    sock.send(PING)
    got = b""
    while len(got) < len(PONG):
        await trio.lowlevel.wait_readable(sock)
        got += sock.recv(64)
    elapsed = (time.perf_counter_ns() - t0) / 1000
    assert got == PONG
    return elapsed


async def through_redis(url: str, requests: int) -> dict[str, tuple[float, float]]:
    async with RedisClient.from_url(url, timeout=1.0, pool_size=16) as client:
        assert client._alarm is not None, "the watchdog runs: no cancel scope per call"
        store = RedisLimitStore(client, prefix="bench:")
        for _ in range(200):  # warm up: connections, scripts
            d = await store.admit(charges(700), SLOTS)
            assert d.hold is not None
            await store.settle(d.hold, 650)
        address = RedisAddress.from_url(url)
        blocking = socket.create_connection((address.host, address.port))
        blocking.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        bare = socket.create_connection((address.host, address.port))
        bare.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        bare.setblocking(False)
        admit, settle, ping, cpu, ping_blocking, ping_trio = [], [], [], [], [], []
        clock = time.perf_counter_ns
        cpu_clock = time.process_time_ns
        await client.execute("CONFIG", "RESETSTAT")
        for _ in range(requests):
            t0 = clock()
            c0 = cpu_clock()
            d = await store.admit(charges(700), SLOTS)
            cpu.append((cpu_clock() - c0) / 1000)
            t1 = clock()
            assert d.hold is not None
            await store.settle(d.hold, 650)
            t2 = clock()
            await client.execute("PING")
            t3 = clock()
            ping_blocking.append(blocking_ping(blocking))
            ping_trio.append(await trio_ping(bare))
            admit.append((t1 - t0) / 1000)
            settle.append((t2 - t1) / 1000)
            ping.append((t3 - t2) / 1000)
        blocking.close()
        bare.close()

        stats = (await client.execute("INFO", "commandstats")).decode()
        per_call = re.search(r"cmdstat_evalsha:calls=\d+,usec=\d+,usec_per_call=([\d.]+)", stats)
        shared = SharedLimits(store, timeout=1.0)
        through_shared = []
        for _ in range(requests // 4):
            t0 = clock()
            decision = await shared.decide(charges(700), SLOTS)
            through_shared.append((clock() - t0) / 1000)
            assert decision is not None and decision.hold is not None
            await store.settle(decision.hold, 650)

        done = 0

        async def caller(n: int) -> None:
            nonlocal done
            for _ in range(n):
                d = await store.admit(charges(700), SLOTS)
                assert d.hold is not None
                await store.settle(d.hold, 650)
                done += 1

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(16):
                nursery.start_soon(caller, requests // 16)
        rate = done / (time.perf_counter() - started)
    return {
        "admit (4 buckets + 1 slot, 3 layers)": percentiles(admit),
        "  the same through SharedLimits.decide": percentiles(through_shared),
        "  its CPU in this process": percentiles(cpu),
        "  Redis' time per script call (admit, settle)": (
            float(per_call.group(1)) if per_call else float("nan"),
        )
        * 2,
        "settle": percentiles(settle),
        "PING through our client": percentiles(ping),
        "PING, bare socket under Trio (floor)": percentiles(ping_trio),
        "PING, bare blocking socket (floor)": percentiles(ping_blocking),
        "admit + settle / s, 16 callers": (rate, rate),
    }


async def decide_when_told(url: str, requests: int) -> None:
    """Under callgrind: warm up, then ``requests`` admissions between two lines read
    from stdin (the counters zeroed before, dumped after)."""
    async with RedisClient.from_url(url, timeout=1.0, pool_size=16) as client:
        shared = SharedLimits(RedisLimitStore(client, prefix="bench:cg:"), timeout=1.0)
        for _ in range(200):
            assert await shared.decide(charges(700), SLOTS) is not None
        print("ready", flush=True)
        sys.stdin.readline()  # blocking: nothing else runs meanwhile
        for _ in range(requests):
            await shared.decide(charges(700), SLOTS)
        print("done", flush=True)
        sys.stdin.readline()


def callgrind(url: str, requests: int, pythonpath: str | None) -> float:
    """Instructions of this process per ``SharedLimits.decide`` (``pythonpath``: the
    ``src`` to import instead of this checkout's)."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        child = [sys.executable, __file__, "--decide-child", "--url", url]
        child += ["--requests", str(requests)]
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *child]
        with subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        ) as proc:
            assert proc.stdin is not None and proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
            subprocess.run(
                ["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True
            )
            proc.stdin.write("\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "done"
            subprocess.run(
                ["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True
            )
            proc.stdin.write("\n")
            proc.stdin.flush()
        dumps = sorted(Path(tmp).glob("callgrind.out*"), key=os.path.getmtime)
        dump = next(d for d in dumps if d != out)  # the one taken, not the last
        text = dump.read_text()
        total = re.search(r"^summary: (\d+)", text, re.M) or re.search(
            r"^totals: (\d+)", text, re.M
        )
        assert total, "no totals in the callgrind dump"
        return int(total.group(1)) / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--url", help="an existing Redis (default: start a private one)")
    parser.add_argument("--callgrind", action="store_true")
    parser.add_argument("--pythonpath", help="with --callgrind: another checkout's src too")
    parser.add_argument("--decide-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.decide_child:
        trio.run(decide_when_told, args.url, args.requests)
        return
    if args.callgrind:
        with nullcontext(args.url) if args.url else redis_server() as server:
            url = server if isinstance(server, str) else server.url
            for name in ("this checkout", args.pythonpath):
                if name is not None:
                    per = callgrind(url, args.requests, None if name == "this checkout" else name)
                    print(f"instructions per SharedLimits.decide, {name}: {per:,.0f}")
        return
    print("in memory, µs per call (median of batches; CPU, wall):")
    for name, (cpu, wall) in (memory(args.requests * 5) | guard_path(args.requests * 5)).items():
        print(f"  {name:45} {cpu:8.2f} {wall:8.2f}")
    with nullcontext(args.url) if args.url else redis_server() as server:
        url = server if isinstance(server, str) else server.url
        results = trio.run(through_redis, url, args.requests)
    print("through Redis on loopback, µs per call (median, p99):")
    for name, (median, p99) in results.items():
        if name.endswith("/ s, 16 callers"):
            print(f"  {name:45} {median:8.0f}")
        else:
            print(f"  {name:45} {median:8.1f} {p99:8.1f}")


if __name__ == "__main__":
    main()
