"""The processes a benchmark measures, each on a port the kernel picks as it binds.

Every server here binds port 0 and says which port it got: ``ostiary serve`` in its
one ``listening`` log record (JSON, with ``url``), ``raw_h11.py`` and
``mock_upstream.py`` in a first line ``listening on <url>``. :func:`running` starts
one with its output going to a file (a pipe nobody reads would fill and stall the
server), reads the port from that file and, on leaving, stops the process.
"""

from __future__ import annotations

import json
import signal
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

__all__ = ["LISTENING", "announce", "reported_port", "running"]

#: The line ``raw_h11.py`` and ``mock_upstream.py`` print first.
LISTENING = "listening on "


def announce(host: str, port: int) -> None:
    """Print the line :func:`running` waits for (for the scripts' own servers)."""
    print(f"{LISTENING}http://{host}:{port}", flush=True)


def reported_port(text: str) -> int | None:
    """The port in the first ``listening`` record or line of ``text``, if any yet."""
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        url = None
        if line.startswith(LISTENING):
            url = line[len(LISTENING) :].strip()
        elif line.startswith("{"):
            record = json.loads(line)
            if record.get("msg") == "listening":
                url = str(record["url"])
        if url is not None:
            return urllib.parse.urlsplit(url).port
    return None


@contextmanager
def running(
    args: Sequence[str],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """Start ``args`` and yield ``(process, port)`` once it has reported its port;
    SIGTERM (then kill, after 20 s) on the way out."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "output.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=cwd, env=env
            )
        try:
            deadline = time.monotonic() + timeout
            while (port := reported_port(log.read_text("utf-8", "replace"))) is None:
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = log.read_text("utf-8", "replace")[-2000:]
                    raise SystemExit(f"{' '.join(args)} reported no port; output:\n{tail}")
                with suppress(subprocess.TimeoutExpired):
                    proc.wait(0.05)
            yield proc, port
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
