"""API keys: the secret format, hashing and the table the gateway authenticates with.

A secret is ``ost_`` + a 12-hex-digit key id + ``_`` + at least 43 url-safe characters
(32 random bytes, drawn by the runtime). Only its SHA-256 digest is stored. The id in
the clear lets us find the one candidate record; the digests are then compared in
constant time, so the time taken says nothing about how much of a secret was right.
A slow password hash is not needed: the secret carries 256 bits of entropy.

A key may expire (``expires_at``, Unix seconds) and may override its role's limits.
Expiry is judged against the wall-clock time the runtime passes in, and only once
the secret has matched, so an expired key never tells a guesser anything.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Iterable, Mapping

import attrs

from .access import LimitSet
from .errors import AuthenticationError

__all__ = [
    "ApiKey",
    "KeyTable",
    "digest_secret",
    "format_secret",
    "format_utc",
    "parse_key_id",
]

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


def _expiry(_: object, attribute: attrs.Attribute[float | None], value: float | None) -> None:
    if value is not None and (type(value) not in (int, float) or not 0 <= value <= _MAX_UNIX):
        raise ValueError(f"{attribute.name} must be Unix seconds up to year 9999, not {value!r}")


@attrs.frozen
class ApiKey:
    """A key record as the gateway sees it (never the secret itself).

    ``expires_at`` (Unix seconds; None: never) and the per-key limits (None: the
    role's) are keyword-only, so records built before they existed still build. The
    limits are validated by the :class:`LimitSet` they are gathered into.
    """

    id: str
    name: str
    role: str
    digest: bytes = attrs.field(repr=False)
    expires_at: float | None = attrs.field(default=None, kw_only=True, validator=_expiry)
    requests_per_minute: int | None = attrs.field(default=None, kw_only=True)
    tokens_per_minute: int | None = attrs.field(default=None, kw_only=True)
    requests_per_day: int | None = attrs.field(default=None, kw_only=True)
    tokens_per_day: int | None = attrs.field(default=None, kw_only=True)
    max_concurrent: int | None = attrs.field(default=None, kw_only=True)
    _overrides: LimitSet = attrs.field(init=False, eq=False, repr=False)

    @_overrides.default
    def _build_overrides(self) -> LimitSet:
        return LimitSet(
            requests_per_minute=self.requests_per_minute,
            tokens_per_minute=self.tokens_per_minute,
            requests_per_day=self.requests_per_day,
            tokens_per_day=self.tokens_per_day,
            max_concurrent=self.max_concurrent,
        )

    @property
    def overrides(self) -> LimitSet:
        """The key's own limits, to lay over its role's (built once per record)."""
        return self._overrides

    def expired(self, wall: float) -> bool:
        """Whether the key no longer works at Unix time ``wall``."""
        return self.expires_at is not None and wall >= self.expires_at


@attrs.frozen
class KeyTable:
    """The active keys, by id. Immutable: the runtime swaps in a new table on change."""

    keys: Mapping[str, ApiKey] = attrs.field(factory=dict)

    @classmethod
    def of(cls, keys: Iterable[ApiKey]) -> KeyTable:
        return cls({k.id: k for k in keys})

    @property
    def counts_tokens(self) -> bool:
        """Whether a key has a token limit of its own (so prompts must be counted)."""
        return any(
            k.tokens_per_minute is not None or k.tokens_per_day is not None
            for k in self.keys.values()
        )

    def authenticate(self, authorization: bytes | None, wall: float | None = None) -> ApiKey:
        """The key an ``Authorization`` header value names, or AuthenticationError.

        With ``wall`` (Unix seconds), a key past its ``expires_at`` is refused with
        ``expired_api_key``; that is judged only after the secret matched."""
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
        if wall is not None and record.expired(wall):
            assert record.expires_at is not None
            raise AuthenticationError(
                f"This API key expired at {format_utc(record.expires_at)}.",
                code="expired_api_key",
            )
        return record


_NO_MATCH = b"\x00" * 32


def _redact(secret: str) -> str:
    """Enough of a presented secret to recognise it, never enough to use it."""
    if len(secret) <= 12:
        return "***"
    return f"{secret[:8]}***{secret[-4:]}"


#: Unix seconds of 9999-12-31T23:59:59Z: the last instant a four-digit year names.
_MAX_UNIX = 253_402_300_799


def format_utc(unix: float) -> str:
    """``unix`` seconds as ``YYYY-MM-DDTHH:MM:SSZ`` (fractions dropped), by integer
    arithmetic alone: the core reads no clock and imports no ``datetime``.

    Days since 1970-01-01 become a civil date by shifting the epoch to 0000-03-01,
    so that the leap day ends each year, then splitting into 400-year eras of
    146 097 days, years of the era, and months of 153 days per five.
    """
    seconds = math.floor(unix)
    days, rest = divmod(seconds, 86_400)
    hour, rest = divmod(rest, 3_600)
    minute, second = divmod(rest, 60)
    shifted = days + 719_468  # days from 0000-03-01 to 1970-01-01
    era, day_of_era = divmod(shifted, 146_097)
    year_of_era = (
        day_of_era - day_of_era // 1_460 + day_of_era // 36_524 - day_of_era // 146_096
    ) // 365
    day_of_year = day_of_era - (365 * year_of_era + year_of_era // 4 - year_of_era // 100)
    month_from_march = (5 * day_of_year + 2) // 153
    day = day_of_year - (153 * month_from_march + 2) // 5 + 1
    month = month_from_march + 3 if month_from_march < 10 else month_from_march - 9
    year = era * 400 + year_of_era + (1 if month <= 2 else 0)
    return f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}Z"
