"""API keys: the secret format, hashing and the table the gateway authenticates with.

A secret is ``ost_`` + a 12-hex-digit key id + ``_`` + at least 43 url-safe characters
(32 random bytes, drawn by the runtime). Only its SHA-256 digest is stored. The id in
the clear lets us find the one candidate record; the digests are then compared in
constant time, so the time taken says nothing about how much of a secret was right.
A slow password hash is not needed: the secret carries 256 bits of entropy.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping

import attrs

from .errors import AuthenticationError

__all__ = ["ApiKey", "KeyTable", "digest_secret", "format_secret", "parse_key_id"]

PREFIX = "ost_"
ID_LENGTH = 12
_MIN_SECRET_LENGTH = len(PREFIX) + ID_LENGTH + 1 + 43
_HEX = frozenset("0123456789abcdef")


def format_secret(key_id: str, token: str) -> str:
    """Build a secret from its id and random url-safe token (runtime-drawn)."""
    if len(key_id) != ID_LENGTH or not set(key_id) <= _HEX:
        raise ValueError("key id must be 12 lower-case hex digits")
    if len(token) < 43:
        raise ValueError("token must carry at least 32 random bytes")
    return f"{PREFIX}{key_id}_{token}"


def parse_key_id(secret: str) -> str | None:
    """The key id inside a well-formed secret, or None."""
    if len(secret) < _MIN_SECRET_LENGTH or not secret.startswith(PREFIX):
        return None
    key_id = secret[len(PREFIX) : len(PREFIX) + ID_LENGTH]
    if secret[len(PREFIX) + ID_LENGTH] != "_" or not set(key_id) <= _HEX:
        return None
    return key_id


def digest_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()


@attrs.frozen
class ApiKey:
    """A key record as the gateway sees it (never the secret itself)."""

    id: str
    name: str
    role: str
    digest: bytes = attrs.field(repr=False)


@attrs.frozen
class KeyTable:
    """The active keys, by id. Immutable: the runtime swaps in a new table on change."""

    keys: Mapping[str, ApiKey] = attrs.field(factory=dict)

    @classmethod
    def of(cls, keys: Iterable[ApiKey]) -> KeyTable:
        return cls({k.id: k for k in keys})

    def authenticate(self, authorization: bytes | None) -> ApiKey:
        """The key an ``Authorization`` header value names, or AuthenticationError."""
        if authorization is None:
            raise AuthenticationError(
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                code="missing_api_key",
            )
        scheme, _, secret_bytes = authorization.strip().partition(b" ")
        if scheme.lower() != b"bearer" or not secret_bytes.strip():
            raise AuthenticationError(
                "The Authorization header must use Bearer auth "
                "(i.e. Authorization: Bearer YOUR_KEY).",
                code="invalid_api_key",
            )
        secret = secret_bytes.strip().decode("latin-1")
        key_id = parse_key_id(secret)
        record = self.keys.get(key_id) if key_id is not None else None
        # Compare even when no record matched, so that a miss costs the same work.
        expected = record.digest if record is not None else _NO_MATCH
        if not hmac.compare_digest(digest_secret(secret), expected) or record is None:
            raise AuthenticationError(
                f"Incorrect API key provided: {_redact(secret)}.", code="invalid_api_key"
            )
        return record


_NO_MATCH = b"\x00" * 32


def _redact(secret: str) -> str:
    """Enough of a presented secret to recognise it, never enough to use it."""
    if len(secret) <= 12:
        return "***"
    return f"{secret[:8]}***{secret[-4:]}"
