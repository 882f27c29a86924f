"""End-to-end fixtures: the real ``ostiary serve`` process on a loopback port.

:func:`launch_server` (session-scoped) starts servers from a ``[[backends]]`` TOML
fragment, each with its own temporary ``state_dir`` and ``port = 0``: the kernel
picks the port while the server binds it, and the test reads it from the server's
one ``listening`` log record (a bounded poll of the log and the process, never a
fixed sleep), so no other process can take the port in between. It then reads the
bootstrap admin key. At the end of the session each server gets SIGTERM
and must exit 0 within :data:`STOP_TIMEOUT` seconds, with no secret it ever handed
out in its log.

:func:`scripted_server` is one such server with the scripted backend, shared by the
whole session.

:class:`Api` drives a server with the official ``openai`` SDK (strict response
validation) through a transport that records every raw response, so one SDK call
gives both the SDK's parsed object and the exact bytes to check against the spec.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx2
import openai
import orjson
import pytest

from tests.e2e import spec

#: Seconds a server may take from spawn to accepting connections.
START_TIMEOUT = 20.0
#: Seconds a server may take to exit after SIGTERM (its drain_timeout is shorter).
STOP_TIMEOUT = 10.0
#: How long a single readiness/poll wait on the process lasts.
POLL_INTERVAL = 0.02
#: Seconds a CLI subprocess (``ostiary keys ...``) may take.
CLI_TIMEOUT = 30.0
#: Seconds any one HTTP request to a test server may take.
HTTP_TIMEOUT = 15.0
#: How often test servers poll their key store (``[auth] key_reload_interval``).
KEY_RELOAD_INTERVAL = 0.1

SCRIPTED_BACKEND = """
[[backends]]
name = "scripted"
kind = "scripted"
models = ["scripted", "scripted-embed"]
embedding_models = ["scripted-embed"]
"""


def server_config(state_dir: Path, backends: str) -> str:
    return (
        "[server]\n"
        'host = "127.0.0.1"\n'
        "port = 0\n"
        f'state_dir = "{state_dir}"\n'
        'log_format = "json"\n'
        "access_log = true\n"
        "drain_timeout = 2.0\n"
        "[auth]\n"
        f"key_reload_interval = {KEY_RELOAD_INTERVAL}\n" + backends
    )


def log_records(text: str) -> list[dict[str, Any]]:
    """The complete JSON records of a server's log (a line still being written, and
    any line that is not JSON, are left out)."""
    records = []
    for line in text.splitlines(keepends=True):
        if line.startswith("{") and line.endswith("\n"):
            record = orjson.loads(line)
            if isinstance(record, dict):
                records.append(record)
    return records


class ServerProcess:
    """One running ``ostiary serve`` and what a test needs to talk to it."""

    def __init__(
        self,
        name: str,
        process: subprocess.Popen[bytes],
        workdir: Path,
        config_path: Path,
        state_dir: Path,
        stderr_path: Path,
        env: Mapping[str, str],
    ) -> None:
        self.name = name
        self.process = process
        self._port: int | None = None
        self.workdir = workdir
        self.config_path = config_path
        self.state_dir = state_dir
        self.stderr_path = stderr_path
        self.env = dict(env)
        self.key = ""
        #: Every secret this server's store handed out (checked against the log).
        self.secrets: list[str] = []

    @property
    def port(self) -> int:
        """The port the server reported in its ``listening`` record."""
        assert self._port is not None, f"server {self.name!r} has not reported its port yet"
        return self._port

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    def log_text(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def log_records(self, msg: str) -> list[dict[str, Any]]:
        """The server's JSON log records whose ``msg`` is ``msg``, oldest first."""
        return [r for r in log_records(self.log_text()) if r.get("msg") == msg]

    def wait_for_log(self, msg: str, count: int, timeout: float) -> dict[str, Any]:
        """The ``count``-th record with ``msg``, once the server has logged it (a
        bounded poll of the log and the process: a hang guard, not a measure)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.log_records(msg)
            if len(found) >= count:
                return found[count - 1]
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"server {self.name!r} logged {len(found)} {msg!r} records, not "
                    f"{count}, within {timeout} s; log:\n{self.log_text()[-4000:]}"
                )
            self.pause()

    def pause(self, seconds: float = POLL_INTERVAL) -> None:
        """Wait on the process for up to ``seconds``: the paced step of a bounded
        poll, which also notices at once if the server died."""
        try:
            code = self.process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            return
        raise AssertionError(
            f"server {self.name!r} exited with status {code}; log:\n{self.log_text()[-4000:]}"
        )

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``ostiary <args> --config <this server's config>``."""
        result = subprocess.run(
            [sys.executable, "-m", "ostiary.runtime.cli", *args, "--config", str(self.config_path)],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"ostiary {' '.join(args)} exited {result.returncode}: {result.stderr}"
            )
        return result

    def wait_until_listening(self, timeout: float = START_TIMEOUT) -> None:
        """Read the port from the server's ``listening`` record (one per listener;
        the tests bind one loopback address)."""
        url = urllib.parse.urlsplit(str(self.wait_for_log("listening", 1, timeout)["url"]))
        assert url.hostname == "127.0.0.1" and url.port, url
        self._port = url.port

    def stop(self) -> int:
        """SIGTERM, then the exit status (killed and failed if it takes too long)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT)
            raise AssertionError(
                f"server {self.name!r} did not exit within {STOP_TIMEOUT} s of SIGTERM"
            ) from None


Launcher = Callable[..., ServerProcess]


def _start(
    root: Path, name: str, backends: str, extra_env: Mapping[str, str] | None
) -> ServerProcess:
    workdir = root / name
    workdir.mkdir()
    state_dir = workdir / "state"
    config_path = workdir / "cfg.toml"
    config_path.write_text(server_config(state_dir, backends), encoding="utf-8")
    stderr_path = workdir / "stderr.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env.update(extra_env or {})
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "ostiary.runtime.cli", "serve", "--config", str(config_path)],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    server = ServerProcess(name, process, workdir, config_path, state_dir, stderr_path, env)
    try:
        server.wait_until_listening()
        server.key = (state_dir / "admin.key").read_text(encoding="ascii").strip()
    except BaseException:
        server.stop()
        raise
    server.secrets.append(server.key)
    return server


@pytest.fixture(scope="session")
def launch_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    """A factory: ``launch_server(name, backends_toml, env=None)`` starts a server;
    every server started is stopped (and checked) at the end of the session."""
    root = tmp_path_factory.mktemp("e2e")
    started: list[ServerProcess] = []

    def launch(name: str, backends: str, env: Mapping[str, str] | None = None) -> ServerProcess:
        server = _start(root, name, backends, env)
        started.append(server)
        return server

    yield launch

    problems = []
    for server in reversed(started):
        code = server.stop()
        if code != 0:
            problems.append(f"{server.name!r} exited {code} after SIGTERM")
        log = server.log_text()
        problems.extend(
            f"{server.name!r} logged a secret it handed out"
            for secret in server.secrets
            if secret in log
        )
    assert not problems, "; ".join(problems)


@pytest.fixture(scope="session")
def scripted_server(launch_server: Launcher) -> ServerProcess:
    """One real server with the scripted backend, for the whole session."""
    return launch_server("scripted", SCRIPTED_BACKEND)


# -- raw responses behind the SDK -------------------------------------------------------


class Recorded:
    """One HTTP exchange as it went over the wire (the body fills in as it is read)."""

    def __init__(self, request: httpx2.Request, response: httpx2.Response) -> None:
        self.method = request.method
        self.url = str(request.url)
        self.request_headers = httpx2.Headers(request.headers)
        try:
            self.request_body = request.content
        except httpx2.RequestNotRead:
            self.request_body = b""
        self.status = response.status_code
        self.headers = httpx2.Headers(response.headers)
        self.body = bytearray()
        self.complete = False

    def json(self) -> Any:
        return orjson.loads(bytes(self.body))

    def __repr__(self) -> str:
        return f"<Recorded {self.method} {self.url} -> {self.status}, {len(self.body)} bytes>"


class _TeeStream(httpx2.SyncByteStream):
    def __init__(self, inner: httpx2.SyncByteStream, record: Recorded) -> None:
        self._inner = inner
        self._record = record

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._inner:
            self._record.body += chunk
            yield chunk
        self._record.complete = True

    def close(self) -> None:
        self._inner.close()


class RecordingTransport(httpx2.BaseTransport):
    """An ``httpx2`` transport that keeps a copy of every response body it passes on."""

    def __init__(self) -> None:
        self._inner = httpx2.HTTPTransport()
        self.exchanges: list[Recorded] = []

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        response = self._inner.handle_request(request)
        record = Recorded(request, response)
        self.exchanges.append(record)
        assert isinstance(response.stream, httpx2.SyncByteStream)
        return httpx2.Response(
            status_code=response.status_code,
            headers=response.headers,
            stream=_TeeStream(response.stream, record),
            extensions=response.extensions,
        )

    def close(self) -> None:
        self._inner.close()


class Api:
    """A server seen through the ``openai`` SDK, with every raw response recorded.

    :attr:`client` is the strict SDK client (``_strict_response_validation=True``,
    no retries); :meth:`sdk` makes others (another key, or non-strict where the SDK
    itself cannot be strict, see the tests); :attr:`http` is a plain ``httpx2``
    client for what the SDK cannot send. :meth:`json` and :meth:`sse` check the
    last recorded response against the OpenAI spec and return its content.
    """

    def __init__(
        self, server: ServerProcess, openapi: spec.OpenAPI, *, timeout: float = HTTP_TIMEOUT
    ) -> None:
        self.server = server
        self.spec = openapi
        self.timeout = timeout
        self.transport = RecordingTransport()
        self.http = httpx2.Client(
            transport=self.transport, base_url=server.base_url, timeout=timeout
        )
        self.client = self.sdk(server.key)

    def sdk(self, api_key: str, *, strict: bool = True) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.server.base_url,
            api_key=api_key,
            max_retries=0,
            timeout=self.timeout,
            http_client=self.http,
            _strict_response_validation=strict,
        )

    def close(self) -> None:
        self.http.close()

    @property
    def last(self) -> Recorded:
        assert self.transport.exchanges, "no HTTP exchange recorded yet"
        return self.transport.exchanges[-1]

    def check_common(self, record: Recorded, *, complete: bool = True) -> None:
        """What every response carries, whatever its status."""
        request_id = record.headers.get("x-request-id")
        assert request_id, f"{record!r} has no x-request-id header"
        if complete:
            assert record.complete, f"{record!r} was not read to its end"

    def raw_json(self, *, status: int = 200) -> Any:
        """The last response as JSON, its status and headers checked (not its body)."""
        record = self.last
        assert record.status == status, f"{record!r}: {bytes(record.body)[:500]!r}"
        self.check_common(record)
        content_type = record.headers.get("content-type", "")
        assert content_type.startswith("application/json"), content_type
        return record.json()

    def json(self, schema: str, *, status: int = 200) -> Any:
        """The last response as JSON, checked against the spec's ``schema``."""
        body = self.raw_json(status=status)
        self.spec.assert_valid(schema, body)
        return body

    def error(self, status: int) -> dict[str, Any]:
        """The last response as an OpenAI error body (``ErrorResponse``) of ``status``."""
        body: dict[str, Any] = self.json("ErrorResponse", status=status)["error"]
        return body

    def sse(self, schema: str) -> list[Any]:
        """The last response's SSE chunks, framing checked, each checked against the
        spec's ``schema``. (The SDK stops reading at ``[DONE]``, so only a stream read
        to its end, ``record.complete``, shows that nothing follows it.)"""
        record = self.last
        assert record.status == 200, f"{record!r}: {bytes(record.body)[:500]!r}"
        self.check_common(record, complete=False)
        content_type = record.headers.get("content-type", "")
        assert content_type.startswith("text/event-stream"), content_type
        chunks = [orjson.loads(p) for p in self.spec.sse_payloads(bytes(record.body))]
        problems = [
            f"chunk {i}: {problem}"
            for i, chunk in enumerate(chunks)
            for problem in self.spec.errors(schema, chunk)
        ]
        assert not problems, (
            f"SSE chunks do not match the OpenAI spec's {schema}:\n  "
            + "\n  ".join(problems[:20])
            + f"\nfirst chunk: {orjson.dumps(chunks[0]).decode() if chunks else None}"
        )
        return chunks


@pytest.fixture
def private_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A scripted server of the test's own, for a test that may bring it down; the
    test checks what it expects of the process, teardown only stops it."""
    server = _start(tmp_path, "private", SCRIPTED_BACKEND, None)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def openapi() -> spec.OpenAPI:
    """The OpenAI spec, parsed once; an error (never a skip) when the file is absent."""
    return spec.OpenAPI()


@pytest.fixture(scope="session")
def scripted_api(scripted_server: ServerProcess, openapi: spec.OpenAPI) -> Iterator[Api]:
    api = Api(scripted_server, openapi)
    yield api
    api.close()
