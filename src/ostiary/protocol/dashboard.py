"""The dashboard's files (``/dashboard``, ``/dashboard.js``, ``/dashboard.css``) and
the headers they are served with.

The page holds no data: it asks for the admin key and reads everything from the
live feed. The runtime reads the files once at start-up and hands them in as
:class:`Asset` values (the core reads no file). Every one is served with a strict
Content-Security-Policy: scripts and styles only from this origin and only from
files (no inline code, no ``eval``), connections only back to this origin, no
framing, no forms posted anywhere, no plugins.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from .actions import Respond
from .errors import NotFoundError
from .exchange import Exchange, ExchangeState

__all__ = ["CSP", "SECURITY_HEADERS", "Asset", "Assets"]

#: The policy of every dashboard file.
CSP = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    b"img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", CSP),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cache-control", b"no-cache"),
)


@attrs.frozen
class Asset:
    """One file of the dashboard: its ``content-type`` and its bytes."""

    content_type: bytes
    body: bytes = attrs.field(repr=False)


class Assets:
    """The dashboard's files by path; a path it does not hold is a 404."""

    __slots__ = ("_files",)

    def __init__(self, files: Mapping[str, Asset] | None = None) -> None:
        self._files = dict(files or {})

    def respond(self, exchange: Exchange) -> Respond:
        asset = self._files.get(exchange.path)
        if asset is None:
            raise NotFoundError(
                f"{exchange.path} is not installed with this server.", code="unknown_url"
            )
        exchange.state = ExchangeState.SENDING
        exchange.status = 200
        headers = (
            (b"content-type", asset.content_type),
            *SECURITY_HEADERS,
            (b"x-request-id", exchange.request_id.encode()),
        )
        return Respond(exchange.request_id, 200, headers, asset.body)
