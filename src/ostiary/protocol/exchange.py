"""One request's state inside the gateway, and the policy of the backend it uses.

An exchange moves through :class:`ExchangeState`; the legal moves are the
gateway's transition table (:data:`ostiary.protocol.gateway.TRANSITIONS`):

``RECEIVED`` → (``LIMITING``: the shared limit store judging) → ``QUEUED`` (no
free slot) → ``RUNNING`` (dispatched) → ``STREAMING`` (response head sent, output
flowing) → ``SENDING`` (the last bytes were handed to
the runtime) → done (forgotten, after exactly one access-log record). ``CHECKING`` is
``/readyz`` waiting for the runtime's backend checks, or ``/metrics`` for its
rendering. ``LIVE`` is an open ``/v1/queue/live`` WebSocket. Any state may end early: a
client that leaves, a failure, a timeout.
"""

from __future__ import annotations

import enum
import math
from typing import Any

import attrs

from .access import Principal
from .actions import BackendCall, Respond
from .admission import Endpoint, methods_of
from .buckets import ConcurrencyLimit
from .cors import CorsPolicy
from .errors import BackendTimeoutError, OpenAIError
from .generation import Usage
from .limits import Hold
from .output import CompletionOutput
from .responses import JSON_CONTENT, error_body, error_headers

__all__ = ["BackendPolicy", "Exchange", "ExchangeState", "Reservation"]

_SSE_HEADERS = (
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
)


@attrs.define(eq=False)  # not frozen: made on every admission (see limits.Hold)
class Reservation:
    """What an admitted request holds in a limit store until it ends: its hold, in
    which store (``shared``: the runtime's), and its prompt estimate in tokens (never
    changed)."""

    hold: Hold
    shared: bool
    prompt_tokens: int


class ExchangeState(enum.Enum):
    # Members are singletons: hash by identity, not (as Enum does) in Python by name.
    __hash__ = object.__hash__

    RECEIVED = "received"
    LIMITING = "limiting"
    QUEUED = "queued"
    RUNNING = "running"
    STREAMING = "streaming"
    CHECKING = "checking"
    SENDING = "sending"
    #: A live queue feed (``/v1/queue/live``) after its upgrade, until it closes.
    LIVE = "live"


@attrs.frozen(kw_only=True)
class BackendPolicy:
    """How the gateway schedules and times one backend; every field is a key of the
    backend's ``[[backends]]`` table, with the same default."""

    name: str
    #: Requests running on the backend at once.
    max_concurrency: int = attrs.field(default=64, validator=attrs.validators.ge(1))
    #: Requests waiting for a slot; one more is refused at once (503 ``queue_full``).
    max_queue: int = attrs.field(default=256, validator=attrs.validators.ge(0))
    #: Seconds a request may wait for a slot (then 503 ``queue_timeout``).
    max_queue_wait: float = attrs.field(default=30.0, validator=attrs.validators.gt(0))
    #: Seconds from dispatch to the backend's first output (then 504).
    first_output_timeout: float = attrs.field(default=120.0, validator=attrs.validators.gt(0))
    #: Seconds allowed between two pieces of output once it has started (then 504).
    stall_timeout: float = attrs.field(default=60.0, validator=attrs.validators.gt(0))
    #: Seconds from dispatch to the end of the generation (then 504).
    total_timeout: float = attrs.field(default=1800.0, validator=attrs.validators.gt(0))
    #: The queue's policy: "fair" (:class:`~ostiary.protocol.fair_queue.FairQueue`,
    #: token-weighted per principal) or "fifo" (arrival order).
    scheduler: str = attrs.field(default="fair", validator=attrs.validators.in_(("fair", "fifo")))
    #: Seconds a queued request waits to rise one priority class ("fair" only).
    aging_seconds: float = attrs.field(default=60.0, validator=attrs.validators.gt(0))
    #: Seconds over which the recent service rate (and so ``retry-after``) is measured.
    rate_window: float = attrs.field(default=30.0, validator=attrs.validators.gt(0))
    #: Seconds one request is assumed to hold a slot until releases have been measured.
    service_time: float = attrs.field(default=1.0, validator=attrs.validators.gt(0))

    @property
    def earliest_timeout(self) -> float:
        """Seconds after dispatch before which no timeout of a call can fire."""
        return min(self.first_output_timeout, self.stall_timeout, self.total_timeout)


