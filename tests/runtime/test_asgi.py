"""The ASGI door in-process: a tiny ASGI server end (memory channels, no network)
drives :class:`OstiaryApp` through its lifespan and HTTP scopes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
import trio.testing

from ostiary.runtime.asgi import AsgiResponder, OstiaryApp, create_app
from ostiary.runtime.config import Config, parse_config
from ostiary.runtime.driver import Driver
from ostiary.runtime.responder import ClientDisconnected
from tests.conftest import chat_body
from tests.runtime.test_driver import events

Message = dict[str, Any]


def config(state_dir: Path, *, drain_timeout: float = 2.0) -> Config:
    return parse_config(
        "[server]\n"
        f'state_dir = "{state_dir}"\n'
        "access_log = false\n"
        f"drain_timeout = {drain_timeout}\n"
        "body_timeout = 5\n"
        "[auth]\n"
        "key_reload_interval = 3600\n"
        "[limits]\n"
        "max_body_bytes = 2048\n"
        "[[backends]]\n"
        'name = "scripted"\n'
        'kind = "scripted"\n'
        'models = ["scripted"]\n'
        "[[backends]]\n"
        'name = "slow"\n'
        'kind = "scripted"\n'
        'models = ["slow"]\n'
        "chunks = 8\n"
        "chunk_delay = 1.0\n",
        "test",
    )


class Call:
    """One ASGI call of the app: what it receives goes in, what it sends comes out."""

    def __init__(self) -> None:
        self.to_app, self._app_in = trio.open_memory_channel[Message](16)
        self._app_out, self.from_app = trio.open_memory_channel[Message](64)
        self.done = trio.Event()

    async def receive(self) -> Message:
        return await self._app_in.receive()

    async def send(self, message: Message) -> None:
        await self._app_out.send(message)

    async def run(self, app: OstiaryApp, scope: Message) -> None:
        try:
            await app(scope, self.receive, self.send)
        finally:
            self.done.set()


class Server:
    """The server end: the app's lifespan running, and a way to make HTTP calls."""

    def __init__(self, app: OstiaryApp, nursery: trio.Nursery, key: str) -> None:
        self.app = app
        self.nursery = nursery
        self.key = key

    def open(self, method: str, path: str, headers: list[tuple[bytes, bytes]]) -> Call:
        path, _, query = path.partition("?")
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query.encode(),
            "headers": headers,
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
        }
        call = Call()
        self.nursery.start_soon(call.run, self.app, scope)
        return call

    def auth(self) -> list[tuple[bytes, bytes]]:
        return [(b"authorization", f"Bearer {self.key}".encode())]

    async def post(self, path: str, body: bytes, *, auth: bool = True, length: bool = True) -> Call:
        headers = self.auth() if auth else []
        headers.append((b"content-type", b"application/json"))
        if length:
            headers.append((b"content-length", str(len(body)).encode()))
        call = self.open("POST", path, headers)
        await call.to_app.send({"type": "http.request", "body": body, "more_body": False})
        return call


async def response(call: Call) -> tuple[int, dict[bytes, bytes], bytes]:
    start = await call.from_app.receive()
    assert start["type"] == "http.response.start"
    body = b""
    while True:
        message = await call.from_app.receive()
        assert message["type"] == "http.response.body"
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    await call.done.wait()
    return start["status"], dict(start["headers"]), body


@asynccontextmanager
async def serving(tmp_path: Path, **settings: Any) -> AsyncIterator[Server]:
    app = create_app(config(tmp_path / "state", **settings))
    async with trio.open_nursery() as nursery:
        lifespan = Call()
        nursery.start_soon(lifespan.run, app, {"type": "lifespan", "asgi": {"version": "3.0"}})
        await lifespan.to_app.send({"type": "lifespan.startup"})
        assert (await lifespan.from_app.receive())["type"] == "lifespan.startup.complete"
        key = (tmp_path / "state" / "admin.key").read_text().strip()
        yield Server(app, nursery, key)
        await lifespan.to_app.send({"type": "lifespan.shutdown"})
        assert (await lifespan.from_app.receive())["type"] == "lifespan.shutdown.complete"
        await lifespan.done.wait()
    assert app.driver is None


async def drained(call: Call) -> AsyncIterator[Message]:
    """What the app sent and nobody read yet."""
    while True:
        try:
            yield call.from_app.receive_nowait()
        except trio.WouldBlock:
            return


