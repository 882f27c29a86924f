"""Test identity provider: signing keys made here, tokens minted with joserfc, and a
tiny trio HTTP server on 127.0.0.1 that serves a JWKS and counts its requests."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import queue
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import orjson
import trio
from joserfc import jwt
from joserfc.jwk import ECKey, Key, OKPKey, RSAKey
from joserfc.jws import JWSRegistry

ISSUER = "https://idp.test"
AUDIENCE = "ostiary"
NOW = 1_800_000_000.0


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def rsa_key(kid: str) -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": kid})


def ec_key(kid: str) -> ECKey:
    return ECKey.generate_key("P-256", parameters={"kid": kid})


def ed_key(kid: str) -> OKPKey:
    return OKPKey.generate_key("Ed25519", parameters={"kid": kid})


def jwks(*keys: Key, extra: tuple[object, ...] = ()) -> bytes:
    """The public JWKS document of ``keys`` (plus raw ``extra`` entries)."""
    return orjson.dumps({"keys": [k.as_dict(private=False) for k in keys] + list(extra)})


def claims(now: float = NOW, **overrides: Any) -> dict[str, Any]:
    """Good claims at ``now``; an override of None drops that claim."""
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice",
        "exp": int(now) + 600,
        "iat": int(now),
        "roles": ["tenant"],
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def mint(key: Key, alg: str, body: Mapping[str, Any] | None = None, **header: Any) -> str:
    """A token signed by ``key`` with ``alg``; its ``kid`` unless the header says."""
    head: dict[str, Any] = {"alg": alg}
    if key.kid is not None:
        head["kid"] = key.kid
    head.update(header)
    head = {k: v for k, v in head.items() if v is not None}
    return jwt.encode(head, dict(body if body is not None else claims()), key, algorithms=[alg])


def sign(
    key: Key | bytes,
    alg: str,
    body: Mapping[str, Any] | None = None,
    *,
    payload: bytes | None = None,
    **header: Any,
) -> str:
    """Like :func:`mint`, but signed by the algorithm's primitive itself, with none
    of joserfc's checks of the key: for tokens a careless issuer (or an attacker)
    would make. ``key`` as bytes is an HMAC secret (HS256/384/512), which may be a
    published public key (joserfc itself refuses to use one so)."""
    kid = None if isinstance(key, bytes) else key.kid
    head: dict[str, Any] = {"alg": alg, "kid": kid, **header}
    head = {k: v for k, v in head.items() if v is not None}
    if payload is None:
        payload = orjson.dumps(dict(body or claims()))
    signed = f"{b64(orjson.dumps(head))}.{b64(payload)}"
    if isinstance(key, bytes):
        digest = getattr(hashlib, f"sha{alg[2:]}")
        signature = hmac.new(key, signed.encode("ascii"), digest).digest()
    else:
        signature = JWSRegistry.algorithms[alg].sign(signed.encode("ascii"), key)
    return f"{signed}.{b64(signature)}"


def forge(header: Mapping[str, Any], body: Mapping[str, Any], signature: bytes = b"") -> str:
    """A token with the given parts, signed by nobody."""
    return ".".join((b64(orjson.dumps(header)), b64(orjson.dumps(body)), b64(signature)))


class JwksServer:
    """Serves ``document`` at any path on 127.0.0.1; ``requests`` counts what it got.

    ``status`` and ``hang`` (never answer) make it misbehave; ``arrived`` is set
    (and replaced) at each request, for tests that wait for one.
    """

    def __init__(self, document: bytes) -> None:
        self.document = document
        self.status = 200
        self.hang = False
        self.requests = 0
        self.arrived = trio.Event()
        self.url = ""

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/.well-known/jwks.json"
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started(self.url)

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                head += chunk
            self.requests += 1
            arrived, self.arrived = self.arrived, trio.Event()
            arrived.set()
            if self.hang:
                await trio.sleep_forever()
            body = self.document
            # A client may hang up before the end (an oversized document is refused
            # from its content-length alone): that is not this server's failure.
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(
                    b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                    % (self.status, len(body), body)
                )


@contextmanager
def threaded_jwks_server(document: bytes) -> Iterator[JwksServer]:
    """A :class:`JwksServer` on its own trio loop in a thread, for tests whose
    server under test is another process. Set ``document`` from the test thread:
    an attribute swap, read whole by the server's loop."""
    server = JwksServer(document)
    ready: queue.Queue[tuple[trio.lowlevel.TrioToken, trio.CancelScope]] = queue.Queue(1)

    async def main() -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve)
                ready.put((trio.lowlevel.current_trio_token(), scope))

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    token, scope = ready.get(timeout=10)
    try:
        yield server
    finally:
        trio.from_thread.run_sync(scope.cancel, trio_token=token)
        thread.join(timeout=10)
