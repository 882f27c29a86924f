"""Shared test helpers: a key table with known secrets, request builders and a
loopback port that refuses connections."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, settings

from ostiary.protocol.auth import ApiKey, KeyTable, digest_secret, format_secret

# Hypothesis judges examples, not their speed: on a loaded CI machine its per-example
# deadline and its too-slow health check fail tests that are right.
settings.register_profile("ostiary", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ostiary")

ADMIN_SECRET = format_secret("a" * 12, "A" * 43)
USER_SECRET = format_secret("b" * 12, "B" * 43)


def key_table() -> KeyTable:
    return KeyTable.of(
        [
            ApiKey("a" * 12, "admin", "admin", digest_secret(ADMIN_SECRET)),
            ApiKey("b" * 12, "user", "user", digest_secret(USER_SECRET)),
        ]
    )


def auth_headers(secret: str = ADMIN_SECRET) -> tuple[tuple[bytes, bytes], ...]:
    return ((b"authorization", b"Bearer " + secret.encode()),)


def chat_body(**fields: Any) -> bytes:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi there"}]}
    body.update(fields)
    return orjson.dumps(body)


@pytest.fixture
def keys() -> KeyTable:
    return key_table()


@pytest.fixture(scope="session")
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections for the whole session: a socket is
    bound to it and never listens, so connecting gets a reset and no other process
    can start listening there meanwhile (unlike a port bound and released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        yield port
