"""The driver end to end in-process: HTTP bytes in, gateway, scripted backend, bytes out."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import h11
import orjson
import pytest
import trio
import trio.lowlevel
import trio.testing

from ostiary.backends.base import Generation
from ostiary.backends.scripted import ScriptedBackend, ScriptedSettings
from ostiary.protocol.errors import BackendUnavailableError
from ostiary.protocol.exchange import BackendPolicy
from ostiary.protocol.gateway import Gateway, ModelRoute
from ostiary.protocol.generation import Delta, EmbeddingResult, ToolCallDelta, Usage
from ostiary.protocol.requests import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from ostiary.runtime.access_log import AccessLog
from ostiary.runtime.driver import Driver
from ostiary.runtime.http import HttpServer, HttpSettings
from tests.conftest import auth_headers, chat_body, key_table
from tests.runtime.inprocess import in_memory
from tests.runtime.test_http import Client


class Faulty(ScriptedBackend):
    """Scripted output, then a failure chosen by the model name."""

    def __init__(self) -> None:
        super().__init__(
            ScriptedSettings(
                name="faulty",
                models=("fail-early", "fail-late", "bug", "bug-embed"),
                embedding_models=("bug-embed",),
            )
        )
        self.closed = 0
        self.ready_error: BaseException | None = None

    def chat(self, request: ChatCompletionRequest) -> Generation:
        return self._gen(request.model)

    async def _gen(self, model: str) -> Generation:
        try:
            if model == "fail-late":
                yield Delta("partial")
                await trio.lowlevel.checkpoint()
                raise BackendUnavailableError("upstream went away")
            if model == "bug":
                raise ZeroDivisionError("secret internal detail")
            raise BackendUnavailableError("cannot reach upstream", retry_after=2)
        finally:
            self.closed += 1

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        raise RuntimeError("secret internal detail")

    async def check_ready(self) -> None:
        if self.ready_error is not None:
            raise self.ready_error


class Blocking(ScriptedBackend):
    """Streams one piece, then waits forever (until cancelled)."""

    def __init__(self) -> None:
        super().__init__(ScriptedSettings(name="blocking", models=("block",)))
        self.started = trio.Event()
        self.cancelled = 0

    def complete(self, request: CompletionRequest) -> Generation:
        return self._gen()

    def chat(self, request: ChatCompletionRequest) -> Generation:
        return self._gen()

    async def _gen(self) -> Generation:
        yield Delta("first")
        self.started.set()
        try:
            await trio.sleep_forever()
        finally:
            self.cancelled += 1
        yield Usage(1)  # pragma: no cover


@asynccontextmanager
async def running(
    *,
    max_concurrency: int = 4,
    max_queue: int = 4,
    access_log: bool | AccessLog = True,
    ready_cache: float = 0.0,
    **policy: Any,
) -> AsyncIterator[tuple[Any, Driver, dict[str, Any]]]:
    scripted = ScriptedBackend(
        ScriptedSettings(models=("s", "s-embed"), embedding_models=("s-embed",), chunks=4)
    )
    slow = ScriptedBackend(
        ScriptedSettings(name="slow", models=("slow",), chunks=3, chunk_delay=1.0)
    )
    faulty, blocking = Faulty(), Blocking()
    backends: dict[str, Any] = {
        "scripted": scripted,
        "slow": slow,
        "faulty": faulty,
        "blocking": blocking,
    }
    routes = [
        ModelRoute(m, name, capabilities=b._settings.capabilities(m))
        for name, b in backends.items()
        for m in b.models
    ]
    policies = [
        BackendPolicy(name=name, max_concurrency=max_concurrency, max_queue=max_queue, **policy)
        for name in backends
    ]
    gateway = Gateway(routes=routes, keys=key_table(), backends=policies)
    driver = Driver(
        gateway, backends, access_log=access_log, ready_timeout=3, ready_cache=ready_cache
    )
    async with in_memory(driver) as connect:
        yield connect, driver, backends


async def post(
    client: Client, target: str, body: bytes, secret: bool = True
) -> tuple[int, dict[bytes, bytes], bytes]:
    headers = {"authorization": auth_headers()[0][1].decode()} if secret else {}
    await client.request(target=target, body=body, **headers)
    return await client.response()


async def send_stream(client: Client, model: str = "block") -> Client:
    """Send a streamed chat request (its answer is read later)."""
    await client.request(
        target="/v1/chat/completions",
        body=chat_body(model=model, stream=True),
        authorization=auth_headers()[0][1].decode(),
    )
    return client


def events(body: bytes) -> list[Any]:
    out = []
    for block in body.split(b"\n\n"):
        if block:
            payload = block.removeprefix(b"data: ")
            out.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
    return out


async def test_chat_non_stream_and_stream(autojump_clock: trio.testing.MockClock) -> None:
    async with running() as (connect, driver, _):
        client = await connect()
        status, headers, body = await post(client, "/v1/chat/completions", chat_body(model="s"))
        assert status == 200
        result = orjson.loads(body)
        assert result["choices"][0]["message"]["content"] == ScriptedSettings().reply
        assert headers[b"x-request-id"].decode() in result["id"]
        status, headers, body = await post(
            client, "/v1/chat/completions", chat_body(model="s", stream=True)
        )
        assert status == 200
        assert headers[b"transfer-encoding"] == b"chunked"
        chunks = events(body)
        assert chunks[-1] == "[DONE]"
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
        assert text == ScriptedSettings().reply
        assert driver.gateway.in_flight == 0


async def test_stream_paces_with_the_backend(autojump_clock: trio.testing.MockClock) -> None:
    async with running() as (connect, _, _):
        client = await connect()
        start = trio.current_time()
        _, _, body = await post(
            client,
            "/v1/completions",
            orjson.dumps(
                {
                    "model": "slow",
                    "prompt": "x",
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
            ),
        )
        assert trio.current_time() - start == pytest.approx(3.0)
        chunks = events(body)
        assert chunks[-2]["usage"]["completion_tokens"] == 3


async def test_embeddings(autojump_clock: trio.testing.MockClock) -> None:
    async with running() as (connect, _, _):
        client = await connect()
        status, _, body = await post(
            client, "/v1/embeddings", orjson.dumps({"model": "s-embed", "input": ["a", "b"]})
        )
        assert status == 200
        assert [len(d["embedding"]) for d in orjson.loads(body)["data"]] == [384, 384]


async def test_backend_error_before_stream(autojump_clock: trio.testing.MockClock) -> None:
    async with running() as (connect, _, backends):
        client = await connect()
        status, headers, body = await post(
            client, "/v1/chat/completions", chat_body(model="fail-early", stream=True)
        )
        assert status == 503
        assert headers[b"retry-after"] == b"2"
        assert orjson.loads(body)["error"]["message"] == "cannot reach upstream"
        assert backends["faulty"].closed == 1


async def test_backend_error_mid_stream(autojump_clock: trio.testing.MockClock) -> None:
    async with running() as (connect, driver, _):
        client = await connect()
        status, _, body = await post(
            client, "/v1/chat/completions", chat_body(model="fail-late", stream=True)
        )
        assert status == 200
        chunks = events(body)
        assert chunks[0]["choices"][0]["delta"]["content"] == "partial"
        assert chunks[-1]["error"]["message"] == "upstream went away"
        assert "[DONE]" not in chunks
        # The connection stays usable.
        status, _, _ = await post(client, "/v1/chat/completions", chat_body(model="s"))
        assert status == 200
        assert driver.gateway.in_flight == 0


async def test_bugs_are_500_without_details(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with running() as (connect, _, _):
        client = await connect()
        for target, body in [
            ("/v1/chat/completions", chat_body(model="bug")),
            ("/v1/chat/completions", chat_body(model="bug", stream=True)),
            ("/v1/embeddings", orjson.dumps({"model": "bug-embed", "input": "x"})),
        ]:
            status, _, data = await post(client, target, body)
            assert status == 500
            assert b"secret internal detail" not in data
            assert orjson.loads(data)["error"]["type"] == "server_error"
    assert "ZeroDivisionError" in caplog.text


async def test_client_leaving_mid_stream_cancels_backend(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running() as (connect, driver, backends):
        client = await send_stream(await connect())
        await backends["blocking"].started.wait()
        assert driver.gateway.in_flight == 1
        await client.stream.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert backends["blocking"].cancelled == 1
        assert driver.gateway.in_flight == 0


async def test_client_leaving_non_stream_cancels_backend(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running() as (connect, driver, backends):
        client = await connect()
        await client.request(
            target="/v1/completions",
            body=orjson.dumps({"model": "block", "prompt": "x"}),
            authorization=auth_headers()[0][1].decode(),
        )
        await backends["blocking"].started.wait()
        await client.stream.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert backends["blocking"].cancelled == 1
        assert driver.gateway.in_flight == 0


async def test_busy_backend_queues_then_refuses(autojump_clock: trio.testing.MockClock) -> None:
    async with running(max_concurrency=1, max_queue=1) as (connect, _, backends):
        await send_stream(await connect())
        await backends["blocking"].started.wait()
        waiter = await connect()
        await waiter.request(
            target="/v1/chat/completions",
            body=chat_body(model="block"),
            authorization=auth_headers()[0][1].decode(),
        )
        await trio.testing.wait_all_tasks_blocked()
        refused = await connect()
        status, headers, body = await post(
            refused, "/v1/chat/completions", chat_body(model="block")
        )
        assert status == 503
        # One running and one queued ahead, at the prior rate of one a second.
        assert headers[b"retry-after-ms"] == b"2000"
        assert orjson.loads(body)["error"]["code"] == "queue_full"


async def test_readiness(autojump_clock: trio.testing.MockClock) -> None:
    async with running() as (connect, _, backends):
        client = await connect()
        await client.request(method="GET", target="/readyz")
        assert (await client.response())[0] == 200
        for problem in (BackendUnavailableError("down"), ValueError("bug")):
            backends["faulty"].ready_error = problem
            await client.request(method="GET", target="/readyz")
            status, _, body = await client.response()
            assert status == 503
            assert orjson.loads(body)["backends"] == {"faulty": "unavailable"}


async def test_a_cached_503_asks_to_retry_when_the_cache_expires(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The runtime checks at most once per ``ready_cache``: asked sooner, the answer
    is the same, so the 503's retry-after is the time left until the next check."""
    async with running(ready_cache=5.0) as (connect, _, backends):
        backends["faulty"].ready_error = BackendUnavailableError("down")
        client = await connect()
        waits = []
        for pause in (0.0, 2.0, 2.5):
            await trio.sleep(pause)
            await client.request(method="GET", target="/readyz")
            status, headers, _ = await client.response()
            assert status == 503
            waits.append((headers[b"retry-after"], headers[b"retry-after-ms"]))
        assert waits == [(b"5", b"5000"), (b"3", b"3000"), (b"1", b"500")]


