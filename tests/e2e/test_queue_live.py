"""``/v1/queue/live`` over a real loopback socket against the real ``ostiary serve``:
refused before the upgrade without the key, a feed with it, and closed with 1001
when the server drains on SIGTERM (which then exits 0)."""

from __future__ import annotations

import signal
import socket
from typing import Any

import orjson
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    RejectConnection,
    Request,
    TextMessage,
)

from ostiary.protocol.live import SUBPROTOCOL
from tests.e2e.conftest import (
    HTTP_TIMEOUT,
    SCRIPTED_BACKEND,
    STOP_TIMEOUT,
    Launcher,
    ServerProcess,
)


class Feed:
    """A blocking WebSocket client: wsproto over a socket with a timeout on every read."""

    def __init__(self, server: ServerProcess) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=HTTP_TIMEOUT)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.pending: list[Event] = []
        self.host = f"127.0.0.1:{server.port}"

    def open(self, protocols: list[str]) -> Event:
        request = Request(host=self.host, target="/v1/queue/live", subprotocols=protocols)
        self.sock.sendall(self.ws.send(request))
        return self.next()

    def next(self) -> Event:
        while not self.pending:
            data = self.sock.recv(65536)
            self.ws.receive_data(data or None)
            self.pending.extend(self.ws.events())
        return self.pending.pop(0)

    def message(self) -> Any:
        event = self.next()
        assert isinstance(event, TextMessage), event
        return orjson.loads(event.data)

    def close(self) -> None:
        self.sock.close()


def test_refused_without_a_key_and_served_with_it(launch_server: Launcher) -> None:
    server = launch_server("live", SCRIPTED_BACKEND)
    refused = Feed(server)
    try:
        answer = refused.open([SUBPROTOCOL])
        assert isinstance(answer, RejectConnection) and answer.status_code == 401
    finally:
        refused.close()

    feed = Feed(server)
    try:
        answer = feed.open([SUBPROTOCOL, f"bearer.{server.key}"])
        assert isinstance(answer, AcceptConnection) and answer.subprotocol == SUBPROTOCOL
        first = feed.message()
        assert first["object"] == "queue"
        assert [b["name"] for b in first["backends"]] == ["scripted"]
        assert feed.message()["object"] == "queue"

        server.process.send_signal(signal.SIGTERM)
        while not isinstance(event := feed.next(), CloseConnection):
            assert isinstance(event, TextMessage)
        assert event.code == 1001
        feed.sock.sendall(feed.ws.send(event.response()))
        # One SIGTERM only: a second one during the drain would kill the process.
        assert server.process.wait(timeout=STOP_TIMEOUT) == 0
    finally:
        feed.close()
    records = server.log_records("request")
    live = [r for r in records if r.get("path") == "/v1/queue/live"]
    assert [r["status"] for r in live] == [401, 101]
    assert server.key not in server.log_text()
