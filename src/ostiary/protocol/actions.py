"""What the core asks the runtime to do: actions (slotted, never changed once built;
not frozen, since a frozen attrs class costs twice as much to build).

Actions about one request name it by ``request_id``; the runtime carries each out in
that request's context, whichever event produced it (a slot freed by request A
dispatches request B). ``Log``, ``Count`` and ``CountExchange`` belong to no request
and are carried out at once.
"""

from __future__ import annotations

from typing import Any

import attrs

from .buckets import Charge, ConcurrencyLimit, Limit
from .limits import Hold
from .requests import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

__all__ = [
    "AcceptWebSocket",
    "Action",
    "BackendCall",
    "CancelBackend",
    "CheckLimits",
    "CheckReadiness",
    "CloseWebSocket",
    "Count",
    "CountExchange",
    "Dispatch",
    "EndStream",
    "Log",
    "RenderMetrics",
    "Respond",
    "SendBytes",
    "SettleLimits",
    "ShareFailedAuth",
    "StartStream",
]

Header = tuple[bytes, bytes]
BackendCall = ChatCompletionRequest | CompletionRequest | EmbeddingRequest


@attrs.define
class Respond:
    """Send a complete response (the runtime adds ``content-length``), then report
    :class:`~ostiary.protocol.events.ResponseSent` or ``ClientGone``. ``close``: close
    the connection after it."""

    request_id: str
    status: int
    headers: tuple[Header, ...]
    body: bytes
    close: bool = False


@attrs.define
class StartStream:
    """Start a streamed response (the runtime uses chunked transfer encoding)."""

    request_id: str
    status: int
    headers: tuple[Header, ...]


@attrs.define
class SendBytes:
    request_id: str
    data: bytes


@attrs.define
class EndStream:
    """End the streamed response, then report ``ResponseSent`` or ``ClientGone``."""

    request_id: str


@attrs.define
class Dispatch:
    """Start ``call`` on backend ``backend`` in the request's context and report
    what it produces with events (fire and report)."""

    request_id: str
    backend: str
    call: BackendCall


@attrs.define
class CancelBackend:
    """Stop the request's backend call now; its output is no longer wanted."""

    request_id: str


@attrs.define
class CheckReadiness:
    request_id: str


@attrs.define
class RenderMetrics:
    """Render the metrics (the tally of :class:`Count` actions, the queues' gauges,
    the process) in Prometheus text format, and report the bytes with
    :class:`~ostiary.protocol.events.MetricsRendered`: the core still answers and
    logs the request."""

    request_id: str


@attrs.define
class AcceptWebSocket:
    """Complete the WebSocket opening handshake (``101`` with ``headers``), then push
    ``Gateway.queue_snapshot`` to the client as a text message at most once per
    ``interval`` seconds, answer its pings and close it when it asks, when one of
    its messages passes ``max_message_bytes`` (1009), or on :class:`CloseWebSocket`.
    Then report ``ResponseSent`` (closed by either side with a close frame) or
    ``ClientGone`` (it vanished, or stopped reading)."""

    request_id: str
    headers: tuple[Header, ...]
    interval: float
    max_message_bytes: int


@attrs.define
class CloseWebSocket:
    """Close the request's live feed with ``code`` (1001: the server drains; 1008:
    its key was revoked or lost the admin role), then report as for its end."""

    request_id: str
    code: int


@attrs.define
class Log:
    """A structured log record; ``fields`` never hold secrets."""

    level: str
    message: str
    fields: dict[str, Any] = attrs.field(factory=dict)


@attrs.define
class Count:
    """One observation for metrics: ``name`` with ``labels`` (bounded: model ids
    come from the config, never from a client), by ``value`` (a counter's increment
    or a histogram's sample)."""

    name: str
    labels: tuple[tuple[str, str], ...]
    value: float = 1.0


@attrs.define
class CountExchange:
    """An exchange ended: its metrics, in one action (a :class:`Count` each would
    cost the hot path four times over). It counts as :meth:`counts` says: one
    ``ostiary_requests_total`` {endpoint, model, status}, ``duration`` (seconds)
    observed in ``ostiary_request_duration_seconds`` {endpoint, model}, the tokens of
    a request that used a model in ``ostiary_tokens_total`` {model, kind} (only kinds
    with tokens), and a 401 in ``ostiary_auth_failures_total`` {reason}, its error
    code (``auth_failure``). Labels are bounded as a :class:`Count`'s are."""

    endpoint: str
    model: str
    status: int
    duration: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    auth_failure: str | None = None

    def counts(self) -> list[Count]:
        """The same as plain :class:`Count` actions, in the order they are tallied."""
        labels = (("endpoint", self.endpoint), ("model", self.model))
        counts = [
            Count("ostiary_requests_total", (*labels, ("status", str(self.status)))),
            Count("ostiary_request_duration_seconds", labels, self.duration),
        ]
        tokens = (("prompt", self.prompt_tokens), ("completion", self.completion_tokens))
        for kind, value in tokens if self.model else ():
            if value:
                labels = (("model", self.model), ("kind", kind))
                counts.append(Count("ostiary_tokens_total", labels, value))
        if self.auth_failure is not None:
            counts.append(Count("ostiary_auth_failures_total", (("reason", self.auth_failure),)))
        return counts


@attrs.define
class CheckLimits:
    """Judge a request's charges and slots in the shared (Redis) limit store, all or
    nothing, and report with :class:`~ostiary.protocol.events.LimitsDecided`
    (``decision`` None when the store could not answer within its timeout)."""

    request_id: str
    charges: tuple[Charge, ...]
    slots: tuple[ConcurrencyLimit, ...]


@attrs.define
class SettleLimits:
    """The request that held ``hold`` in the shared store ended having used
    ``actual_tokens``: settle its token buckets and give back its slots. Fire and
    forget (the store's leases cover a settlement that never arrives)."""

    hold: Hold
    actual_tokens: int


@attrs.define
class ShareFailedAuth:
    """A 401 was counted against ``limit`` (a client address' failed-authentication
    budget) in this process: count it in the shared store too, and report that
    bucket's deficit there back with
    :class:`~ostiary.protocol.events.FailedAuthShared`, so replicas refuse an address
    that failed on any of them. Fire and forget (it never delays a response)."""

    limit: Limit


Action = (
    Respond
    | StartStream
    | SendBytes
    | EndStream
    | Dispatch
    | CancelBackend
    | CheckReadiness
    | RenderMetrics
    | CheckLimits
    | SettleLimits
    | ShareFailedAuth
    | AcceptWebSocket
    | CloseWebSocket
    | Log
    | Count
    | CountExchange
)
