"""Every benchmark in turn, with short runs, for a quick look at all the numbers.

``make bench`` runs this. Each benchmark is its own script (run one alone, with its
own defaults, for numbers worth comparing); here each gets a few seconds at most, in
a child process, and its output is printed under its name. A benchmark that fails
does not stop the others; the exit status says whether any failed.

    python bench/run_all.py [--only NAME ...] [--full]

``--full`` runs each with its own (longer) defaults instead.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent

#: (name, script, what it measures, how long: the arguments that shorten it). Servers
#: (raw_h11, mock_upstream) are started by the benchmarks that need them.
BENCHMARKS: list[tuple[str, str, list[str], list[str]]] = [
    ("inprocess", "inprocess.py", [], ["--requests", "2000"]),
    ("core_request", "core_request.py", [], ["--requests", "3000"]),
    ("inprocess-stream", "inprocess.py", ["--stream", "--chunks", "20"], ["--requests", "500"]),
    ("client_curve", "client_curve.py", [], ["--seconds", "0.5", "--concurrency", "1", "64"]),
    ("gateway_load", "gateway_load.py", [], ["--seconds", "2"]),
    ("server_cost", "server_cost.py", [], ["--requests", "1000"]),
    ("limits", "limits.py", [], ["--requests", "2000"]),
    ("metrics_render", "metrics_render.py", [], ["--runs", "3"]),
    ("embedded_tokens", "embedded_tokens.py", ["--http"], ["--runs", "3", "--max-tokens", "32"]),
]


def run(name: str, script: str, args: list[str]) -> bool:
    command = [sys.executable, str(BENCH / script), *args]
    print(f"== {name}: {' '.join(command[1:])}", flush=True)
    started = time.monotonic()
    code = subprocess.run(command, cwd=BENCH.parent, check=False).returncode
    print(f"== {name}: exit {code} after {time.monotonic() - started:.1f} s\n", flush=True)
    return code == 0


def main() -> int:
    names = [name for name, *_ in BENCHMARKS]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=names, default=names)
    parser.add_argument("--full", action="store_true", help="each benchmark's own defaults")
    args = parser.parse_args()
    failed = [
        name
        for name, script, what, short in BENCHMARKS
        if name in args.only and not run(name, script, what + ([] if args.full else short))
    ]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
