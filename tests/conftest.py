"""Shared test helpers: a key table with known secrets, and request builders."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from ostiary.protocol.auth import ApiKey, KeyTable, digest_secret, format_secret

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
