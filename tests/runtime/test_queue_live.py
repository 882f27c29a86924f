"""``/v1/queue/live`` in-process on trio's MockClock: the key judged before the
upgrade, the subprotocol echoed without it, the pace of snapshots, a slow viewer's
bound, pings, closes and the drain."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
import trio
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection as FrameConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from ostiary.backends.scripted import ScriptedBackend, ScriptedSettings
from ostiary.protocol.exchange import BackendPolicy
from ostiary.protocol.gateway import Gateway, ModelRoute
from ostiary.protocol.live import SUBPROTOCOL, LiveSettings
from ostiary.runtime.config import ConfigError, parse_config
from ostiary.runtime.driver import Driver
from ostiary.runtime.http import HttpServer, HttpSettings
from tests.conftest import ADMIN_SECRET, USER_SECRET, auth_headers, chat_body, key_table
from tests.runtime.test_http import Client

PATH = "/v1/queue/live"


class Viewer:
    """A WebSocket client (wsproto's) over a trio stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.events: list[Event] = []

    async def open(self, protocols: list[str], **headers: str) -> Event:
        """The handshake's answer: ``AcceptConnection``, or ``RejectConnection``
        with its body in :attr:`rejected_body`."""
        extra = [(k.encode(), v.encode()) for k, v in headers.items()]
        request = Request(host="t", target=PATH, subprotocols=protocols, extra_headers=extra)
        await self.stream.send_all(self.ws.send(request))
        first = await self.next()
        self.rejected_body = b""
        if isinstance(first, RejectConnection) and first.has_body:
            while True:
                data = await self.next()
                assert isinstance(data, RejectData)
                self.rejected_body += data.data
                if data.body_finished:
                    break
        return first

    async def next(self) -> Event:
        while not self.events:
            data = await self.stream.receive_some(65536)
            self.ws.receive_data(bytes(data) if data else None)
            self.events.extend(self.ws.events())
        return self.events.pop(0)

    async def message(self) -> Any:
        event = await self.next()
        assert isinstance(event, TextMessage), event
        return orjson.loads(event.data)

    async def send(self, event: Event) -> None:
        await self.stream.send_all(self.ws.send(event))


class Served:
    def __init__(self, driver: Driver, server: HttpServer, nursery: trio.Nursery) -> None:
        self.driver = driver
        self.server = server
        self.nursery = nursery
        self.snapshots = 0
        self.logs: list[dict[str, Any]] = []
        inner = driver.gateway.queue_snapshot

        def counted(now: float) -> bytes:
            self.snapshots += 1
            return inner(now)

        driver.gateway.queue_snapshot = counted  # type: ignore[method-assign]
        record = driver._log

        def log(action: Any) -> None:
            if action.message == "request":
                self.logs.append(action.fields)
            record(action)

        driver._log = log  # type: ignore[method-assign]
        # The access log is off, so the gateway would not build the records read here.
        driver.gateway.access_records = True

    def connect(self, *, lockstep: bool = False) -> trio.abc.Stream:
        pair = trio.testing.lockstep_stream_pair if lockstep else trio.testing.memory_stream_pair
        client, server = pair()
        self.nursery.start_soon(self.server.serve_connection, server)
        return client

    @property
    def viewers(self) -> int:
        return len(self.driver.gateway._viewers)


@asynccontextmanager
async def serving(
    live: LiveSettings | None = None, settings: HttpSettings | None = None
) -> AsyncIterator[Served]:
    backend = ScriptedBackend(ScriptedSettings(models=("s",), chunks=4, chunk_delay=1.0))
    gateway = Gateway(
        routes=[ModelRoute("s", "scripted")],
        keys=key_table(),
        backends=[BackendPolicy(name="scripted", max_concurrency=1, max_queue=8)],
        live=live,
    )
    driver = Driver(gateway, {"scripted": backend}, access_log=False)
    server = HttpServer(driver, settings if settings is not None else HttpSettings())
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run_timers)
        yield Served(driver, server, nursery)
        nursery.cancel_scope.cancel()