async def test_readiness_timeout(autojump_clock: trio.testing.MockClock) -> None:
    async with running() as (connect, _, backends):

        async def hang() -> None:
            await trio.sleep_forever()

        backends["faulty"].check_ready = hang
        client = await connect()
        await client.request(method="GET", target="/readyz")
        start = trio.current_time()
        assert (await client.response())[0] == 503
        assert trio.current_time() - start == pytest.approx(3)


async def test_access_log_records_without_secrets(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    async with running() as (connect, _, _):
        client = await connect()
        await post(client, "/v1/chat/completions", chat_body(model="s"))
        await post(client, "/v1/chat/completions", chat_body(model="s"), secret=False)
    records = [r for r in caplog.records if r.name == "ostiary.access"]
    assert [r.fields["status"] for r in records] == [200, 401]  # type: ignore[attr-defined]
    assert auth_headers()[0][1].decode().split()[1] not in caplog.text


async def test_access_log_can_be_off(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    async with running(access_log=False) as (connect, _, _):
        client = await connect()
        await post(client, "/v1/chat/completions", chat_body(model="s"))
    assert not [r for r in caplog.records if r.name == "ostiary.access"]


async def test_failed_final_write_is_logged_as_client_gone(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    from ostiary.runtime.http import ClientDisconnected, HttpRequest

    class GoneResponder:
        started = finished = False

        async def respond(self, *args: object) -> None:
            raise ClientDisconnected()

    caplog.set_level("INFO")
    async with running() as (_, driver, _):
        head = ((b"authorization", auth_headers()[0][1]),)
        admission = await driver.admits("POST", "/v1/chat/completions", head, "")
        request = HttpRequest(
            "POST", "/v1/chat/completions", head, chat_body(model="s"), "", admission
        )
        await driver.handle(request, GoneResponder())  # type: ignore[arg-type]
        assert driver.gateway.in_flight == 0
    records = [r for r in caplog.records if r.name == "ostiary.access"]
    assert [r.fields["status"] for r in records] == [499]  # type: ignore[attr-defined]


async def test_a_write_cut_by_the_send_timeout_still_leaves_one_record(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    async with running() as (_, driver, _):
        server = HttpServer(driver, HttpSettings(send_timeout=5.0))
        client_stream, server_stream = trio.testing.lockstep_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve_connection, server_stream)
            client = Client(client_stream)
            # A reply far larger than what a lockstep stream takes without a reader.
            await client.request(
                target="/v1/completions",
                body=orjson.dumps({"model": "s", "prompt": "x", "n": 8}),
                authorization=auth_headers()[0][1].decode(),
            )
            await trio.sleep(30)  # the client never reads
            nursery.cancel_scope.cancel()
        assert driver.gateway.in_flight == 0
    records = [r for r in caplog.records if r.name == "ostiary.access"]
    assert [r.fields["status"] for r in records] == [499]  # type: ignore[attr-defined]


async def test_queue_wait_times_out_through_the_core(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(max_concurrency=1, max_queue=2, max_queue_wait=7.0) as (
        connect,
        driver,
        backends,
    ):
        await send_stream(await connect())
        await backends["blocking"].started.wait()
        start = trio.current_time()
        status, headers, body = await post(
            await connect(), "/v1/chat/completions", chat_body(model="block")
        )
        assert trio.current_time() - start == pytest.approx(7.0)
        assert (status, orjson.loads(body)["error"]["code"]) == (503, "queue_timeout")
        assert int(headers[b"retry-after"]) > 1  # nothing was served for 7 s
        assert driver.gateway.scheduler("blocking").running == 1


async def test_a_stalled_backend_is_cut_off_and_its_slot_serves_the_next(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(max_concurrency=1, max_queue=2, stall_timeout=3.0) as (
        connect,
        driver,
        backends,
    ):
        stalled = await send_stream(await connect())
        await backends["blocking"].started.wait()
        # Queued behind the stalled stream, on the same backend.
        waiting = await send_stream(await connect())
        status, _, body = await stalled.response()
        assert status == 200
        error = events(body)[-1]
        assert error["error"]["code"] == "backend_stalled"
        assert backends["blocking"].cancelled == 1
        # The freed slot went to the waiting request, which stalls in turn.
        status, _, body = await waiting.response()
        assert events(body)[0]["choices"][0]["delta"]["content"] == "first"
        assert backends["blocking"].cancelled == 2
        assert driver.gateway.in_flight == 0


async def test_readiness_checks_are_cached(autojump_clock: trio.testing.MockClock) -> None:
    async with running(ready_cache=5.0) as (connect, _, backends):
        calls = 0

        async def counted() -> None:
            nonlocal calls
            calls += 1

        backends["faulty"].check_ready = counted
        client = await connect()
        for _ in range(3):
            await client.request(method="GET", target="/readyz")
            assert (await client.response())[0] == 200
        assert calls == 1
        await trio.sleep(5)
        await client.request(method="GET", target="/readyz")
        await client.response()
        assert calls == 2


async def test_public_routes_never_read_a_body(autojump_clock: trio.testing.MockClock) -> None:
    """Issue 7 item 7: a client with no credentials cannot make the server read and
    hold a body on /healthz or /readyz: the head is answered, the body never read."""
    async with running() as (connect, driver, _):
        for target in ("/healthz", "/readyz"):
            client = await connect()
            head = f"GET {target} HTTP/1.1\r\nhost: t\r\ncontent-length: 4000000\r\n\r\n".encode()
            await client.send_raw(head + b"x" * 1000)  # far less than announced
            start = trio.current_time()
            status, headers, _ = await client.response()
            assert status == 200
            assert headers[b"connection"] == b"close"
            assert trio.current_time() == start  # no waiting for a body
            assert await client.closed()
        assert driver.gateway.in_flight == 0


async def test_a_cors_preflight_is_answered_over_http(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running() as (connect, _, _):
        client = await connect()
        await client.request(
            method="OPTIONS",
            target="/v1/chat/completions",
            origin="https://app.example",
            **{"access-control-request-method": "POST"},
        )
        status, headers, body = await client.response()
        assert (status, body) == (204, b"")
        assert headers[b"allow"] == b"POST, OPTIONS"
        assert b"content-length" not in headers
        # The connection stays usable for the request the preflight was for.
        status, _, _ = await post(client, "/v1/chat/completions", chat_body(model="s"))
        assert status == 200


async def test_a_stream_nobody_reads_gives_its_slot_back_after_the_send_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The slow-reader policy (README, "Slots, the queue and timeouts"): a stream's
    slot is held while backpressure pauses it, until one write has waited
    ``send_timeout``; then the client counts as gone and the next request runs."""
    async with running(max_concurrency=1) as (connect, driver, _):
        server = HttpServer(driver, HttpSettings(send_timeout=5.0))
        client_stream, server_stream = trio.testing.lockstep_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve_connection, server_stream)
            client = Client(client_stream)
            await client.request(
                target="/v1/completions",
                body=orjson.dumps({"model": "s", "prompt": "x", "n": 8, "stream": True}),
                authorization=auth_headers()[0][1].decode(),
            )
            await trio.sleep(1)
            assert driver.gateway.scheduler("scripted").running == 1  # held while paused
            start = trio.current_time()
            status, _, _ = await post(await connect(), "/v1/chat/completions", chat_body(model="s"))
            assert status == 200
            assert 3.5 <= trio.current_time() - start <= 5.5  # queued until the cut
            nursery.cancel_scope.cancel()
        assert driver.gateway.in_flight == 0


class _RefusedOutput(ScriptedBackend):
    """Text, a whole tool call, then more arguments for it: output the gateway's
    tool-call normalizer refuses, so the gateway stops the call mid-output."""

    def __init__(self) -> None:
        super().__init__(ScriptedSettings(name="refused", models=("refused",)))

    def chat(self, request: ChatCompletionRequest) -> Generation:
        return self._gen()

    async def _gen(self) -> Generation:
        yield Delta("hello")
        await trio.sleep(1)
        yield Delta(tool_calls=(ToolCallDelta(0, id="c1", name="f", arguments="{}"),))
        await trio.sleep(1)
        yield Delta(tool_calls=(ToolCallDelta(0, arguments='{"x":1}'),))
        yield Usage(1, 1)  # pragma: no cover (the call is stopped before)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_output_the_gateway_refuses_is_answered_with_its_error(
    stream: bool, autojump_clock: trio.testing.MockClock
) -> None:
    """The gateway stops the call from inside the backend's own cancel scope (the
    chunk it is fed there is the one it refuses); its error answer must still be
    written, whole: it was dropped (a whole answer: no response at all) or cut
    short by that scope (a stream: no error event, a truncated body)."""
    refused = _RefusedOutput()
    routes = [
        ModelRoute("refused", "refused", capabilities=refused._settings.capabilities("refused"))
    ]
    gateway = Gateway(routes=routes, keys=key_table(), backends=[BackendPolicy(name="refused")])
    driver = Driver(gateway, {"refused": refused})
    async with in_memory(driver) as connect:
        client = await connect()
        await client.request(
            target="/v1/chat/completions",
            body=chat_body(model="refused", stream=stream),
            authorization=auth_headers()[0][1].decode(),
        )
        with trio.fail_after(60):
            status, _, body = await client.response()
    assert b"backend_error" in body
    if stream:
        assert status == 200 and body.startswith(b"data: ")
        assert orjson.loads(body.split(b"data: ")[-1])["error"]["code"] == "backend_error"
    else:
        assert status == 502
    assert driver.gateway.in_flight == 0


class _ServerEnd(trio.abc.Stream):
    """The server's side of a connection whose writes a test plays the client for
    (``send_all``, what it received in ``received``); reads come from ``server``."""

    def __init__(self, server: trio.abc.Stream) -> None:
        self._server = server
        self.received = b""

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self._server.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self._server.aclose()


class _SlowReader(_ServerEnd):
    """A client that takes what is written to it slowly: each write is handed over
    only after ``pause`` seconds, longer than the stall timeout (a reader whose
    socket buffer is full)."""

    def __init__(self, server: trio.abc.Stream, pause: float) -> None:
        super().__init__(server)
        self._pause = pause
        self.ended = trio.Event()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.sleep(self._pause)
        self.received += bytes(data)
        if self.received.endswith(b"0\r\n\r\n"):
            self.ended.set()


class _HalfThenSlow(_ServerEnd):
    """A client whose socket takes half of each write at once and the rest
    ``pause`` seconds later: a stop while a write is under way meets it halfway."""

    def __init__(self, server: trio.abc.Stream, pause: float) -> None:
        super().__init__(server)
        self._pause = pause
        self.ended = trio.Event()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        data = bytes(data)
        half = len(data) // 2
        self.received += data[:half]
        await trio.sleep(self._pause)
        self.received += data[half:]
        if self.received.endswith(b"0\r\n\r\n"):
            self.ended.set()


Reader = TypeVar("Reader", "_SlowReader", "_HalfThenSlow")


async def _stream_chat(
    driver: Driver, model: str, client_end: Callable[[trio.abc.Stream], Reader]
) -> Reader:
    """One streamed chat to ``model``, its writes handed to the client end that
    ``client_end`` makes of the server's stream, until the body's end was written
    (or 300 s of the mock clock); that end, with what it received."""
    server = HttpServer(driver, HttpSettings(send_timeout=60.0))
    client_stream, server_stream = trio.testing.memory_stream_pair()
    reader = client_end(server_stream)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_connection, reader)
        await Client(client_stream).request(
            target="/v1/chat/completions",
            body=chat_body(model=model, stream=True),
            authorization=auth_headers()[0][1].decode(),
        )
        with trio.move_on_after(300):
            await reader.ended.wait()
        nursery.cancel_scope.cancel()
    return reader


async def test_a_stop_during_a_write_never_cuts_the_write_short(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The total timeout (4 s) passes while a write waits for the client: the write
    ends whole, then the error event follows; the chunked body parses to the end
    (it was cut mid-chunk, the error written after the partial chunk)."""
    timeouts: dict[str, Any] = {
        "stall_timeout": 100.0, "first_output_timeout": 5.0, "total_timeout": 4.0,
    }  # fmt: skip
    async with running(**timeouts) as (_, driver, _):
        reader = await _stream_chat(driver, "slow", lambda server: _HalfThenSlow(server, 3.0))
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="POST", target="/", headers=[("host", "t")]))
    conn.receive_data(reader.received)
    body = b""
    while not isinstance(event := conn.next_event(), h11.EndOfMessage):
        assert event is not h11.NEED_DATA, reader.received
        if isinstance(event, h11.Data):
            body += event.data
    events = [orjson.loads(e[len(b"data: ") :]) for e in body.split(b"\n\n") if e]
    assert all("choices" in e for e in events[:-1])
    assert events[-1]["error"]["code"] == "backend_timeout"
    assert driver.gateway.in_flight == 0


async def test_a_slow_reader_is_not_taken_for_a_stalled_model(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """While a write waits for the client, the backend is paused behind it: the
    stall timeout (2 s) counts the model's silence, not the reader's (3 s a write,
    within the 60 s send_timeout). The stream ends with [DONE], not backend_stalled."""
    async with running(stall_timeout=2.0, first_output_timeout=5.0, total_timeout=600.0) as (
        _,
        driver,
        _,
    ):
        reader = await _stream_chat(driver, "s", lambda server: _SlowReader(server, 3.0))
    assert b"backend_stalled" not in reader.received, reader.received
    assert b"[DONE]" in reader.received, reader.received
    assert reader.received.count(b"data: {") >= 4  # every piece came through
    assert driver.gateway.in_flight == 0


class _LeavesAtDone(_ServerEnd):
    """The server's side of a connection to a client that, like the OpenAI SDK,
    closes as soon as it has read ``data: [DONE]``: bytes written after the write
    that carried it find the client gone. With ``split``, the write that carries it
    is handed over in two parts, the client leaving (end of input) between them;
    without, it leaves once the write is handed over, before ``send_all`` returns
    (a transport that yields after it has taken the bytes)."""

    def __init__(self, client: trio.abc.Stream, server: trio.abc.Stream, *, split: bool) -> None:
        super().__init__(server)
        self._client = client
        self._split = split
        self.gone = False

    async def _leave(self) -> None:
        self.gone = True
        await self._client.send_eof()  # type: ignore[attr-defined]
        await trio.testing.wait_all_tasks_blocked()  # the server has seen it

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.gone:
            raise trio.BrokenResourceError("the client has closed")
        data = bytes(data)
        done = data.find(b"data: [DONE]\n\n")
        if done < 0:
            self.received += data
            return
        end = done + len(b"data: [DONE]\n\n")
        self.received += data[:end]
        if not self._split:
            self.received += data[end:]
            await self._leave()
            return
        await self._leave()
        self.received += data[end:]  # the rest of this write: handed over all the same


@pytest.mark.parametrize("split", [False, True])
async def test_a_stream_read_to_done_by_a_client_that_leaves_at_once_is_a_success(
    split: bool, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """F7: ``[DONE]`` and the chunked terminator go out in one write, and a client that
    half-closes while that last write is being handed over is not abandoned: the
    exchange is a 200, not a 499 (the SDK closes at ``[DONE]``)."""
    caplog.set_level("INFO")
    async with running() as (_, driver, _):
        client_stream, server_stream = trio.testing.memory_stream_pair()
        stream = _LeavesAtDone(client_stream, server_stream, split=split)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(HttpServer(driver).serve_connection, stream)
            await Client(client_stream).request(
                target="/v1/chat/completions",
                body=chat_body(model="s", stream=True),
                authorization=auth_headers()[0][1].decode(),
            )
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert driver.gateway.in_flight == 0
    records = [r for r in caplog.records if r.name == "ostiary.access"]
    assert [r.fields["status"] for r in records] == [200]  # type: ignore[attr-defined]
    assert stream.received.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
