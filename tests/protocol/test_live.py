"""The core's side of ``/v1/queue/live`` and ``/dashboard``: the handshake judged from
the head, the key read from a subprotocol (and never echoed), the viewer bound, the
drain, and the dashboard's files with their headers."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest

from ostiary.protocol.actions import AcceptWebSocket, CloseWebSocket, Log, Respond
from ostiary.protocol.admission import Endpoint
from ostiary.protocol.dashboard import CSP, Asset, Assets
from ostiary.protocol.events import ClientGone, RequestReceived, ResponseSent, ShutdownStarted
from ostiary.protocol.exchange import BackendPolicy, ExchangeState
from ostiary.protocol.gateway import Gateway, GatewayUsageError, ModelRoute
from ostiary.protocol.live import (
    SUBPROTOCOL,
    LiveSettings,
    accept_token,
    handshake_headers,
    live_credentials,
    offered_protocols,
)
from tests.conftest import ADMIN_SECRET, USER_SECRET, key_table

Headers = tuple[tuple[bytes, bytes], ...]
#: RFC 6455 §1.3's own example.
RFC_KEY, RFC_ACCEPT = b"dGhlIHNhbXBsZSBub25jZQ==", b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
PATH = "/v1/queue/live"


def handshake(*protocols: str, **extra: str) -> Headers:
    headers: list[tuple[bytes, bytes]] = [
        (b"host", b"t"),
        (b"upgrade", b"websocket"),
        (b"connection", b"keep-alive, Upgrade"),
        (b"sec-websocket-version", b"13"),
        (b"sec-websocket-key", RFC_KEY),
    ]
    if protocols:
        headers.append((b"sec-websocket-protocol", ", ".join(protocols).encode()))
    headers.extend((k.replace("_", "-").encode(), v.encode()) for k, v in extra.items())
    return tuple(headers)


def keyed(secret: str = ADMIN_SECRET) -> Headers:
    return handshake(SUBPROTOCOL, f"bearer.{secret}")


def gateway(**kwargs: Any) -> Gateway:
    return Gateway(
        routes=[ModelRoute("m", "b1")],
        keys=key_table(),
        backends=[BackendPolicy(name="b1")],
        **kwargs,
    )


def open_feed(gw: Gateway, rid: str, headers: Headers, method: str = "GET") -> list[Any]:
    admission = gw.admits(method, PATH, headers, "")
    event = RequestReceived(rid, admission, method, PATH, headers, b"", 1.0, 1.0)
    return gw.handle(event)


def error_of(actions: list[Any]) -> tuple[int, str]:
    respond = next(a for a in actions if isinstance(a, Respond))
    return respond.status, orjson.loads(respond.body)["error"]["code"]


# -- the handshake ---------------------------------------------------------------


def test_accept_token_is_rfc_6455s() -> None:
    assert accept_token(RFC_KEY) == RFC_ACCEPT


def test_handshake_echoes_only_our_subprotocol() -> None:
    headers = dict(handshake_headers("GET", keyed()))
    assert headers[b"sec-websocket-accept"] == RFC_ACCEPT
    assert headers[b"sec-websocket-protocol"] == SUBPROTOCOL.encode()
    assert headers[b"upgrade"] == b"websocket"
    assert ADMIN_SECRET.encode() not in b"".join(headers.values())


def test_handshake_without_protocols_echoes_none() -> None:
    assert b"sec-websocket-protocol" not in dict(handshake_headers("GET", handshake()))


def _without(name: bytes) -> Headers:
    return tuple(h for h in keyed() if h[0] != name)


@pytest.mark.parametrize(
    ("method", "headers", "why"),
    [
        ("HEAD", keyed(), "GET"),
        ("GET", _without(b"upgrade"), "Upgrade"),
        ("GET", _without(b"connection"), "Connection"),
        ("GET", _without(b"sec-websocket-version"), "Version"),
        ("GET", (*_without(b"sec-websocket-version"), (b"sec-websocket-version", b"8")), "13"),
        ("GET", _without(b"sec-websocket-key"), "Key"),
        ("GET", (*_without(b"sec-websocket-key"), (b"sec-websocket-key", b"!!")), "Key"),
        (
            "GET",
            (
                *_without(b"sec-websocket-key"),
                (b"sec-websocket-key", base64.b64encode(b"short")),
            ),
            "Key",
        ),
        ("GET", (*keyed(), (b"sec-websocket-key", RFC_KEY)), "Key"),
        ("GET", (*keyed(), (b"content-length", b"5")), "body"),
        ("GET", (*keyed(), (b"transfer-encoding", b"chunked")), "body"),
        ("GET", handshake("chat", f"bearer.{ADMIN_SECRET}"), SUBPROTOCOL),
    ],
)
def test_a_bad_handshake_is_400(method: str, headers: Headers, why: str) -> None:
    from ostiary.protocol.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError) as caught:
        handshake_headers(method, headers)
    assert caught.value.code == "websocket_required" and why in caught.value.message


def test_content_length_zero_is_no_body() -> None:
    assert handshake_headers("GET", (*keyed(), (b"content-length", b"0")))


# -- credentials -----------------------------------------------------------------


def test_credentials_come_from_the_bearer_subprotocol() -> None:
    assert live_credentials(keyed()) == f"Bearer {ADMIN_SECRET}".encode()
    upper = handshake(SUBPROTOCOL, f"Bearer.{ADMIN_SECRET}")
    assert live_credentials(upper) == f"Bearer {ADMIN_SECRET}".encode()


def test_credentials_fall_back_to_authorization() -> None:
    headers = (*handshake(SUBPROTOCOL), (b"authorization", b"Bearer x"))
    assert live_credentials(headers) == b"Bearer x"
    assert live_credentials(handshake(SUBPROTOCOL)) is None


def test_two_bearer_protocols_are_refused() -> None:
    from ostiary.protocol.errors import AuthenticationError

    with pytest.raises(AuthenticationError):
        live_credentials(handshake(SUBPROTOCOL, "bearer.a", "bearer.b"))


def test_offered_protocols_across_headers() -> None:
    headers = ((b"sec-websocket-protocol", b"a, ,b"), (b"sec-websocket-protocol", b"c"))
    assert offered_protocols(headers) == ["a", "b", "c"]


# -- the gateway -----------------------------------------------------------------


def test_admin_key_opens_a_feed() -> None:
    gw = gateway()
    (accept,) = open_feed(gw, "v1", keyed())
    assert isinstance(accept, AcceptWebSocket)
    assert accept.interval == 0.25 and accept.max_message_bytes == 4096
    assert dict(accept.headers)[b"sec-websocket-protocol"] == SUBPROTOCOL.encode()
    assert gw.state_of("v1") is ExchangeState.LIVE
    assert orjson.loads(gw.queue_snapshot(2.0))["object"] == "queue"


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        (handshake(SUBPROTOCOL), 401, "missing_api_key"),
        (keyed(ADMIN_SECRET[:-3] + "xyz"), 401, "invalid_api_key"),
        (handshake(SUBPROTOCOL, "bearer.a", "bearer.b"), 401, "invalid_api_key"),
        (keyed(USER_SECRET), 403, "permission_denied"),
        (tuple(h for h in keyed() if h[0] != b"upgrade"), 400, "websocket_required"),
    ],
)
def test_refused_before_the_upgrade(headers: Headers, status: int, code: str) -> None:
    gw = gateway()
    actions = open_feed(gw, "v1", headers)
    assert not any(isinstance(a, AcceptWebSocket) for a in actions)
    assert error_of(actions) == (status, code)
    assert gw.state_of("v1") is ExchangeState.SENDING


def test_viewer_bound_and_places_freed() -> None:
    gw = gateway(live=LiveSettings(max_viewers=2, interval=0.5, max_message_bytes=200))
    assert isinstance(open_feed(gw, "v1", keyed())[0], AcceptWebSocket)
    assert open_feed(gw, "v2", keyed())[0].interval == 0.5
    actions = open_feed(gw, "v3", keyed())
    assert error_of(actions) == (503, "too_many_viewers")
    respond = next(a for a in actions if isinstance(a, Respond))
    assert dict(respond.headers)[b"retry-after"]
    # One leaves cleanly, one vanishes: both places are free again.
    left = gw.handle(ResponseSent("v1", 3.0))
    gone = gw.handle(ClientGone("v2", 3.0))
    statuses = [a.fields["status"] for a in left + gone if isinstance(a, Log)]
    assert statuses == [101, 499]
    assert gw.state_of("v1") is None and gw.state_of("v2") is None
    assert isinstance(open_feed(gw, "v4", keyed())[0], AcceptWebSocket)
    assert isinstance(open_feed(gw, "v5", keyed())[0], AcceptWebSocket)


def test_drain_closes_every_feed_and_takes_no_more() -> None:
    gw = gateway()
    open_feed(gw, "v1", keyed())
    open_feed(gw, "v2", keyed())
    actions = gw.handle(ShutdownStarted(5.0))
    closing = [a for a in actions if isinstance(a, CloseWebSocket)]
    assert closing == [CloseWebSocket("v1", 1001), CloseWebSocket("v2", 1001)]
    assert error_of(open_feed(gw, "v3", keyed())) == (503, "shutting_down")
    gw.handle(ResponseSent("v1", 6.0))
    gw.handle(ResponseSent("v2", 6.0))
    assert gw.in_flight == 1  # v3's answer is still being written


def test_a_feed_takes_no_backend_events() -> None:
    from ostiary.protocol.events import BackendFinished

    gw = gateway()
    open_feed(gw, "v1", keyed())
    with pytest.raises(GatewayUsageError):
        gw.handle(BackendFinished("v1", 2.0))


def test_a_key_table_replaced_after_the_head_is_judged_again() -> None:
    from ostiary.protocol.events import KeysReplaced

    gw = gateway()
    headers = keyed()
    admission = gw.admits("GET", PATH, headers, "")
    gw.handle(KeysReplaced(key_table(), 1.0))
    event = RequestReceived("v1", admission, "GET", PATH, headers, b"", 1.0, 1.0)
    assert isinstance(gw.handle(event)[0], AcceptWebSocket)


# -- the dashboard's files -------------------------------------------------------


def test_dashboard_files_are_public_with_a_strict_csp() -> None:
    assets = Assets(
        {
            "/dashboard": Asset(b"text/html; charset=utf-8", b"<!doctype html>"),
            "/dashboard.js": Asset(b"text/javascript", b"void 0;"),
        }
    )
    gw = gateway(assets=assets)
    for rid, path, body in (
        ("d1", "/dashboard", b"<!doctype html>"),
        ("d2", "/dashboard.js", b"void 0;"),
    ):
        admission = gw.admits("GET", path, (), "")
        assert admission.endpoint is Endpoint.DASHBOARD and admission.error is None
        (respond,) = gw.handle(RequestReceived(rid, admission, "GET", path, (), b"", 1.0, 1.0))
        assert isinstance(respond, Respond) and respond.status == 200 and respond.body == body
        headers = dict(respond.headers)
        assert headers[b"content-security-policy"] == CSP
        assert b"unsafe-inline" not in CSP and b"'self'" in CSP
        assert headers[b"x-content-type-options"] == b"nosniff"
        assert headers[b"x-request-id"] == rid.encode()


def test_a_dashboard_file_not_installed_is_404() -> None:
    gw = gateway()
    admission = gw.admits("GET", "/dashboard.css", (), "")
    actions = gw.handle(RequestReceived("d", admission, "GET", "/dashboard.css", (), b"", 1.0, 1.0))
    assert error_of(actions) == (404, "unknown_url")


def test_a_revoked_key_closes_its_feeds_only() -> None:
    from ostiary.protocol.auth import ApiKey, KeyTable, digest_secret
    from ostiary.protocol.auth import format_secret as secret_of
    from ostiary.protocol.events import KeysReplaced

    other = secret_of("c" * 12, "C" * 43)
    keys = KeyTable.of(
        [*key_table().keys.values(), ApiKey("c" * 12, "ops", "admin", digest_secret(other))]
    )
    gw = Gateway(routes=[ModelRoute("m", "b1")], keys=keys)
    open_feed(gw, "v1", keyed())
    open_feed(gw, "v2", keyed(other))
    demoted = KeyTable.of(
        [
            k if k.id != "a" * 12 else ApiKey(k.id, k.name, "user", k.digest)
            for k in keys.keys.values()
        ]
    )
    actions = gw.handle(KeysReplaced(demoted, 2.0))
    assert [a for a in actions if isinstance(a, CloseWebSocket)] == [CloseWebSocket("v1", 1008)]
    # v1 is told once; v2's key goes now.
    removed = KeyTable.of([k for k in demoted.keys.values() if k.id != "c" * 12])
    actions = gw.handle(KeysReplaced(removed, 3.0))
    assert [a for a in actions if isinstance(a, CloseWebSocket)] == [CloseWebSocket("v2", 1008)]
    # Draining tells only those not told yet; a feed that left is forgotten.
    gw.handle(ResponseSent("v1", 4.0))
    gw.handle(KeysReplaced(keys, 4.0))
    assert isinstance(open_feed(gw, "v3", keyed())[0], AcceptWebSocket)
    closing = [a for a in gw.handle(ShutdownStarted(5.0)) if isinstance(a, CloseWebSocket)]
    assert closing == [CloseWebSocket("v3", 1001)]
