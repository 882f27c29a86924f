"""End-to-end cost of rate limits: non-stream chat through the scripted backend.

Three configurations of one ``ostiary serve``, the same key (role ``tenant``), wrk at
64 connections, in the same run:

* ``none``: the role has no limits and no ``[[rate_limits]]`` apply;
* ``memory``: a realistic set, judged in process: the principal's layer (requests and
  tokens per minute, a concurrency cap), an ``ip`` layer and a ``model`` layer,
  all large enough never to refuse;
* ``redis``: the same set in a private ``redis-server`` (``[redis]``): one EVALSHA
  per admission and one per settlement. On this machine Redis shares its cores with
  the server and wrk, so this is what a single host gets, not what a Redis of its
  own would give.

Each configuration runs ``--rounds`` times, interleaved (none, memory, redis, none,
...), so slow drifts of a shared machine hit all three alike; the median is shown,
with each as a share of ``none``.

    python bench/limits_load.py [--seconds 6] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gateway_load import CHAT, wrk
from serving import running

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.runtime.redis_server import redis_server  # noqa: E402

PY = sys.executable
BIG = 10**9
BACKEND = '[[backends]]\nname = "s"\nkind = "scripted"\nmodels = ["s"]\nchunks = 1\n'
LIMITED = f"""
[[roles]]
name = "tenant"
requests_per_minute = {BIG}
tokens_per_minute = {BIG}
max_concurrent = 100000

[[rate_limits]]
scope = "ip"
requests_per_minute = {BIG}

[[rate_limits]]
scope = "model"
tokens_per_minute = {BIG}
"""
UNLIMITED = '\n[[roles]]\nname = "tenant"\n'


def config(tmp: str, limits: str, redis_url: str | None) -> Path:
    path = Path(tmp) / "bench.toml"
    redis = f'\n[redis]\nurl = "{redis_url}"\ntimeout = 0.5\n' if redis_url else ""
    path.write_text(
        f'[server]\nport = 0\nstate_dir = "{tmp}/state"\naccess_log = false\n'
        f"max_connections = 4096\n{redis}{limits}\n{BACKEND}"
    )
    return path


@contextmanager
def ostiary(limits: str, redis_url: str | None) -> Iterator[tuple[int, str]]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(tmp, limits, redis_url)
        cli = [PY, "-m", "ostiary.runtime.cli"]
        key = subprocess.run(
            [*cli, "keys", "create", "--name", "bench", "--role", "tenant", "--config", str(cfg)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        with running([*cli, "serve", "--config", str(cfg)], cwd=ROOT) as (_, port):
            yield port, key


def measure(limits: str, redis_url: str | None, seconds: int) -> dict[str, float]:
    with ostiary(limits, redis_url) as (port, key):
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        wrk(url, key, CHAT % ("s", ""), 16, 2)  # warm-up
        return wrk(url, key, CHAT % ("s", ""), 64, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"none": [], "memory": [], "redis": []}
    with redis_server() as redis:
        for _ in range(args.rounds):
            runs["none"].append(measure(UNLIMITED, None, args.seconds))
            runs["memory"].append(measure(LIMITED, None, args.seconds))
            runs["redis"].append(measure(LIMITED, redis.url, args.seconds))
    base = statistics.median(r["rps"] for r in runs["none"])
    for name, results in runs.items():
        rps = statistics.median(r["rps"] for r in results)
        p99 = statistics.median(r["p99_ms"] for r in results)
        non2xx = sum(r["non2xx"] for r in results)
        each = ", ".join(f"{r['rps']:.0f}" for r in results)
        print(
            f"{name:8s} {rps:8.0f} req/s  {rps / base:5.0%} of none  p99 {p99:6.1f} ms"
            f"  non-2xx {non2xx:.0f}  (runs: {each})"
        )


if __name__ == "__main__":
    main()
