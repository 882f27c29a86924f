"""Cross-origin access for browser applications, from ``[server] cors_origins``.

With no origins configured (the default) no CORS header is ever sent, so browsers
keep other sites' pages from calling the server. Listed origins are echoed back
(with ``vary: origin``); ``"*"`` admits any origin. Credentials mode is never
enabled (no ``access-control-allow-credentials``): clients authenticate with an
``Authorization`` header, which needs no cookies, and a wildcard origin is therefore
never combined with credentials. Preflights (``OPTIONS`` with
``access-control-request-method``) are answered by the gateway, before any key is
asked for, as browsers send them without one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import attrs

__all__ = ["CorsPolicy"]

Header = tuple[bytes, bytes]
#: Headers a browser application may read from our responses.
_EXPOSED = (
    b"x-request-id, retry-after, retry-after-ms, x-ratelimit-limit-requests, "
    b"x-ratelimit-remaining-requests, x-ratelimit-reset-requests, "
    b"x-ratelimit-limit-tokens, x-ratelimit-remaining-tokens, x-ratelimit-reset-tokens, "
    b"x-should-retry"
)
#: A list of header names, as a preflight may ask for them.
_TOKENS = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+(?:[ \t]*,[ \t]*[!#$%&'*+\-.^_`|~0-9A-Za-z]+)*")


@attrs.frozen
class CorsPolicy:
    origins: frozenset[str] = frozenset()
    #: Seconds a browser may cache a preflight's answer.
    max_age: int = 600

    @property
    def enabled(self) -> bool:
        return bool(self.origins)

    def _allowed(self, origin: bytes | None) -> bytes | None:
        """The ``access-control-allow-origin`` value for ``origin``, or None."""
        if origin is None or not self.origins:
            return None
        if "*" in self.origins:
            return b"*"
        return origin if origin.decode("latin-1") in self.origins else None

    def response_headers(self, headers: Iterable[Header]) -> tuple[Header, ...]:
        """What an actual response to a request with these headers carries."""
        allowed = self._allowed(_origin(headers))
        if allowed is None:
            return ()
        out = [
            (b"access-control-allow-origin", allowed),
            (b"access-control-expose-headers", _EXPOSED),
        ]
        if allowed != b"*":
            out.append((b"vary", b"origin"))
        return tuple(out)

    def preflight_headers(self, headers: Iterable[Header], methods: bytes) -> tuple[Header, ...]:
        """What the answer to a preflight carries (nothing for an origin not let in)."""
        headers = tuple(headers)
        allowed = self._allowed(_origin(headers))
        if allowed is None:
            return ()
        out = [
            (b"access-control-allow-origin", allowed),
            (b"access-control-allow-methods", methods),
            (b"access-control-max-age", str(self.max_age).encode()),
        ]
        asked = next((v for k, v in headers if k == b"access-control-request-headers"), None)
        if asked is not None and _TOKENS.fullmatch(asked.strip()):
            out.append((b"access-control-allow-headers", asked.strip()))
        out.append((b"vary", b"origin, access-control-request-headers"))
        return tuple(out)


def _origin(headers: Iterable[Header]) -> bytes | None:
    for name, value in headers:
        if name == b"origin":
            return value
    return None