async def test_no_key_is_401_before_any_upgrade(autojump_clock: trio.testing.MockClock) -> None:
    async with serving() as served:
        viewer = Viewer(served.connect())
        answer = await viewer.open([SUBPROTOCOL])
        assert isinstance(answer, RejectConnection) and answer.status_code == 401
        assert orjson.loads(viewer.rejected_body)["error"]["code"] == "missing_api_key"
        assert served.viewers == 0 and served.snapshots == 0


async def test_wrong_key_is_401_and_user_key_is_403(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving() as served:
        wrong = ADMIN_SECRET[:-4] + "zzzz"
        for secret, status, code in (
            (wrong, 401, "invalid_api_key"),
            (USER_SECRET, 403, "permission_denied"),
        ):
            viewer = Viewer(served.connect())
            answer = await viewer.open([SUBPROTOCOL, f"bearer.{secret}"])
            assert isinstance(answer, RejectConnection), answer
            assert answer.status_code == status
            error = orjson.loads(viewer.rejected_body)["error"]
            assert error["code"] == code
            assert secret not in viewer.rejected_body.decode()
            headers = dict(answer.headers)
            assert b"sec-websocket-accept" not in headers
            assert secret.encode() not in b"".join(v for _, v in answer.headers)
        assert served.viewers == 0 and served.snapshots == 0


async def test_admin_key_in_subprotocol_opens_feed_and_echoes_only_ours(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving() as served:
        viewer = Viewer(served.connect())
        answer = await viewer.open([SUBPROTOCOL, f"bearer.{ADMIN_SECRET}"])
        assert isinstance(answer, AcceptConnection), answer
        assert answer.subprotocol == SUBPROTOCOL
        assert ADMIN_SECRET.encode() not in b"".join(v for _, v in answer.extra_headers)
        snapshot = await viewer.message()
        assert snapshot["object"] == "queue"
        assert [b["name"] for b in snapshot["backends"]] == ["scripted"]
        assert served.viewers == 1


async def test_authorization_header_works_without_subprotocols(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving() as served:
        viewer = Viewer(served.connect())
        answer = await viewer.open([], authorization=f"Bearer {ADMIN_SECRET}")
        assert isinstance(answer, AcceptConnection) and answer.subprotocol is None
        assert (await viewer.message())["object"] == "queue"


async def test_plain_get_without_upgrade_is_an_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving() as served:
        client = Client(served.connect())
        await client.request("GET", PATH, b"", authorization=f"Bearer {ADMIN_SECRET}")
        status, _, body = await client.response()
        assert status == 400
        assert orjson.loads(body)["error"]["code"] == "websocket_required"
        # The connection is still a working HTTP/1.1 one.
        await client.request("GET", "/v1/queue", b"", authorization=f"Bearer {ADMIN_SECRET}")
        status, _, body = await client.response()
        assert status == 200 and orjson.loads(body)["object"] == "queue"


async def test_at_most_four_messages_a_second(autojump_clock: trio.testing.MockClock) -> None:
    seconds = 10.0
    async with serving() as served:
        viewer = Viewer(served.connect())
        await viewer.open([SUBPROTOCOL, f"bearer.{ADMIN_SECRET}"])
        start = trio.current_time()
        times: list[float] = []
        with trio.move_on_at(start + seconds):
            while True:
                await viewer.message()
                times.append(trio.current_time() - start)
        assert len(times) <= 4 * seconds + 1
        assert len(times) >= seconds  # it does push, not just once
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert min(gaps) >= 0.25


async def test_feed_follows_the_queue(autojump_clock: trio.testing.MockClock) -> None:
    """Requests that queue show in the next snapshots, and leave them when done."""
    async with serving() as served:
        viewer = Viewer(served.connect())
        await viewer.open([SUBPROTOCOL, f"bearer.{ADMIN_SECRET}"])
        first = (await viewer.message())["backends"][0]
        assert (first["queued"], first["running"]) == (0, 0)

        async def chat() -> None:
            client = Client(served.connect())
            await client.request(
                "POST",
                "/v1/chat/completions",
                chat_body(model="s"),
                **{
                    "authorization": auth_headers(USER_SECRET)[0][1].decode(),
                    "content-type": "application/json",
                },
            )
            status, _, _ = await client.response()
            assert status == 200

        seen: set[tuple[int, int]] = set()
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(chat)
            while (2, 1) not in seen:
                b = (await viewer.message())["backends"][0]
                seen.add((b["queued"], b["running"]))
        while True:
            b = (await viewer.message())["backends"][0]
            if (b["queued"], b["running"]) == (0, 0):
                break
        assert b["wait"]["samples"] == 3 and b["wait"]["p99"] > 0


async def test_slow_viewer_holds_one_snapshot_and_is_dropped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A viewer that stops reading: the server takes no snapshot while the last one
    is unwritten (none piles up), and drops the viewer after ``send_timeout``."""
    settings = HttpSettings(send_timeout=5.0)
    async with serving(settings=settings) as served:
        viewer = Viewer(served.connect(lockstep=True))
        await viewer.open([SUBPROTOCOL, f"bearer.{ADMIN_SECRET}"])
        await viewer.message()
        taken = served.snapshots
        await trio.sleep(4.0)  # not reading: one write blocks
        assert served.snapshots == taken + 1
        await trio.sleep(2.0)  # past send_timeout: dropped
        assert served.viewers == 0
        assert served.logs[-1]["status"] == 499
        assert served.snapshots == taken + 1


async def test_slow_reader_skips_snapshots(autojump_clock: trio.testing.MockClock) -> None:
    """A reader slower than the feed gets fewer, not queued, messages."""
    async with serving() as served:
        viewer = Viewer(served.connect(lockstep=True))
        await viewer.open([SUBPROTOCOL, f"bearer.{ADMIN_SECRET}"])
        received = 0
        with trio.move_on_after(10.0):
            while True:
                await viewer.message()
                received += 1
                await trio.sleep(1.0)
        assert 5 <= received <= 11
        assert served.snapshots <= received + 1


async def test_ping_pong_and_client_close(autojump_clock: trio.testing.MockClock) -> None:
    async with serving() as served:
        viewer = Viewer(served.connect())
        await viewer.open([SUBPROTOCOL, f"bearer.{ADMIN_SECRET}"])
        await viewer.send(Ping(b"hello"))
        while not isinstance(event := await viewer.next(), Pong):
            assert isinstance(event, TextMessage)
        assert event.payload == b"hello"
        await viewer.send(CloseConnection(code=1000))
        while not isinstance(event := await viewer.next(), CloseConnection):
            pass
        assert event.code == 1000
        await trio.testing.wait_all_tasks_blocked()
        assert served.viewers == 0
        assert served.logs[-1]["status"] == 101


async def test_oversized_client_message_closes_1009(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving(LiveSettings(max_message_bytes=200)) as served:
        viewer = Viewer(served.connect())
        await viewer.open([SUBPROTOCOL, f"bearer.{ADMIN_SECRET}"])
        await viewer.send(TextMessage("x" * 150, message_finished=False))
        await viewer.send(TextMessage("x" * 100))
        while not isinstance(event := await viewer.next(), CloseConnection):
            pass
        assert event.code == 1009
        await viewer.send(event.response())
        await trio.testing.wait_all_tasks_blocked()
        assert served.viewers == 0


async def test_client_vanishing_ends_the_feed(autojump_clock: trio.testing.MockClock) -> None:
    async with serving() as served:
        stream = served.connect()
        viewer = Viewer(stream)
        await viewer.open([SUBPROTOCOL, f"bearer.{ADMIN_SECRET}"])
        await viewer.message()
        await stream.aclose()
        await trio.sleep(1.0)
        assert served.viewers == 0
        assert served.logs[-1]["status"] == 499


async def test_viewer_limit(autojump_clock: trio.testing.MockClock) -> None:
    async with serving(LiveSettings(max_viewers=1)) as served:
        first = Viewer(served.connect())
        assert isinstance(
            await first.open([SUBPROTOCOL, f"bearer.{ADMIN_SECRET}"]), AcceptConnection
        )
        second = Viewer(served.connect())
        answer = await second.open([SUBPROTOCOL, f"bearer.{ADMIN_SECRET}"])
        assert isinstance(answer, RejectConnection) and answer.status_code == 503
        assert orjson.loads(second.rejected_body)["error"]["code"] == "too_many_viewers"
        assert dict(answer.headers).get(b"retry-after")
        await first.send(CloseConnection(code=1000))
        while not isinstance(await first.next(), CloseConnection):
            pass
        await trio.testing.wait_all_tasks_blocked()
        third = Viewer(served.connect())
        assert isinstance(
            await third.open([SUBPROTOCOL, f"bearer.{ADMIN_SECRET}"]), AcceptConnection
        )


async def test_drain_closes_feeds_going_away(autojump_clock: trio.testing.MockClock) -> None:
    async with serving() as served:
        viewer = Viewer(served.connect())
        await viewer.open([SUBPROTOCOL, f"bearer.{ADMIN_SECRET}"])
        await viewer.message()
        served.driver.shutdown()
        while not isinstance(event := await viewer.next(), CloseConnection):
            assert isinstance(event, TextMessage)
        assert event.code == 1001
        await viewer.send(event.response())
        with trio.fail_after(1.0):
            await served.server.drain(trio.current_time() + 5.0)
        assert served.viewers == 0
        assert served.logs[-1]["status"] == 101
        late = Viewer(served.connect())
        answer = await late.open([SUBPROTOCOL, f"bearer.{ADMIN_SECRET}"])
        assert isinstance(answer, RejectConnection) and answer.status_code == 503


async def test_a_frame_that_breaks_the_protocol_closes_1002(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving() as served:
        stream = served.connect()
        viewer = Viewer(stream)
        await viewer.open([SUBPROTOCOL, f"bearer.{ADMIN_SECRET}"])
        await stream.send_all(b"\x81\x05hello")  # unmasked: clients must mask
        while not isinstance(event := await viewer.next(), CloseConnection):
            pass
        assert event.code == 1002
        await trio.testing.wait_all_tasks_blocked()
        assert served.viewers == 0


async def test_bytes_sent_with_the_handshake_are_not_lost(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A ping written in the same packet as the handshake (h11 holds it past the
    request) is answered once the connection is handed over."""
    async with serving() as served:
        stream = served.connect()
        viewer = Viewer(stream)
        request = Request(
            host="t", target=PATH, subprotocols=[SUBPROTOCOL, f"bearer.{ADMIN_SECRET}"]
        )
        handshake = viewer.ws.send(request)
        # The ping's frame as the client will send it once open (a client frame
        # layer in the open state builds it: same masking rules).
        ping = FrameConnection(ConnectionType.CLIENT).send(Ping(b"early"))
        await stream.send_all(handshake + ping)
        assert isinstance(await viewer.next(), AcceptConnection)
        while not isinstance(event := await viewer.next(), Pong):
            assert isinstance(event, TextMessage)
        assert event.payload == b"early"


def test_live_feed_limits_are_server_keys() -> None:
    backends = '[[backends]]\nname = "s"\nkind = "scripted"\nmodels = ["s"]\n'
    default = parse_config(backends, "t").server.live()
    assert default == LiveSettings()
    text = (
        "[server]\nmax_queue_viewers = 2\nqueue_live_interval = 0.5\n"
        "queue_live_max_message = 1000\n" + backends
    )
    assert parse_config(text, "t").server.live() == LiveSettings(
        max_viewers=2, interval=0.5, max_message_bytes=1000
    )
    with pytest.raises(ConfigError, match="queue_live_interval"):
        parse_config("[server]\nqueue_live_interval = 0.1\n" + backends, "t")


async def test_a_revoked_key_closes_its_feed_1008(autojump_clock: trio.testing.MockClock) -> None:
    from ostiary.protocol.auth import KeyTable

    async with serving() as served:
        viewer = Viewer(served.connect())
        await viewer.open([SUBPROTOCOL, f"bearer.{ADMIN_SECRET}"])
        await viewer.message()
        others = [k for k in key_table().keys.values() if k.role != "admin"]
        served.driver.replace_keys(KeyTable.of(others))
        while not isinstance(event := await viewer.next(), CloseConnection):
            assert isinstance(event, TextMessage)
        assert event.code == 1008
        await viewer.send(event.response())
        await trio.testing.wait_all_tasks_blocked()
        assert served.viewers == 0
        assert served.logs[-1]["status"] == 101
