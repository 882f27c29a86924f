"""Bearer credentials other than Ostiary's own keys: the JWT verifier's contract.

Verifying a JWT needs ``joserfc``, which imports ``socket`` and ``random``, and its
keys come from a JWKS document the runtime fetches; so the core holds only this
contract, and the runtime hands the gateway an object that keeps it
(:class:`TokenVerifier`). The decision stays the core's: it tells an Ostiary key
from a JWT by its shape (:func:`looks_like_jwt`), passes ``wall`` in, and maps the
claims' roles to a configured role.
"""

from __future__ import annotations

import re
from typing import Protocol

import attrs

from .errors import AuthenticationError

__all__ = ["TokenClaims", "TokenVerifier", "UnknownSigningKey", "looks_like_jwt"]

#: Three base64url segments; a JOSE header is a JSON object, so it starts "eyJ".
_JWT_SHAPE = re.compile(r"eyJ[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*\.[A-Za-z0-9_\-]*")
#: Longer than any identity provider's token; refused unparsed.
MAX_TOKEN_LENGTH = 16_384


def looks_like_jwt(secret: str) -> bool:
    """Whether a bearer credential has a compact JWS's shape."""
    return len(secret) <= MAX_TOKEN_LENGTH and _JWT_SHAPE.fullmatch(secret) is not None


@attrs.frozen
class TokenClaims:
    """What a verified token says: whom it is for and the roles it claims, in claim
    order (the gateway takes the first configured one)."""

    subject: str
    roles: tuple[str, ...] = ()


class UnknownSigningKey(AuthenticationError):
    """The token names a ``kid`` the verifier's key set does not hold. The runtime
    may refresh the key set (rate-limited) and judge the head again."""

    def __init__(self, kid: str) -> None:
        super().__init__(
            "The token's signing key is not known (unknown kid).", code="invalid_token"
        )
        self.kid = kid


class TokenVerifier(Protocol):
    """Checks a compact JWT's signature, algorithm and registered claims (``iss``,
    ``aud``, ``exp`` required, ``nbf``, with the configured leeway) at Unix time
    ``wall``, and returns its claims; any failure is an :class:`AuthenticationError`
    (code ``invalid_token``) whose message says what was wrong, never echoing the
    token. Must not block: it only reads keys it already holds."""

    def verify(self, token: str, wall: float) -> TokenClaims: ...
