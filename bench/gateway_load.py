"""Load benchmarks of the whole gateway with wrk, on this machine, over loopback.

Scenarios (pick with ``--only``):

* ``scripted``: non-stream chat through the scripted backend at 1 and 64
  connections; a streaming load of 200 concurrent streams (chunks/s).
* ``access-log``: non-stream chat through the scripted backend at 64 connections with
  the access log on, as ``ostiary serve`` runs by default (JSON lines to stderr, here
  a file), and off; each as a share of the bare h11 ceiling measured in the same run.
  ``--pythonpath DIR`` serves another checkout's ``src`` (before/after comparisons).
* ``limits``: non-stream chat through the scripted backend at 64 connections, access
  log on, with no limits configured and then with a realistic set in the memory store
  (the principal's requests and tokens per minute and per day, an IP layer and a
  model layer; none refuses) — and with ``--redis-url``, the same limits in Redis;
  ``--rounds N`` alternates the configurations N times, ``--connections 64 256``
  adds loads (``--pythonpath`` as above).
* ``upstream``: the ``openai`` backend in front of ``bench/mock_upstream.py``:
  non-stream chat at 1, 16, 64 and 200 connections, and streams/s with 200 concurrent
  streams of 20 chunks.

wrk is installed with apt-get if missing. Everything runs on 127.0.0.1 and stops by
itself. Numbers go to stdout as a table (and ``--json`` for machines).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from serving import running

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True, capture_output=True)
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("wrk is not available")
    return found


@contextmanager
def ostiary(
    backend_toml: str,
    env: dict[str, str] | None = None,
    *,
    access_log: bool = False,
    pids: list[int] | None = None,
) -> Iterator[tuple[int, str]]:
    """Serve ``backend_toml``; yield its port and admin key (and append its pid to
    ``pids``)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "bench.toml"
        cfg.write_text(
            f'[server]\nport = 0\nstate_dir = "{tmp}/state"\n'
            f"access_log = {str(access_log).lower()}\n"
            f"max_connections = 4096\n\n{backend_toml}"
        )
        serve = [PY, "-m", "ostiary.runtime.cli", "serve", "--config", str(cfg)]
        with running(serve, cwd=ROOT, env=env) as (proc, port):
            if pids is not None:
                pids.append(proc.pid)
            key = (Path(tmp) / "state" / "admin.key").read_text().strip()
            yield port, key


