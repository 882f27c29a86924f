"""What the runtime tells the core: events (slotted, built once per event and never
changed: not frozen, since a frozen attrs class costs twice as much to build).

Every event carries ``now``, monotonic seconds from the runtime's one clock; events
that start an exchange carry ``wall`` too (Unix seconds, for ``created`` and, later,
token and key expiry). The core never reads a clock of its own. Events about one
request name it by ``request_id``, the id the runtime drew for it (Ostiary's own:
a client's ``x-request-id`` is never used as a key).
"""

from __future__ import annotations

from typing import Any

import attrs

from .access import AccessPolicy
from .admission import Admission, Refusal
from .auth import KeyTable
from .buckets import Limit
from .credentials import TokenVerifier
from .errors import OpenAIError
from .generation import Delta, EmbeddingResult, Usage
from .limits import Decision
from .tokens import TokenCodec

__all__ = [
    "AccessReplaced",
    "BackendChunk",
    "BackendFailed",
    "BackendFinished",
    "ClientGone",
    "EmbeddingsComputed",
    "Event",
    "FailedAuthShared",
    "KeysReplaced",
    "LimitsDecided",
    "MetricsRendered",
    "OutputTaken",
    "ReadinessChecked",
    "Refusal",
    "RequestReceived",
    "RequestRefused",
    "ResponseSent",
    "ShutdownStarted",
    "Tick",
]

Header = tuple[bytes, bytes]


@attrs.define
class RequestReceived:
    """A complete HTTP request. Header names are lower-case bytes (as h11 gives
    them); ``admission`` is what :meth:`Gateway.admits` said of its head."""

    request_id: str
    admission: Admission
    method: str
    target: str
    headers: tuple[Header, ...]
    body: bytes
    now: float
    wall: float


@attrs.define
class RequestRefused:
    """The HTTP layer refused a request before it was whole. ``method`` and
    ``target`` are empty when not even the request line could be read."""

    request_id: str
    refusal: Refusal
    now: float
    wall: float
    method: str = ""
    target: str = ""
    #: The byte limit that was exceeded (head or body), for the message.
    limit: int = 0


@attrs.define
class BackendChunk:
    """Output the backend produced since the last event (one or more pieces)."""

    request_id: str
    pieces: tuple[Delta | Usage, ...]
    now: float


@attrs.define
class BackendFinished:
    """The generation ended normally (its Usage came in a BackendChunk)."""

    request_id: str
    now: float


@attrs.define
class EmbeddingsComputed:
    request_id: str
    result: EmbeddingResult
    now: float


@attrs.define
class BackendFailed:
    request_id: str
    error: OpenAIError = attrs.field(eq=False)
    now: float = 0.0


@attrs.define
class ClientGone:
    """The client left, or a write to it failed or timed out, before the exchange's
    last byte was sent."""

    request_id: str
    now: float


@attrs.define
class OutputTaken:
    """A stream's output was waiting for the client at ``now``: a write that had to
    wait ended then, or is still waiting when a deadline comes. The backend is
    paused behind it (output reaches a client through a bounded buffer), so its
    stall clock starts again from here: a slow reader is ``send_timeout``'s
    business, not a stalled model."""

    request_id: str
    now: float


@attrs.define
class ResponseSent:
    """The last byte of the response (``Respond`` or ``EndStream``) was written."""

    request_id: str
    now: float


@attrs.define
class ReadinessChecked:
    """Result of the runtime's checks for ``/readyz``: ``failures`` are (backend,
    problem) pairs, backends only (a backend may be named "redis");
    ``redis_unreachable``: the shared limit store did not answer; ``jwks_missing``:
    no JWKS key set is loaded yet. ``retry_after``: seconds until the runtime checks
    again (it caches its answer), the 503's ``retry-after``; None: the default."""

    request_id: str
    failures: tuple[tuple[str, str], ...]
    now: float
    redis_unreachable: bool = False
    jwks_missing: bool = False
    retry_after: float | None = None


@attrs.define
class MetricsRendered:
    """The answer to :class:`~ostiary.protocol.actions.RenderMetrics`: the metrics in
    Prometheus text format."""

    request_id: str
    body: bytes = attrs.field(repr=False)
    now: float


@attrs.define
class LimitsDecided:
    """The shared limit store's answer to :class:`~ostiary.protocol.actions.CheckLimits`;
    ``decision`` None: the store is down or did not answer within its timeout."""

    request_id: str
    decision: Decision | None
    now: float


@attrs.define
class FailedAuthShared:
    """The shared store's deficit of a failed-authentication bucket after
    :class:`~ostiary.protocol.actions.ShareFailedAuth` (``wall``: when it was read)."""

    limit: Limit
    deficit: int
    wall: float


@attrs.define
class Tick:
    """The time the core asked to be woken at (:meth:`Gateway.next_deadline`) came."""

    now: float


@attrs.define
class KeysReplaced:
    """The key store changed: authenticate against ``keys`` from now on. ``tokens``:
    the token counter, when the runtime loaded it for these keys (a key with a token
    limit, where nothing in the config needed one before); None: keep the one there."""

    keys: KeyTable
    now: float
    tokens: TokenCodec | None = None


@attrs.define
class AccessReplaced:
    """The configuration was reloaded: roles, limits, JWT settings and trusted
    proxies from now on (buckets and holds carry over)."""

    access: AccessPolicy
    verifier: TokenVerifier | None
    trusted_proxies: tuple[Any, ...]
    now: float
    #: The token counter, when loaded for this config (see :class:`KeysReplaced`).
    tokens: TokenCodec | None = None


@attrs.define
class ShutdownStarted:
    """The server is draining: queued requests are refused, running ones finish."""

    now: float


Event = (
    RequestReceived
    | RequestRefused
    | BackendChunk
    | BackendFinished
    | EmbeddingsComputed
    | BackendFailed
    | ClientGone
    | ResponseSent
    | OutputTaken
    | ReadinessChecked
    | MetricsRendered
    | LimitsDecided
    | FailedAuthShared
    | Tick
    | KeysReplaced
    | AccessReplaced
    | ShutdownStarted
)