async def test_chat_completion_whole_and_streamed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path) as server:
        status, headers, body = await response(
            await server.post("/v1/chat/completions", chat_body(model="scripted"))
        )
        assert status == 200, body
        assert headers[b"content-length"] == str(len(body)).encode()
        reply = orjson.loads(body)
        assert reply["object"] == "chat.completion"
        assert reply["choices"][0]["message"]["content"].startswith("Hello from Ostiary")

        call = await server.post("/v1/chat/completions", chat_body(model="scripted", stream=True))
        status, headers, body = await response(call)
        assert status == 200
        assert headers[b"content-type"].startswith(b"text/event-stream")
        assert b"content-length" not in headers
        chunks = events(body)
        assert chunks[-1] == "[DONE]"
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
        assert text == reply["choices"][0]["message"]["content"]
        assert server.app.driver is not None
        assert server.app.driver.gateway.in_flight == 0


async def test_a_stream_goes_out_piece_by_piece(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path) as server:
        call = await server.post("/v1/chat/completions", chat_body(model="slow", stream=True))
        assert (await call.from_app.receive())["type"] == "http.response.start"
        pieces = []
        while True:
            message = await call.from_app.receive()
            pieces.append(message)
            if not message.get("more_body", False):
                break
        # Eight pieces a second apart (then the usage-less end and [DONE]).
        assert sum(1 for m in pieces if m.get("more_body")) >= 8
        assert events(b"".join(m["body"] for m in pieces))[-1] == "[DONE]"