def wrk(
    url: str, key: str, body: str, connections: int, seconds: int, threads: int = 2
) -> dict[str, float]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as lua:
        lua.write(
            'wrk.method = "POST"\n'
            f"wrk.body = [[{body}]]\n"
            'wrk.headers["Content-Type"] = "application/json"\n'
            f'wrk.headers["Authorization"] = "Bearer {key}"\n'
        )
    try:
        out = subprocess.run(
            [
                ensure_wrk(),
                f"-t{min(threads, connections)}",
                f"-c{connections}",
                f"-d{seconds}s",
                "--latency",
                "-s",
                lua.name,
                url,
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=seconds + 60,
        ).stdout
    finally:
        os.unlink(lua.name)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}

    def ms(pattern: str) -> float:
        found = re.search(pattern + r"([\d.]+)(us|ms|s)\b", out)
        return float(found.group(1)) * scale[found.group(2)] if found else float("nan")

    return {
        "rps": rps,
        "non2xx": float(errors.group(1)) if errors else 0.0,
        "p50_ms": ms(r"50%\s+"),
        "p99_ms": ms(r"99%\s+"),
        "max_ms": ms(r"Latency\s+\S+\s+\S+\s+"),  # avg, stdev, max
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def detail(unit: str, r: dict[str, float]) -> str:
    return f"{unit}, p99 {r['p99_ms']:.1f} ms, non-2xx {r['non2xx']:.0f}"


CHAT = '{"model":"%s","messages":[{"role":"user","content":"hello there"}]%s}'


def ceiling(seconds: int) -> list[tuple[str, float, str]]:
    """The same load against a bare h11-on-trio server: the machine's ceiling now."""
    with running([PY, str(ROOT / "bench" / "raw_h11.py"), "--port", "0"], cwd=ROOT) as (_, port):
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        r = wrk(url, "x", CHAT % ("s", ""), 64, seconds)
    return [("ceiling: bare h11 on trio, 64 conn", r["rps"], detail("req/s", r))]


def scripted(seconds: int) -> list[tuple[str, float, str]]:
    rows = ceiling(seconds)
    backend = '[[backends]]\nname = "s"\nkind = "scripted"\nmodels = ["s"]\nchunks = 1\n'
    with ostiary(backend) as (port, key):
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        wrk(url, key, CHAT % ("s", ""), 16, 2)  # warm-up
        for conns in (1, 64):
            r = wrk(url, key, CHAT % ("s", ""), conns, seconds)
            rows.append((f"scripted non-stream chat, {conns} conn", r["rps"], detail("req/s", r)))
    chunks = 100
    backend = f'[[backends]]\nname = "s"\nkind = "scripted"\nmodels = ["s"]\nchunks = {chunks}\n'
    with ostiary(backend) as (port, key):
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        r = wrk(url, key, CHAT % ("s", ',"stream":true'), 200, seconds)
        unit = f"chunks/s ({r['rps']:.0f} streams/s x {chunks})"
        rows.append(("scripted streaming, 200 streams", r["rps"] * chunks, detail(unit, r)))
    return rows


def access_log(seconds: int, pythonpath: str | None) -> list[tuple[str, float, str]]:
    rows = ceiling(seconds)
    top = rows[0][1]
    env = dict(os.environ, PYTHONPATH=pythonpath) if pythonpath else None
    backend = '[[backends]]\nname = "s"\nkind = "scripted"\nmodels = ["s"]\nchunks = 1\n'
    for on in (True, False):
        with ostiary(backend, env, access_log=on) as (port, key):
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            wrk(url, key, CHAT % ("s", ""), 16, 2)  # warm-up
            r = wrk(url, key, CHAT % ("s", ""), 64, seconds)
            label = f"scripted non-stream chat, access log {'on' if on else 'off'}, 64 conn"
            rows.append((label, r["rps"], detail(f"req/s, {r['rps'] / top:.0%} of ceiling", r)))
    return rows


#: Limits high enough never to refuse, so every request pays the full admission.
LIMITS = """
[[roles]]
name = "admin"
endpoints = ["chat.completions", "completions", "embeddings", "models", "queue", "metrics"]
requests_per_minute = 100000000
tokens_per_minute = 10000000000
requests_per_day = 1000000000
max_concurrent = 100000

[[rate_limits]]
scope = "ip"
requests_per_minute = 100000000

[[rate_limits]]
scope = "model"
requests_per_minute = 100000000
tokens_per_minute = 10000000000
"""


def limits(
    seconds: int,
    redis_url: str | None,
    rounds: int,
    pythonpath: str | None,
    connections: list[int],
) -> list[tuple[str, float, str]]:
    """Every configuration served at once; ``rounds`` runs of each, interleaved (none,
    memory, [Redis], then the other way round, ...), so a busy machine weighs on all
    alike. The figure is
    the median round; the share of each round is against that round's no-limits run.
    The server's own CPU time per request (µs) is less at the mercy of a busy machine
    than its requests per second."""
    rows = ceiling(seconds)
    top = rows[0][1]
    env = dict(os.environ, PYTHONPATH=pythonpath) if pythonpath else None
    backend = '[[backends]]\nname = "s"\nkind = "scripted"\nmodels = ["s"]\nchunks = 1\n'
    runs = [("no limits", ""), ("limits in memory", LIMITS)]
    if redis_url:
        runs.append(("limits in Redis", LIMITS + f'\n[redis]\nurl = "{redis_url}"\n'))
    with ExitStack() as stack:
        urls = []
        pids: list[int] = []
        for _, extra in runs:
            served = ostiary(extra + backend, env, access_log=True, pids=pids)
            port, key = stack.enter_context(served)
            urls.append((f"http://127.0.0.1:{port}/v1/chat/completions", key))
            wrk(*urls[-1], CHAT % ("s", ""), 16, 2)  # warm-up
        # results[config][load]: one run per round
        results: list[list[list[dict[str, float]]]] = [[[] for _ in connections] for _ in runs]
        order = list(zip(urls, pids, results, strict=True))
        for round_ in range(rounds):
            # ABBA: every other round runs the configurations the other way round, so
            # that a machine speeding up or slowing down within a round favours none.
            for (url, key), pid, out in order if round_ % 2 == 0 else order[::-1]:
                for conns, runs_here in zip(connections, out, strict=True):
                    before = cpu_seconds(pid)
                    r = wrk(url, key, CHAT % ("s", ""), conns, seconds)
                    r["cpu_us"] = (cpu_seconds(pid) - before) / (r["rps"] * seconds) * 1e6
                    runs_here.append(r)
    for (label, _), per_load in zip(runs, results, strict=True):
        for conns, done, base_runs in zip(connections, per_load, results[0], strict=True):
            rps = [x["rps"] for x in done]
            shares = [x / base["rps"] for x, base in zip(rps, base_runs, strict=True)]
            best = done[rps.index(statistics.median_low(rps))]
            cpu = [c["cpu_us"] for c in done]
            cpu_shares = [b["cpu_us"] / c for c, b in zip(cpu, base_runs, strict=True)]
            share = (
                f"{statistics.median(shares):.0%} of no limits (rounds: {_shares(shares)}), "
                f"{best['rps'] / top:.0%} of ceiling; server CPU {statistics.median(cpu):.0f} "
                f"us/request, no limits' CPU / this {statistics.median(cpu_shares):.0%} "
                f"(rounds: {_shares(cpu_shares)})"
            )
            rows.append(
                (
                    f"scripted non-stream chat, {label}, {conns} conn",
                    best["rps"],
                    detail(f"req/s, {share}", best),
                )
            )
    return rows


def _shares(shares: list[float]) -> str:
    return ", ".join(f"{x:.0%}" for x in shares)


def upstream(seconds: int) -> list[tuple[str, float, str]]:
    mock = [PY, str(ROOT / "bench" / "mock_upstream.py"), "--port", "0", "--chunks", "20"]
    with running(mock, cwd=ROOT) as (_, mock_port):
        backend = (
            '[[backends]]\nname = "up"\nkind = "openai"\nmodels = ["relay"]\n'
            f'base_url = "http://127.0.0.1:{mock_port}/v1"\n'
            "max_concurrency = 1024\nmax_queue = 4096\n"
        )
        return _upstream_rows(backend, seconds)


def _upstream_rows(backend: str, seconds: int) -> list[tuple[str, float, str]]:
    rows = []
    with ostiary(backend) as (port, key):
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        wrk(url, key, CHAT % ("relay", ""), 16, 2)
        for conns in (1, 16, 64, 200):
            r = wrk(url, key, CHAT % ("relay", ""), conns, seconds)
            rows.append((f"openai backend non-stream, {conns} conn", r["rps"], detail("req/s", r)))
        for conns in (1, 16, 64, 200):
            r = wrk(url, key, CHAT % ("relay", ',"stream":true'), conns, seconds)
            label = f"openai backend streams (20 chunks), {conns} conc"
            rows.append((label, r["rps"], detail("streams/s", r)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", choices=["scripted", "access-log", "limits", "upstream"])
    parser.add_argument("--redis-url", help="also measure the limits in this Redis")
    parser.add_argument("--pythonpath", help="serve the ostiary package found here")
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds (limits)")
    parser.add_argument(
        "--connections", type=int, nargs="+", default=[64], help="of the limits scenario"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows: list[tuple[str, float, str]] = []
    if args.only in (None, "scripted"):
        rows += scripted(args.seconds)
    if args.only in (None, "access-log"):
        rows += access_log(args.seconds, args.pythonpath)
    if args.only in (None, "limits"):
        rows += limits(args.seconds, args.redis_url, args.rounds, args.pythonpath, args.connections)
    if args.only in (None, "upstream"):
        rows += upstream(args.seconds)
    if args.json:
        print(json.dumps([{"scenario": s, "value": v, "unit": u} for s, v, u in rows]))
    else:
        for scenario, value, unit in rows:
            print(f"{scenario:48s} {value:10.0f} {unit}")


if __name__ == "__main__":
    main()
