"""The second door: an ASGI 3 application over the same driver as the h11 server.

It lets an ASGI server carry the HTTP (HTTP/2, TLS, whatever it speaks) while
Ostiary's gateway does the rest, exactly as behind ``ostiary serve``: the same
:func:`~.server.open_driver` builds the gateway, backends and background tasks, the
same :class:`~.driver.Driver` judges each head (``admits``) before the body is read
and answers the request (``handle``). Run it under Hypercorn's trio worker::

    OSTIARY_CONFIG=ostiary.toml hypercorn --worker-class trio \\
        'ostiary.runtime.asgi:create_app()'

Trio only: the app uses trio's primitives (nurseries, cancel scopes, its clock), so
an asyncio ASGI server cannot run it.

- ``lifespan``: startup opens the driver in a nursery that lives as long as the
  lifespan task (Hypercorn's trio worker keeps it for the server's life); shutdown
  tells the gateway it drains, waits up to ``drain_timeout`` for requests in
  flight, cancels what is left, and closes everything.
- ``http``: the head is judged first; a body the admission does not take is never
  read, a body past its ``max_body_bytes`` gets 413 (from ``content-length`` alone
  when it says so) and one slower than ``body_timeout`` 408, as the h11 server
  does. While the request is handled a task watches ``receive()``: a client that
  disconnects (``http.disconnect``) cancels the handler, so its backend call stops
  and its slot is freed; so does a send that fails or outlasts ``send_timeout``.
  Whole responses carry ``content-length``; streams (SSE) go out as
  ``more_body=True`` pieces.
- ``websocket``: not served by this door (the live queue feed,
  ``/v1/queue/live``, needs ``ostiary serve``): the handshake is refused (the
  server answers 403).

The connection-level defences of :mod:`.http` (head size and timeouts, connection
limits, keep-alive, request smuggling) are the ASGI server's to enforce here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ostiary.protocol.events import Refusal

from .access_log import AccessLog
from .config import Config, default_config, load_config
from .driver import Driver
from .http import HttpRequest, HttpSettings
from .logs import setup_logging
from .responder import ClientDisconnected, Tunnel
from .server import open_driver

__all__ = ["CONFIG_ENV", "AsgiResponder", "OstiaryApp", "create_app"]

log = logging.getLogger("ostiary.asgi")

Header = tuple[bytes, bytes]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: The environment variable :func:`create_app` reads the config file's path from.
CONFIG_ENV = "OSTIARY_CONFIG"
#: Seconds the handlers a drain cancelled may take to unwind.
_UNWIND_TIMEOUT = 1.0


class AsgiResponder:
    """Writes one response as ASGI ``http.response.*`` messages (the
    :class:`~.responder.ResponseWriter` of this door). Raises
    :class:`ClientDisconnected` if a send fails or outlasts ``send_timeout``."""

    __slots__ = ("_head", "_send", "_send_timeout", "finished", "finishing", "started")

    def __init__(self, send: Send, send_timeout: float, *, head: bool = False) -> None:
        self._send = send
        self._send_timeout = send_timeout
        self._head = head
        self.started = False
        #: The last send has begun: a disconnect from now on is not the client
        #: leaving early (it has, or is getting, all of the response).
        self.finishing = False
        self.finished = False

    async def _write(self, message: Message, *, last: bool = False) -> None:
        if last:
            self.finishing = True
        with trio.move_on_after(self._send_timeout) as scope:
            try:
                await self._send(message)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ClientDisconnected() from exc
        if scope.cancelled_caught:
            raise ClientDisconnected()

    async def _start(self, status: int, headers: list[Header]) -> None:
        self.started = True
        await self._write({"type": "http.response.start", "status": status, "headers": headers})

    async def respond(self, status: int, headers: tuple[Header, ...], body: bytes) -> None:
        hdrs = list(headers)
        if status not in (204, 304):
            hdrs.append((b"content-length", b"%d" % len(body)))
        await self._start(status, hdrs)
        self.finished = True
        data = b"" if self._head else body
        await self._write({"type": "http.response.body", "body": data}, last=True)

    async def start(self, status: int, headers: tuple[Header, ...]) -> None:
        await self._start(status, list(headers))

    async def send(self, data: bytes) -> None:
        if data and not self._head:
            await self._write({"type": "http.response.body", "body": data, "more_body": True})

    async def end(self, data: bytes = b"") -> None:
        self.finished = True
        body = b"" if self._head else data
        await self._write({"type": "http.response.body", "body": body}, last=True)

    async def switch_protocol(self, headers: tuple[Header, ...]) -> Tunnel:
        raise ClientDisconnected()  # an HTTP scope cannot switch (WebSockets: see above)


def _content_length(headers: tuple[Header, ...]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _target(scope: Message) -> str:
    raw = scope.get("raw_path")
    path = bytes(raw) if raw else str(scope["path"]).encode("utf-8")
    query = bytes(scope.get("query_string", b""))
    return (path + b"?" + query if query else path).decode("ascii", "replace")


async def _plain(send: Send, status: int, text: bytes) -> None:
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(text))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": text})


class _TooLarge(Exception):
    pass


class OstiaryApp:
    """The ASGI application (see the module docstring); ``access_log`` as for
    :func:`~.server.run_server`."""

    def __init__(self, config: Config, *, access_log: AccessLog | None = None) -> None:
        self.config = config
        self.settings: HttpSettings = config.server.http()
        self._access_log = access_log
        #: The running driver, between lifespan startup and shutdown.
        self.driver: Driver | None = None
        #: The cancel scopes of the requests being handled (cancelled when a drain
        #: runs out of time).
        self._handling: set[trio.CancelScope] = set()
        self._idle: trio.Event | None = None

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})

    # -- lifespan ------------------------------------------------------------------------

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "lifespan.startup":
            return
        started = False
        try:
            async with open_driver(self.config, access_log=self._access_log) as driver:
                self.driver = driver
                started = True
                await send({"type": "lifespan.startup.complete"})
                while (await receive())["type"] != "lifespan.shutdown":
                    pass
                await self._drain(driver)
                self.driver = None
        except Exception as exc:
            if started:
                raise
            log.exception("cannot start")
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            return
        log.info("stopped")
        await send({"type": "lifespan.shutdown.complete"})

    async def _drain(self, driver: Driver) -> None:
        """Queued requests are refused, running ones get ``drain_timeout`` seconds to
        finish; then what is left is cancelled."""
        timeout = self.config.server.drain_timeout
        log.info(
            "draining",
            extra={"fields": {"in_flight": driver.gateway.in_flight, "timeout_s": timeout}},
        )
        driver.shutdown()
        with trio.move_on_after(timeout):
            await self._until_idle()
        for scope in list(self._handling):
            scope.cancel()
        # The cancelled handlers unwind (telling the gateway) before the backends close.
        with trio.move_on_after(_UNWIND_TIMEOUT):
            await self._until_idle()

    async def _until_idle(self) -> None:
        while self._handling:
            self._idle = trio.Event()
            await self._idle.wait()

    # -- http ----------------------------------------------------------------------------

    async def _http(self, scope: Message, receive: Receive, send: Send) -> None:
        driver = self.driver
        if driver is None:
            await _plain(send, 503, b"Ostiary is not running (no ASGI lifespan startup)\n")
            return
        method = str(scope["method"])
        target = _target(scope)
        headers = tuple((bytes(n).lower(), bytes(v)) for n, v in scope.get("headers", ()))
        client = scope.get("client")
        peer = str(client[0]) if client else ""
        responder = AsgiResponder(send, self.settings.send_timeout, head=method == "HEAD")
        with trio.CancelScope() as handling:
            self._handling.add(handling)
            try:
                await self._serve(
                    driver,
                    receive,
                    responder,
                    method=method,
                    target=target,
                    headers=headers,
                    peer=peer,
                )
            finally:
                self._handling.discard(handling)
                if not self._handling and self._idle is not None:
                    self._idle.set()

    async def _serve(
        self,
        driver: Driver,
        receive: Receive,
        responder: AsgiResponder,
        *,
        method: str,
        target: str,
        headers: tuple[Header, ...],
        peer: str,
    ) -> None:
        admission = await driver.admits(method, target, headers, peer)
        length = _content_length(headers)
        chunked = any(name == b"transfer-encoding" for name, _ in headers)
        limit = admission.max_body_bytes
        body = b""
        skipped = False
        if not admission.read_body:
            skipped = bool(length) or chunked
        elif length is not None and length > limit:
            await driver.refuse(Refusal.BODY_TOO_LARGE, responder, method, target, limit)
            return
        else:
            read: bytes | None = None
            with trio.move_on_after(self.settings.body_timeout) as reading:
                try:
                    read = await _read_body(receive, limit)
                except _TooLarge:
                    await driver.refuse(Refusal.BODY_TOO_LARGE, responder, method, target, limit)
                    return
            if reading.cancelled_caught:
                await driver.refuse(Refusal.BODY_TIMEOUT, responder, method, target, 0)
                return
            if read is None:
                return  # the client left before its request was whole
            body = read
        request = HttpRequest(method, target, headers, body, peer, admission, body_skipped=skipped)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch, receive, responder, nursery.cancel_scope)
            try:
                await driver.handle(request, responder)
            finally:
                nursery.cancel_scope.cancel()


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The request body (None: the client disconnected first); :class:`_TooLarge`
    as soon as it passes ``limit`` bytes."""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        data = bytes(message.get("body", b""))
        size += len(data)
        if size > limit:
            raise _TooLarge()
        parts.append(data)
        if not message.get("more_body", False):
            return b"".join(parts)


async def _watch(receive: Receive, responder: AsgiResponder, scope: trio.CancelScope) -> None:
    """Cancel ``scope`` (the handler's) when the client disconnects before its last
    bytes are on their way."""
    while (await receive())["type"] != "http.disconnect":
        pass
    if not responder.finishing:
        scope.cancel()


def create_app(config: Config | None = None, *, access_log: AccessLog | None = None) -> OstiaryApp:
    """The app for ``config``; without one, the config file named by
    ``$OSTIARY_CONFIG`` (the built-in default if unset), with logging set up as
    ``ostiary serve`` sets it up. For Hypercorn: ``'ostiary.runtime.asgi:create_app()'``."""
    if config is None:
        path = os.environ.get(CONFIG_ENV)
        config = load_config(path) if path else default_config()
        setup_logging(config.server.log_level, config.server.log_format)
    return OstiaryApp(config, access_log=access_log)
