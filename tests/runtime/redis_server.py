"""A private ``redis-server`` on a free loopback port, for tests and benchmarks.

A free port is found by binding port 0 and releasing it, which races with every
other process picking ports at the same time; so :meth:`RedisServer.start` watches
the server's own log, and when it says the address is in use it tries again on a
new port (a port given by the caller is kept, tried again a few times). Readiness
is Redis' own "Ready to accept connections" line, read by a thread that drains the
log for the process' whole life (a full pipe would otherwise stall the server), so
waiting for it needs no polling and ends with the process if it dies.

Stopping is explicit and synchronous: :meth:`kill` (SIGKILL, as a crash),
:meth:`stop` (SIGTERM, a clean exit), :meth:`restart` (kill then start on the same
port: an empty server, as after a crash without persistence), :meth:`paused`
(SIGSTOP: alive but silent, as a hung server).
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["RedisServer", "free_port", "redis_server"]

#: Seconds a start may take before it is given up.
START_TIMEOUT = 20.0
_ATTEMPTS = 8


def free_port() -> int:
    """A port free right now (racy by nature: see the module docstring)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class _Log:
    """Drains a process' output; tells when it became ready or why it exited."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=200)
        self.ok = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._drain, args=(process,), daemon=True)
        self._thread.start()

    def _drain(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        try:
            for line in process.stdout:
                self.lines.append(line.rstrip())
                if "Ready to accept connections" in line:
                    self.ok = True
                    self._done.set()
        finally:
            self._done.set()

    def wait(self, timeout: float) -> bool:
        """True once ready, False if the process' output ended first."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"redis-server was not ready within {timeout} s")
        return self.ok

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1; may be killed and started again."""

    def __init__(
        self,
        port: int | None = None,
        *,
        executable: str | None = None,
        unix_socket: str | None = None,
    ) -> None:
        self._fixed = port is not None
        #: A Unix socket to listen on too (``unix_url``).
        self.unix_socket = unix_socket
        self.port = port or free_port()
        #: ``$OSTIARY_REDIS_SERVER`` runs the tests against another server (Valkey).
        self.executable = executable or os.environ.get("OSTIARY_REDIS_SERVER", "redis-server")
        self.process: subprocess.Popen[str] | None = None
        self._log: _Log | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        assert self.unix_socket is not None, "not listening on a Unix socket"
        return f"unix://{self.unix_socket}"

    @property
    def pid(self) -> int:
        assert self.process is not None, "not running"
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start the server and return once it accepts connections."""
        if self.running:
            raise RuntimeError("redis-server is running already")
        for _ in range(_ATTEMPTS):
            if self._try_start():
                return
            assert self._log is not None
            if "in use" not in self._log.text:
                raise RuntimeError(f"redis-server did not start:\n{self._log.text}")
            if not self._fixed:
                self.port = free_port()
        raise RuntimeError(f"no free port for redis-server after {_ATTEMPTS} tries")

    def _try_start(self) -> bool:
        command = [self.executable, "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no", "--loglevel", "notice"]
        command += ["--dir", os.environ.get("TMPDIR", "/tmp")]
        if self.unix_socket is not None:
            command += ["--unixsocket", self.unix_socket, "--unixsocketperm", "700"]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self._log = _Log(self.process)
        try:
            ready = self._log.wait(START_TIMEOUT)
        except TimeoutError:
            self.kill()
            raise
        if not ready:
            self.process.wait()
            self.process = None
        return ready

    def kill(self) -> None:
        """SIGKILL: the server vanishes as in a crash, every connection reset."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM: a clean shutdown."""
        self._end(signal.SIGTERM)

    def restart(self) -> None:
        """Kill and start again on the same port: an empty server, scripts included."""
        self.kill()
        self._fixed = True
        self.start()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """SIGSTOP for the block: connections stay open, nothing is answered."""
        pid = self.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(pid, signal.SIGCONT)

    def _end(self, sig: signal.Signals) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(sig)
            if sig is not signal.SIGKILL:
                os.kill(process.pid, signal.SIGCONT)  # a paused one must run to exit
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def redis_server(*, unix_socket: str | None = None) -> Iterator[RedisServer]:
    server = RedisServer(unix_socket=unix_socket)
    server.start()
    try:
        yield server
    finally:
        server.kill()
