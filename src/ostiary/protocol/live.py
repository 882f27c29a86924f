"""The live queue feed, ``GET /v1/queue/live``, as the core judges it: the WebSocket
opening handshake read from the head (RFC 6455 §4.2.1), the admin key carried in a
subprotocol, and the bound on viewers.

A browser cannot set ``Authorization`` on a WebSocket, and a key in the URL ends up
in logs and history; what it can set is ``Sec-WebSocket-Protocol``. So a client
offers two protocols: :data:`SUBPROTOCOL` (``ostiary.queue.v1``) and
``bearer.<key>``; the key is judged like a bearer token before the upgrade, and the
server echoes only ``ostiary.queue.v1``, never the key. (A client that can set
headers may send ``Authorization: Bearer <key>`` and offer no protocol instead.)
No cookie is ever involved, so a page of another origin that opens the socket has
no credential to ride on.

:class:`Viewers` counts the open feeds against ``max_viewers`` and closes them all
when the server drains. The runtime pushes what
:meth:`Gateway.queue_snapshot <ostiary.protocol.gateway.Gateway.queue_snapshot>`
returns, at most once per ``interval``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable

import attrs

from .actions import AcceptWebSocket, CloseWebSocket
from .admission import Endpoint, authorization_header
from .auth import KeyTable
from .errors import AuthenticationError, InvalidRequestError, ServiceUnavailableError
from .exchange import Exchange, ExchangeState

__all__ = [
    "BEARER_PREFIX",
    "SUBPROTOCOL",
    "LiveSettings",
    "Viewers",
    "accept_token",
    "credentials",
    "handshake_headers",
    "live_credentials",
    "offered_protocols",
]

#: The one subprotocol the server speaks, and echoes.
SUBPROTOCOL = "ostiary.queue.v1"
#: An offered protocol ``bearer.<key>`` carries the key (never echoed).
BEARER_PREFIX = "bearer."
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

Header = tuple[bytes, bytes]


@attrs.frozen(kw_only=True)
class LiveSettings:
    """The live feed's limits; ``[server]`` keys ``max_queue_viewers``,
    ``queue_live_interval`` and ``queue_live_max_message``."""

    #: Feeds open at once; one more is refused (503 ``too_many_viewers``).
    max_viewers: int = attrs.field(default=16, validator=attrs.validators.ge(0))
    #: Seconds between two snapshots to one viewer: at least 0.25 (four a second).
    interval: float = attrs.field(default=0.25, validator=attrs.validators.ge(0.25))
    #: Bytes of one message a viewer may send (it has nothing to say); more closes
    #: the feed with 1009.
    max_message_bytes: int = attrs.field(default=4096, validator=attrs.validators.ge(125))


def offered_protocols(headers: Iterable[Header]) -> list[str]:
    """The subprotocols of every ``sec-websocket-protocol`` header, in order."""
    offered: list[str] = []
    for name, value in headers:
        if name == b"sec-websocket-protocol":
            for item in value.split(b","):
                token = item.strip()
                if token:
                    offered.append(token.decode("latin-1"))
    return offered


def live_credentials(headers: Iterable[Header]) -> bytes | None:
    """What stands for the ``Authorization`` value of a live-feed request: the key of
    a ``bearer.<key>`` subprotocol as a bearer token, else the ``Authorization``
    header itself. Two keys offered are refused (which one would a proxy read?)."""
    headers = tuple(headers)
    keys = [p[len(BEARER_PREFIX) :] for p in offered_protocols(headers) if _is_bearer(p)]
    if len(keys) > 1:
        raise AuthenticationError(
            "Offer exactly one bearer.<key> subprotocol.", code="invalid_api_key"
        )
    if keys:
        return b"Bearer " + keys[0].encode("latin-1")
    return authorization_header(headers)


def credentials(endpoint: Endpoint | None, headers: tuple[Header, ...]) -> bytes | None:
    """What a request's key is read from: for the live feed
    :func:`live_credentials`, for every other route the ``Authorization`` header."""
    if endpoint is Endpoint.QUEUE_LIVE:
        return live_credentials(headers)
    return authorization_header(headers)


def _is_bearer(protocol: str) -> bool:
    return protocol[: len(BEARER_PREFIX)].lower() == BEARER_PREFIX


def accept_token(key: bytes) -> bytes:
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1(key + _GUID, usedforsecurity=False).digest())


def _tokens(headers: Iterable[Header], name: bytes) -> set[bytes]:
    return {
        item.strip().lower()
        for key, value in headers
        if key == name
        for item in value.split(b",")
        if item.strip()
    }


def _one(headers: Iterable[Header], name: bytes) -> bytes | None:
    values = [value for key, value in headers if key == name]
    return values[0].strip() if len(values) == 1 else None


def handshake_headers(method: str, headers: tuple[Header, ...]) -> tuple[Header, ...]:
    """The ``101`` response's headers for a valid opening handshake; a head that is
    not one is a 400 ``websocket_required`` (naming what is missing)."""

    def refuse(why: str) -> InvalidRequestError:
        return InvalidRequestError(
            f"GET /v1/queue/live is a WebSocket: {why}", code="websocket_required"
        )

    if method != "GET":
        raise refuse("the handshake is a GET request.")
    if b"websocket" not in _tokens(headers, b"upgrade"):
        raise refuse("send Upgrade: websocket.")
    if b"upgrade" not in _tokens(headers, b"connection"):
        raise refuse("send Connection: Upgrade.")
    if _one(headers, b"sec-websocket-version") != b"13":
        raise refuse("send Sec-WebSocket-Version: 13.")
    key = _one(headers, b"sec-websocket-key")
    try:
        valid_key = key is not None and len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        valid_key = False
    if not valid_key or key is None:
        raise refuse("send a Sec-WebSocket-Key of 16 random bytes in base64.")
    if any(k in (b"content-length", b"transfer-encoding") for k, v in headers if v != b"0"):
        raise refuse("the handshake has no body.")
    offered = offered_protocols(headers)
    out: list[Header] = [
        (b"upgrade", b"websocket"),
        (b"connection", b"Upgrade"),
        (b"sec-websocket-accept", accept_token(key)),
    ]
    if offered:
        if SUBPROTOCOL not in offered:
            raise refuse(f"offer the {SUBPROTOCOL} subprotocol.")
        out.append((b"sec-websocket-protocol", SUBPROTOCOL.encode()))
    return tuple(out)


class Viewers:
    """The live feeds open now (request id → key id), at most ``settings.max_viewers``."""

    __slots__ = ("_closing", "_open", "settings")

    def __init__(self, settings: LiveSettings) -> None:
        self.settings = settings
        self._open: dict[str, tuple[str, str]] = {}
        #: Feeds told to close (each is told once).
        self._closing: set[str] = set()

    def __len__(self) -> int:
        return len(self._open)

    def accept(
        self, exchange: Exchange, headers: tuple[Header, ...], shutting_down: bool
    ) -> AcceptWebSocket:
        """Take ``exchange`` as a viewer (its state becomes ``LIVE``), or raise: a
        bad handshake, a server that drains, all viewer places taken."""
        accept = handshake_headers(exchange.method, headers)
        if shutting_down:
            raise ServiceUnavailableError(
                "The server is shutting down; retry on another instance.", code="shutting_down"
            )
        settings = self.settings
        if len(self._open) >= settings.max_viewers:
            raise ServiceUnavailableError(
                f"{settings.max_viewers} live queue viewers are open already; retry later.",
                code="too_many_viewers",
                retry_after=5.0,
            )
        assert exchange.principal is not None
        principal = exchange.principal
        self._open[exchange.request_id] = (principal.id, principal.role.name)
        exchange.state = ExchangeState.LIVE
        exchange.status = 101
        return AcceptWebSocket(
            exchange.request_id, accept, settings.interval, settings.max_message_bytes
        )

    def leave(self, request_id: str) -> None:
        self._open.pop(request_id, None)
        self._closing.discard(request_id)

    def _close(self, request_id: str, code: int) -> list[CloseWebSocket]:
        if request_id in self._closing:
            return []
        self._closing.add(request_id)
        return [CloseWebSocket(request_id, code)]

    def close_all(self) -> list[CloseWebSocket]:
        """The server drains: every feed is to close (1001, going away)."""
        return [c for request_id in sorted(self._open) for c in self._close(request_id, 1001)]

    def revoked(self, keys: KeyTable) -> list[CloseWebSocket]:
        """The key table changed: feeds whose key is gone or no longer admin are to
        close (1008, policy violation); a key's rights hold only while it has them."""
        closing = []
        for request_id, (principal, role) in sorted(self._open.items()):
            if not principal.startswith("key:"):
                continue  # a JWT's rights end with the token, not with the key table
            key = keys.keys.get(principal[4:])
            if key is None or key.role != role:
                closing.extend(self._close(request_id, 1008))
        return closing