async def test_no_key_is_401(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with serving(tmp_path) as server:
        call = await server.post("/v1/chat/completions", chat_body(model="scripted"), auth=False)
        status, headers, body = await response(call)
        assert status == 401
        assert orjson.loads(body)["error"]["code"] == "missing_api_key"
        assert headers[b"www-authenticate"].startswith(b"Bearer")
        assert headers[b"content-length"] == str(len(body)).encode()


async def slow_stream(server: Server) -> tuple[Driver, Call]:
    """A slow stream begun (its head read), and the driver serving it."""
    driver = server.app.driver
    assert driver is not None
    call = await server.post("/v1/chat/completions", chat_body(model="slow", stream=True))
    assert (await call.from_app.receive())["type"] == "http.response.start"
    return driver, call


async def test_a_client_gone_mid_stream_frees_its_slot(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path) as server:
        driver, call = await slow_stream(server)
        first = await call.from_app.receive()
        assert first["more_body"] is True
        assert driver.gateway.in_flight == 1
        left = trio.current_time()
        await call.to_app.send({"type": "http.disconnect"})
        await call.done.wait()
        # At once, not when the backend would have finished (eight pieces a second apart).
        assert trio.current_time() == left
        assert driver.gateway.in_flight == 0
        assert driver.gateway.scheduler("slow").running == 0
        rest = [m async for m in drained(call)]
        assert all(m.get("more_body") for m in rest)  # the stream never ended


async def test_a_failing_send_is_the_client_gone(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path) as server:
        driver, call = await slow_stream(server)
        began = trio.current_time()
        call.from_app.close()  # the app's next send fails
        await call.done.wait()
        assert trio.current_time() - began < 2.0  # at the first piece, not the last
        assert driver.gateway.in_flight == 0


async def test_a_body_past_the_limit_is_413(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path) as server:
        big = chat_body(model="scripted", messages=[{"role": "user", "content": "x" * 3000}])
        # Said by content-length: refused before a byte of the body is read.
        call = server.open(
            "POST",
            "/v1/chat/completions",
            [*server.auth(), (b"content-length", str(len(big)).encode())],
        )
        status, _, body = await response(call)
        assert status == 413
        assert orjson.loads(body)["error"]["message"]
        # Without a length (chunked, HTTP/2): refused once it passes the limit.
        call = server.open("POST", "/v1/chat/completions", server.auth())
        await call.to_app.send({"type": "http.request", "body": big[:1500], "more_body": True})
        await call.to_app.send({"type": "http.request", "body": big[1500:], "more_body": True})
        status, _, _ = await response(call)
        assert status == 413
        # The same body under the limit, in pieces, is served.
        small = chat_body(model="scripted")
        call = server.open("POST", "/v1/chat/completions", server.auth())
        await call.to_app.send({"type": "http.request", "body": small[:10], "more_body": True})
        await call.to_app.send({"type": "http.request", "body": small[10:]})
        status, _, _ = await response(call)
        assert status == 200


async def test_a_body_too_slow_is_refused(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path) as server:
        call = server.open("POST", "/v1/chat/completions", server.auth())
        await call.to_app.send({"type": "http.request", "body": b"{", "more_body": True})
        status, _, _ = await response(call)
        assert status == 408
        assert trio.current_time() >= 5


async def test_a_client_gone_while_sending_its_body(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path) as server:
        call = server.open("POST", "/v1/chat/completions", server.auth())
        await call.to_app.send({"type": "http.disconnect"})
        await call.done.wait()
        with pytest.raises(trio.WouldBlock):
            call.from_app.receive_nowait()


async def test_a_route_without_a_body_reads_none_and_head_sends_no_body(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path) as server:
        status, _, body = await response(server.open("GET", "/v1/models", server.auth()))
        assert status == 200
        assert orjson.loads(body)["object"] == "list"
        # /healthz takes no body; one sent is never read.
        headers = [(b"content-length", b"5")]
        status, _, _ = await response(server.open("GET", "/healthz", headers))
        assert status == 200
        status, headers_, body = await response(server.open("HEAD", "/healthz", []))
        assert status == 200
        assert body == b""
        assert int(headers_[b"content-length"]) > 0


async def test_shutdown_cancels_what_outlasts_the_drain(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    app = create_app(config(tmp_path / "state", drain_timeout=2.0))
    async with trio.open_nursery() as nursery:
        lifespan = Call()
        nursery.start_soon(lifespan.run, app, {"type": "lifespan"})
        await lifespan.to_app.send({"type": "lifespan.startup"})
        assert (await lifespan.from_app.receive())["type"] == "lifespan.startup.complete"
        server = Server(app, nursery, (tmp_path / "state" / "admin.key").read_text().strip())
        driver = app.driver
        assert driver is not None
        call = await server.post("/v1/chat/completions", chat_body(model="slow", stream=True))
        assert (await call.from_app.receive())["type"] == "http.response.start"
        began = trio.current_time()
        await lifespan.to_app.send({"type": "lifespan.shutdown"})
        assert (await lifespan.from_app.receive())["type"] == "lifespan.shutdown.complete"
        assert trio.current_time() - began == 2.0  # the drain, not the whole stream
        # The request was cancelled and unwound before the shutdown completed.
        assert call.done.is_set()
        assert driver.gateway.in_flight == 0


async def test_without_a_lifespan_it_says_so_and_websockets_are_refused(
    tmp_path: Path,
) -> None:
    app = create_app(config(tmp_path / "state"))
    async with trio.open_nursery() as nursery:
        server = Server(app, nursery, "")
        status, _, body = await response(server.open("GET", "/healthz", []))
        assert status == 503
        assert b"lifespan" in body
        ws = Call()
        await ws.run(app, {"type": "websocket", "path": "/v1/queue/live", "headers": []})
        assert (await ws.from_app.receive())["type"] == "websocket.close"


async def test_a_startup_failure_is_reported(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    app = create_app(config(blocker / "state"))
    lifespan = Call()
    await lifespan.to_app.send({"type": "lifespan.startup"})
    await lifespan.run(app, {"type": "lifespan"})
    message = await lifespan.from_app.receive()
    assert message["type"] == "lifespan.startup.failed"
    assert message["message"]
    assert app.driver is None


async def test_a_send_that_outlasts_the_send_timeout_is_the_client_gone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def stuck(message: Message) -> None:
        await trio.sleep_forever()

    responder = AsgiResponder(stuck, 3.0)
    with pytest.raises(ClientDisconnected):
        await responder.start(200, ())
    assert trio.current_time() == 3.0


def test_create_app_reads_the_config_named_by_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ostiary.toml"
    path.write_text(
        "[server]\n"
        f'state_dir = "{tmp_path / "state"}"\n'
        'log_format = "text"\n'
        '[[backends]]\nname = "scripted"\nkind = "scripted"\n'
    )
    monkeypatch.setenv("OSTIARY_CONFIG", str(path))
    monkeypatch.setattr("ostiary.runtime.asgi.setup_logging", lambda *args: None)
    app = create_app()
    assert app.config.source == str(path)
    assert [b.name for b in app.config.backends] == ["scripted"]
    monkeypatch.delenv("OSTIARY_CONFIG")
    assert create_app().config.source == "(built-in default)"