@attrs.define(slots=True, eq=False)
class Exchange:
    request_id: str
    endpoint: Endpoint | None
    method: str
    path: str
    started: float
    created: int
    state: ExchangeState = ExchangeState.RECEIVED
    principal: Principal | None = None
    #: The client's address (what limits and the access log count it against).
    client: str = ""
    call: BackendCall | None = None
    policy: BackendPolicy | None = None
    #: How a chat or text completion's output becomes its response.
    output: CompletionOutput | None = None
    usage: Usage | None = None
    #: Set when the final response was handed over: what the access log will say.
    status: int = 0
    error: OpenAIError | None = None
    #: When the backend call started, and when it last produced output (-inf: never).
    dispatched: float = math.inf
    last_output: float = -math.inf
    #: The core asked for the backend call to stop: its late output is ignored.
    cancelled: bool = False
    #: CORS headers every response of this exchange carries (none by default).
    cors: tuple[tuple[bytes, bytes], ...] = ()
    #: Tokens the request is charged in its backend's queue until real usage is known.
    cost: float = 1.0
    #: What the request holds in the limit store (None: no limit applies), the
    #: ``x-ratelimit-*`` headers its responses carry, and the pieces of output it
    #: produced (to settle a call cut short). While LIMITING: its backend and slots.
    reservation: Reservation | None = None
    rate: tuple[tuple[bytes, bytes], ...] = ()
    produced: int = 0
    backend: str = ""
    limit_slots: tuple[ConcurrencyLimit, ...] = ()
    prompt_estimate: int = 0

    def respond(
        self,
        status: int,
        body: bytes,
        content_type: tuple[bytes, bytes] = JSON_CONTENT,
        extra: tuple[tuple[bytes, bytes], ...] = (),
    ) -> Respond:
        """The exchange's final, whole response (JSON unless told otherwise), with
        ``extra`` headers."""
        self.state = ExchangeState.SENDING
        self.status = status
        headers = (
            content_type,
            (b"x-request-id", self.request_id.encode()),
            *extra,
            *self.rate,
            *self.cors,
        )
        return Respond(self.request_id, status, headers, body)

    def fail(self, error: OpenAIError) -> Respond:
        """The exchange's final answer: ``error``, rendered."""
        self.state = ExchangeState.SENDING
        self.status = error.status
        self.error = error
        headers = (*error_headers(error, self.request_id), *self.rate, *self.cors)
        return Respond(self.request_id, error.status, headers, error_body(error))

    def stream_headers(self) -> tuple[tuple[bytes, bytes], ...]:
        return (
            *_SSE_HEADERS,
            (b"x-request-id", self.request_id.encode()),
            *self.rate,
            *self.cors,
        )

    def preflight(
        self, cors: CorsPolicy, target: str, headers: tuple[tuple[bytes, bytes], ...]
    ) -> Respond:
        """The answer to ``OPTIONS``: the methods the path takes, and CORS headers for
        an origin the policy lets in."""
        self.state = ExchangeState.SENDING
        self.status = 204
        methods = methods_of(target)
        out = (
            (b"x-request-id", self.request_id.encode()),
            (b"allow", methods),
            *cors.preflight_headers(headers, methods),
        )
        return Respond(self.request_id, 204, out, b"")

    def duration_ms(self, now: float) -> float:
        """How long the exchange took, ending at ``now``, as its record shows it."""
        return round((now - self.started) * 1000, 3)

    def access_fields(self, now: float) -> dict[str, Any]:
        """The fields of the exchange's one access-log record (never a secret)."""
        fields: dict[str, Any] = {
            "request_id": self.request_id,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "duration_ms": self.duration_ms(now),
        }
        principal = self.principal
        if principal is not None:
            fields["principal"] = principal.id
            if principal.id.startswith("key:"):
                fields["key_id"] = principal.label
            fields["role"] = principal.role.name
        if self.client:
            fields["client"] = self.client
        call = self.call
        if call is not None:
            fields["model"] = call.model
            # What the client asked for (a refused stream was still one).
            output = self.output
            fields["stream"] = (
                output.streaming if output is not None else bool(getattr(call, "stream", False))
            )
        usage = self.usage
        if usage is not None:
            fields["prompt_tokens"] = usage.prompt_tokens
            fields["completion_tokens"] = usage.completion_tokens
        error = self.error
        if error is not None:
            fields["error_type"] = error.type
            fields["error_code"] = error.code
        return fields

    @property
    def running(self) -> bool:
        return self.state is ExchangeState.RUNNING or self.state is ExchangeState.STREAMING

    def deadline(self) -> float:
        """When the running backend call times out, unless more output comes."""
        policy = self.policy
        if policy is None or not self.running:
            return math.inf
        total = self.dispatched + policy.total_timeout
        if self.last_output == -math.inf:
            return min(self.dispatched + policy.first_output_timeout, total)
        return min(self.last_output + policy.stall_timeout, total)

    def timeout_error(self, now: float) -> BackendTimeoutError:
        """The error for a call whose :meth:`deadline` has passed at ``now``."""
        policy = self.policy
        assert policy is not None
        if now >= self.dispatched + policy.total_timeout:
            message = f"The model did not finish within {policy.total_timeout:g} seconds."
            code = "backend_timeout"
        elif self.last_output == -math.inf:
            message = (
                f"The model produced no output within {policy.first_output_timeout:g} seconds."
            )
            code = "backend_timeout"
        else:
            message = f"The model stopped producing output for {policy.stall_timeout:g} seconds."
            code = "backend_stalled"
        return BackendTimeoutError(message, code=code)
