"""The gateway with its limits in Redis while Redis stops answering, on loopback.

A private ``redis-server`` (or ``--port`` of one you started), the limits of
``gateway_load.py``'s ``limits`` scenario, wrk at ``--connections``: first a run with
Redis healthy; then one during which Redis is SIGSTOPped after a third of the run
and SIGCONTed after two thirds; then one with Redis stopped throughout (what a hung
Redis costs each request: the latency percentiles). For ``on_failure = "refuse"``
(503s) and ``"local"`` (counted in process: 2xx).

    python bench/redis_outage.py [--connections 64] [--seconds 9]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from gateway_load import CHAT, LIMITS, ostiary, wrk

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.runtime.redis_server import redis_server


def stop_between(pid: int, start: float, end: float) -> threading.Thread:
    def run() -> None:
        threading.Event().wait(start)
        os.kill(pid, signal.SIGSTOP)
        threading.Event().wait(end - start)
        os.kill(pid, signal.SIGCONT)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=int, default=9)
    args = parser.parse_args()
    backend = '[[backends]]\nname = "s"\nkind = "scripted"\nmodels = ["s"]\nchunks = 1\n'
    conns, seconds = args.connections, args.seconds
    with redis_server() as redis:
        for on_failure in ("refuse", "local"):
            toml = LIMITS + f'\n[redis]\nurl = "{redis.url}"\non_failure = "{on_failure}"\n'
            with ostiary(toml + backend, access_log=True) as (port, key):
                url = f"http://127.0.0.1:{port}/v1/chat/completions"
                wrk(url, key, CHAT % ("s", ""), 16, 2)  # warm-up
                for label in ("healthy", "stopped mid-run", "stopped throughout"):
                    thread = None
                    if label == "stopped mid-run":
                        thread = stop_between(redis.pid, seconds / 3, 2 * seconds / 3)
                    elif label == "stopped throughout":
                        os.kill(redis.pid, signal.SIGSTOP)
                    try:
                        r = wrk(url, key, CHAT % ("s", ""), conns, seconds)
                    finally:
                        if thread is not None:
                            thread.join()
                        os.kill(redis.pid, signal.SIGCONT)
                    print(
                        f"on_failure={on_failure:6s} {label:18s} {conns} conn: "
                        f"{r['rps']:6.0f} req/s, non-2xx {r['non2xx']:6.0f}, "
                        f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
                        f"max {r['max_ms']:.1f} ms",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
