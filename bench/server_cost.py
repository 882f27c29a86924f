"""CPU cost per request of a real ``ostiary serve`` over loopback, as users run it.

The server runs as ``ostiary serve`` does by default (access log on, to a file, auth
on) in front of the scripted backend; a client sends non-stream chat requests on
``--connections`` keep-alive connections. What is measured is the server process
alone, for exactly ``--requests`` requests after a warm-up:

- its CPU time (user + system, from ``/proc/<pid>/stat``): the kernel's share of
  sockets and epoll included, and far less sensitive than requests/s to what other
  processes of a busy machine do, though not immune to it (caches, frequency);
- with ``--callgrind``, its instructions (user space) under valgrind, counted from
  zero after the warm-up (``callgrind_control``): exactly repeatable; with
  ``--cache-sim`` also its L1 instruction-cache misses (valgrind's simulated cache).

``--pythonpath DIR`` serves another checkout's ``src``, so that two versions are
compared in one run (``--rounds`` alternates them)::

    python bench/server_cost.py [--requests 4000] [--connections 16] [--callgrind [--cache-sim]]
                                [--pythonpath OTHER/src] [--rounds 3] [--limits]
                                [--access-log true|false]
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
import threading
from pathlib import Path

from gateway_load import LIMITS
from serving import running

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
BODY = b'{"model":"s","messages":[{"role":"user","content":"hello there"}]}'
BACKEND = '[[backends]]\nname = "s"\nkind = "scripted"\nmodels = ["s"]\nchunks = 1\n'


def request_bytes(key: str) -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\n"
        b"content-type: application/json\r\nauthorization: Bearer %s\r\n"
        b"content-length: %d\r\n\r\n%s" % (key.encode(), len(BODY), BODY)
    )


def drive(port: int, request: bytes, total: int, connections: int) -> int:
    """Send ``total`` requests over ``connections`` keep-alive connections; returns
    how many were answered 200."""
    per = [total // connections + (i < total % connections) for i in range(connections)]
    ok = [0] * connections

    def one(i: int) -> None:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            buf = b""
            for _ in range(per[i]):
                sock.sendall(request)
                while b"\r\n\r\n" not in buf:
                    buf += sock.recv(65536)
                head, _, buf = buf.partition(b"\r\n\r\n")
                found = re.search(rb"content-length: (\d+)", head, re.I)
                assert found, head
                length = int(found.group(1))
                while len(buf) < length:
                    buf += sock.recv(65536)
                buf = buf[length:]
                ok[i] += head.startswith(b"HTTP/1.1 200")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(ok)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def measure(args: argparse.Namespace, pythonpath: str | None) -> float:
    """CPU µs (or instructions, with --callgrind) per request of one server run."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "bench.toml"
        cfg.write_text(
            f'[server]\nport = 0\nstate_dir = "{tmp}/state"\naccess_log = {args.access_log}\n'
            f"max_connections = 4096\n\n{LIMITS if args.limits else ''}{BACKEND}"
        )
        serve = [PY, "-m", "ostiary.runtime.cli", "serve", "--config", str(cfg)]
        out = Path(tmp) / "callgrind.out"
        if args.callgrind:
            serve = [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                *(["--cache-sim=yes"] if args.cache_sim else []),
                *serve,
            ]
        with running(serve, cwd=ROOT, env=env, timeout=600) as (proc, port):
            key = (Path(tmp) / "state" / "admin.key").read_text().strip()
            request = request_bytes(key)
            warm = drive(port, request, max(200, args.requests // 5), args.connections)
            assert warm > 0, "the warm-up got no 200"
            if args.callgrind:
                subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True)
            before = cpu_seconds(proc.pid)
            answered = drive(port, request, args.requests, args.connections)
            after = cpu_seconds(proc.pid)
            if answered != args.requests:
                raise SystemExit(f"only {answered} of {args.requests} requests got 200")
            if args.callgrind:
                subprocess.run(
                    ["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True
                )
                dumps = sorted(Path(tmp).glob("callgrind.out*"), key=os.path.getmtime)
                text = dumps[-1].read_text()
                if args.keep:  # for callgrind_annotate
                    Path(args.keep).write_text(text)
                total = re.search(r"^summary: ([\d ]+)", text, re.M) or re.search(
                    r"^totals: ([\d ]+)", text, re.M
                )
                events = re.search(r"^events: (.*)", text, re.M)
                assert total and events, "no totals in the callgrind dump"
                counts = dict(
                    zip(events.group(1).split(), map(int, total.group(1).split()), strict=True)
                )
                if args.cache_sim:
                    misses = counts["I1mr"] / args.requests
                    print(f"    I1 misses per request: {misses:,.1f}", flush=True)
                return float(counts["Ir"] / args.requests)
        return float((after - before) / args.requests * 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--callgrind", action="store_true")
    parser.add_argument("--pythonpath", help="another checkout's src, measured alongside")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--limits", action="store_true", help="the gateway_load limit set")
    parser.add_argument("--access-log", choices=["true", "false"], default="true")
    parser.add_argument(
        "--cache-sim", action="store_true", help="with --callgrind: also count I1 misses"
    )
    parser.add_argument("--keep", metavar="FILE", help="with --callgrind: keep the dump here")
    args = parser.parse_args()
    unit = "instructions" if args.callgrind else "CPU µs"
    runs: dict[str, list[float]] = {"this checkout": []}
    if args.pythonpath:
        runs[args.pythonpath] = []
    for _ in range(args.rounds):
        for name, values in runs.items():
            value = measure(args, None if name == "this checkout" else name)
            values.append(value)
            print(f"  {name}: {value:,.1f} {unit} per request", flush=True)
    print(f"{unit} per request (median of {args.rounds}):")
    base = statistics.median(runs["this checkout"])
    for name, values in runs.items():
        median = statistics.median(values)
        print(f"  {name:40} {median:12,.1f}  ({median / base:.3f} of this checkout)")


if __name__ == "__main__":
    main()
