"""The gateway: the sans-IO state machine at the heart of Ostiary, and the one place
of policy.

Events in (:mod:`.events`), actions out (:mod:`.actions`). It judges heads
(:meth:`Gateway.admits`), then for each request routes, authenticates, decodes and
validates it, picks the backend by model, takes a slot or a place in that backend's
queue (:mod:`.scheduler`), and asks the runtime to dispatch; it turns the backend's
output into an OpenAI response or SSE stream, times the call out when it is slow,
frees the slot (dispatching the next queued request in the same call) and finishes
the exchange exactly once, with one access-log record, when the runtime reports
the last byte written or the client gone. Every error body and ``retry-after`` is
rendered here; so are the HTTP layer's own refusals (:class:`RequestRefused`).

Timers in the aioquic manner: :meth:`Gateway.next_deadline` says when the gateway
next needs to be woken, and the runtime then feeds it a :class:`Tick`.

Same events in the same order give the same actions: the gateway reads no clock,
does no I/O and draws no randomness (request ids and times come in with events).

The walk of a request through runtime and core is written down in
``docs/request-walk.md``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import attrs
import orjson

from . import decoding, openapi
from .access import AccessPolicy, Principal
from .actions import (
    Action,
    BackendCall,
    CheckLimits,
    CheckReadiness,
    Count,
    Log,
    RenderMetrics,
)
from .admission import (
    ADMIN,
    PUBLIC,
    WITH_BODY,
    Admission,
    Endpoint,
    refusal_error,
    route,
)
from .auth import KeyTable
from .capabilities import Capabilities, fit
from .cors import CorsPolicy
from .credentials import TokenVerifier, UnknownSigningKey
from .dashboard import Assets
from .endings import (
    on_chunk,
    on_client_gone,
    on_embeddings,
    on_failed,
    on_finished,
    on_sent,
    on_shutdown,
    on_tick,
    on_viewer_left,
    shutting_down,
)
from .errors import NotFoundError, OpenAIError, ServiceUnavailableError
from .events import (
    AccessReplaced,
    BackendChunk,
    BackendFailed,
    BackendFinished,
    ClientGone,
    EmbeddingsComputed,
    Event,
    FailedAuthShared,
    KeysReplaced,
    LimitsDecided,
    MetricsRendered,
    OutputTaken,
    ReadinessChecked,
    RequestReceived,
    RequestRefused,
    ResponseSent,
    ShutdownStarted,
    Tick,
)
from .exchange import BackendPolicy, Exchange, ExchangeState, Reservation
from .fair_queue import scheduler_for
from .guard import Guard
from .limits import Decision
from .live import LiveSettings, Viewers, credentials
from .output import CompletionOutput
from .readiness import Readiness
from .request_limits import RequestLimits
from .requests import EmbeddingRequest
from .responses import encode_model, encode_models
from .scheduler import Scheduler, Submitted
from .slots import Backends
from .tokens import TokenCodec
from .tool_validation import SchemaChecker
from .visibility import (
    Network,
    estimate_cost,
    peer_allowed,
    queue_body,
)

__all__ = [
    "TRANSITIONS",
    "BackendPolicy",
    "Endpoint",
    "ExchangeState",
    "Gateway",
    "GatewayUsageError",
    "ModelRoute",
]

_DECODERS: dict[Endpoint, Callable[[bytes, RequestLimits, frozenset[str]], BackendCall]] = {
    Endpoint.CHAT: decoding.decode_chat,
    Endpoint.COMPLETIONS: decoding.decode_completion,
    Endpoint.EMBEDDINGS: decoding.decode_embedding,
}
#: Requests that ended kept for ``/v1/queue``'s ``recent`` (the dashboard's list).
RECENT = 20
#: The content type of ``/metrics`` (Prometheus text format 0.0.4).
PROMETHEUS_CONTENT = (b"content-type", b"text/plain; version=0.0.4; charset=utf-8")


Header = tuple[bytes, bytes]


class GatewayUsageError(Exception):
    """The runtime fed an event that is wrong for the exchange's state (or names no
    exchange): a bug in the runtime, never a client's doing."""


@attrs.frozen
class ModelRoute:
    """A model id clients may ask for, the backend that serves it, and what the
    model accepts."""

    model: str
    backend: str
    owned_by: str = "ostiary"
    capabilities: Capabilities = attrs.field(factory=Capabilities)


class Gateway:
    """Routes, authenticates, validates, schedules and dispatches requests; encodes
    responses; times backend calls. See the module docstring.

    ``routes`` lists every model a client may ask for; ``backends`` gives each
    backend's policy (one with the defaults is made for a backend a route names and
    this does not); ``keys`` is the key table (replace it with a
    :class:`KeysReplaced` event); ``created`` is the ``created`` time reported for
    models; ``scheduler`` builds the queue in front of each backend (default: the
    one each policy's ``scheduler`` names, :class:`FairQueue` unless "fifo");
    ``metrics_allow`` lists the networks whose peers may read ``/metrics`` without a
    key. Access control (:mod:`.guard`): ``access`` holds the roles and rate-limit
    layers, ``verifier`` checks JWTs (None: keys only), ``trusted_proxies`` may say
    who the client is; ``shared_limits`` judges limits in the runtime's shared store
    (:class:`CheckLimits`), which on failure "refuse"s (503) or counts "local"ly
    (``on_limits_failure``); ``live`` bounds the ``/v1/queue/live`` feeds
    (:mod:`.live`); ``assets`` are the dashboard's files (:mod:`.dashboard`);
    ``schema_checker`` (the runtime's JSON Schema library) checks the schemas of
    requests and, in strict mode, the output.
    """

    def __init__(
        self,
        *,
        routes: Iterable[ModelRoute],
        keys: KeyTable,
        backends: Iterable[BackendPolicy] = (),
        limits: RequestLimits | None = None,
        created: int = 0,
        scheduler: Callable[[BackendPolicy], Scheduler] | None = None,
        tokens: TokenCodec | None = None,
        cors: CorsPolicy | None = None,
        metrics_allow: tuple[Network, ...] = (),
        access: AccessPolicy | None = None,
        verifier: TokenVerifier | None = None,
        trusted_proxies: tuple[Network, ...] = (),
        shared_limits: bool = False,
        on_limits_failure: str = "refuse",
        live: LiveSettings | None = None,
        assets: Assets | None = None,
        schema_checker: SchemaChecker | None = None,
    ) -> None:
        self._schema_checker = schema_checker
        self._decoders = dict(_DECODERS)
        self._decoders[Endpoint.CHAT] = partial(decoding.decode_chat, schema_checker=schema_checker)
        self._routes = {r.model: r for r in routes}
        self._tokens = tokens
        #: Extension names some model takes beyond the known ones: decoding keeps them.
        self._passed_on = frozenset(
            name for r in self._routes.values() for name in r.capabilities.extensions
        )
        self._cors = cors if cors is not None else CorsPolicy()
        self._keys = keys
        self._keys_version = 0
        self.limits = limits if limits is not None else RequestLimits()
        self._created = created
        policies = {p.name: p for p in backends}
        for r in self._routes.values():
            policies.setdefault(r.backend, BackendPolicy(name=r.backend))
        self._exchanges: dict[str, Exchange] = {}
        make = scheduler if scheduler is not None else scheduler_for
        self._backends = Backends(policies, make, self._exchanges)
        self._metrics_allow = metrics_allow
        self._guard = Guard(
            access,
            verifier=verifier,
            trusted_proxies=trusted_proxies,
            max_output_tokens=self.limits.max_output_tokens,
            tokens=tokens,
            shared=shared_limits,
            on_failure=on_limits_failure,
        )
        self._viewers = Viewers(live if live is not None else LiveSettings())
        self._assets = assets if assets is not None else Assets()
        self._shutting_down = False
        #: What the last ``/readyz`` found (its changes are logged).
        self._readiness = Readiness()
        #: The last requests that ended, newest last (for the dashboard).
        self._recent: deque[tuple[object, ...]] = deque(maxlen=RECENT)
        #: Whether an exchange's end brings its access-log record (``Log`` "request"):
        #: a runtime that drops them all says so, and they are not even built.
        self.access_records = True

    # -- what the runtime may ask --------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Exchanges started and not yet finished."""
        return len(self._exchanges)

    @property
    def keys(self) -> KeyTable:
        return self._keys

    @property
    def guard(self) -> Guard:
        """Access control: roles, limits and their stores."""
        return self._guard

    def state_of(self, request_id: str) -> ExchangeState | None:
        exchange = self._exchanges.get(request_id)
        return exchange.state if exchange is not None else None

    def scheduler(self, backend: str) -> Scheduler:
        return self._backends.schedulers[backend]

    @property
    def backends(self) -> tuple[str, ...]:
        """The backends' names, each with its own scheduler."""
        return tuple(self._backends.schedulers)

    def queue_snapshot(self, now: float) -> bytes:
        """The JSON of ``GET /v1/queue`` (also each message of ``/v1/queue/live``)."""
        b = self._backends
        return queue_body(b.policies, b.schedulers, b.waits, now, self._recent)

    def next_deadline(self) -> float:
        """When the gateway next needs a :class:`Tick` (``inf``: no timer pending)."""
        return self._backends.next_deadline(math.inf)

    def admits(
        self,
        method: str,
        target: str,
        headers: tuple[tuple[bytes, bytes], ...],
        peer: str = "",
        wall: float = 0.0,
    ) -> Admission:
        """Judge a request from its head alone (see :class:`Admission`): the route,
        the credentials where the route needs them, and the body it may have."""
        try:
            endpoint, model_id = route(method, target)
        except OpenAIError as error:
            return Admission(None, 0, peer, error=error)
        if endpoint in PUBLIC or (
            endpoint is Endpoint.METRICS and peer_allowed(peer, self._metrics_allow)
        ):
            return Admission(endpoint, 0, peer)
        guard = self._guard
        client = guard.client(peer, headers)
        version = self._keys_version
        try:
            principal = guard.authenticate(self._keys, credentials(endpoint, headers), client, wall)
            guard.check_endpoint(principal, endpoint)
        except UnknownSigningKey as error:
            return Admission(endpoint, 0, peer, error=error, refresh_keys=True, client=client)
        except OpenAIError as error:
            return Admission(endpoint, 0, peer, error=error, client=client)
        if endpoint not in WITH_BODY:
            return Admission(endpoint, 0, peer, principal, model_id, None, version, client=client)
        try:
            # Judged before the body is read: a body we would refuse is never read.
            decoding.check_content_type(headers)
        except OpenAIError as error:
            return Admission(endpoint, 0, peer, principal, error=error, client=client)
        max_body = self.limits.max_body_bytes
        return Admission(
            endpoint, max_body, peer, principal, model_id, None, version, client=client
        )

    def handle(self, event: Event) -> list[Action]:
        """Feed one event; get the actions it calls for, in order. An event that is
        wrong for its exchange's state raises :class:`GatewayUsageError`."""
        kind = type(event)
        start = _STARTS.get(kind)
        if start is not None:
            return start(self, event)
        request_id: str = event.request_id  # type: ignore[union-attr]
        exchange = self._exchanges.get(request_id)
        if exchange is None:
            raise GatewayUsageError(f"{kind.__name__} for no exchange: {request_id!r}")
        transition = TRANSITIONS.get((exchange.state, kind))
        if transition is None:
            raise GatewayUsageError(
                f"{kind.__name__} is not valid for {request_id!r} in state {exchange.state.name}"
            )
        return transition(self, exchange, event)

    # -- exchanges begin -----------------------------------------------------------

    def _new_exchange(
        self, request_id: str, endpoint: Endpoint | None, method: str, target: str, now: float
    ) -> Exchange:
        if request_id in self._exchanges:
            raise GatewayUsageError(f"request id {request_id!r} is already in flight")
        exchange = Exchange(
            request_id, endpoint, method, target.partition("?")[0], now, self._created
        )
        self._exchanges[request_id] = exchange
        return exchange

    def _on_request(self, event: RequestReceived) -> list[Action]:
        admission = event.admission
        exchange = self._new_exchange(
            event.request_id, admission.endpoint, event.method, event.target, event.now
        )
        exchange.created = int(event.wall)
        exchange.principal = admission.principal
        exchange.client = admission.client
        if self._cors.enabled:
            exchange.cors = self._cors.response_headers(event.headers)
        try:
            if admission.error is not None:
                raise admission.error
            endpoint = admission.endpoint
            if endpoint is Endpoint.PREFLIGHT:
                return [exchange.preflight(self._cors, event.target, event.headers)]
            if endpoint is Endpoint.HEALTH:
                return [exchange.respond(200, b'{"status":"ok"}')]
            if endpoint is Endpoint.DASHBOARD:
                return [self._assets.respond(exchange)]
            if endpoint is Endpoint.READY:
                exchange.state = ExchangeState.CHECKING
                return [CheckReadiness(event.request_id)]
            if endpoint is Endpoint.METRICS and peer_allowed(admission.peer, self._metrics_allow):
                return self._render_metrics(exchange)
            principal = exchange.principal = self._principal(admission, event)
            if endpoint is Endpoint.OPENAPI:
                return [openapi.respond(exchange, event.headers)]
            if endpoint in ADMIN:
                return self._on_admin(exchange, endpoint, event.now, event.headers)
            if endpoint is Endpoint.MODELS:
                role = principal.role
                models = (
                    self._model_dict(r)
                    for r in self._routes.values()
                    if role.may_use_model(r.model)
                )
                return [exchange.respond(200, encode_models(models))]
            if endpoint is Endpoint.MODEL:
                assert admission.model_id is not None
                found = self._find_model(admission.model_id, principal)
                return [exchange.respond(200, orjson.dumps(self._model_dict(found)))]
            assert endpoint is not None
            call = self._decoders[endpoint](event.body, self.limits, self._passed_on)
            target = self._find_model(call.model, principal)
            call = fit(call, target.capabilities, self._tokens)
            call = self._guard.cap_output(call, principal.role)
            if self._shutting_down:
                raise shutting_down()
        except OpenAIError as error:
            if error.status == 401:
                share = self._guard.failed(exchange.client, event.wall)
                if share is not None:
                    return [exchange.fail(error), share]
            return [exchange.fail(error)]
        exchange.call = call
        exchange.cost = estimate_cost(call, len(event.body))
        guard = self._guard
        # Nothing in the config limits anyone, but a key may have limits of its own
        # (its overrides: then its principal's limits are not its role's).
        if guard.access.limited or principal.limits is not principal.role:
            if not guard.shared:
                # The memory store, in this same call: reserved, or refused.
                refused = guard.take(exchange, principal, call, endpoint, event.now)
                if refused is not None:
                    return self._admit(exchange, refused, target.backend, event.now, shared=False)
                return self._schedule(exchange, target.backend, event.now)
            charges, slots, prompt = guard.charges(principal, exchange.client, call, endpoint)
            if charges or slots:
                exchange.prompt_estimate = prompt
                exchange.limit_slots = slots
                exchange.state = ExchangeState.LIMITING
                exchange.backend = target.backend
                return [CheckLimits(exchange.request_id, charges, slots)]
        return self._schedule(exchange, target.backend, event.now)

    def _on_limits(self, exchange: Exchange, event: LimitsDecided) -> list[Action]:
        decision = event.decision
        if decision is None:
            guard = self._guard
            if guard.on_failure != "local":
                error = ServiceUnavailableError(
                    "The rate limiter is unavailable; retry shortly.",
                    code="rate_limiter_unavailable",
                    retry_after=1.0,
                )
                return [_UNDECIDED_REFUSED, exchange.fail(error)]
            call = exchange.call
            assert call is not None and exchange.principal is not None and exchange.endpoint
            charges, slots, _ = guard.charges(
                exchange.principal, exchange.client, call, exchange.endpoint
            )
            decision = guard.judge(charges, slots, event.now)
            admitted = self._admit(exchange, decision, exchange.backend, event.now, shared=False)
            return [_UNDECIDED_LOCAL, *admitted]
        return self._admit(exchange, decision, exchange.backend, event.now, shared=True)

    def _admit(
        self, exchange: Exchange, decision: Decision, backend: str, now: float, *, shared: bool
    ) -> list[Action]:
        """Go on with a request the limits judged: refused (429), or on to the queue."""
        guard = self._guard
        principal = exchange.principal
        assert principal is not None
        hold = decision.hold
        if hold is None:
            slots = exchange.limit_slots
            scope = guard.scope_of(decision, slots)
            return [
                Count("ostiary_rate_limited_total", (("scope", scope),)),
                exchange.fail(guard.refusal(decision, slots, principal, exchange.prompt_estimate)),
            ]
        exchange.reservation = Reservation(hold, shared, exchange.prompt_estimate)
        exchange.rate = guard.headers(decision)
        return self._schedule(exchange, backend, now)

    def _on_admin(
        self, exchange: Exchange, endpoint: Endpoint, now: float, headers: tuple[Header, ...]
    ) -> list[Action]:
        if endpoint is Endpoint.QUEUE:
            return [exchange.respond(200, self.queue_snapshot(now))]
        if endpoint is Endpoint.QUEUE_LIVE:
            return [self._viewers.accept(exchange, headers, self._shutting_down)]
        return self._render_metrics(exchange)

    def _render_metrics(self, exchange: Exchange) -> list[Action]:
        """The runtime renders (it keeps the tally), the core answers."""
        exchange.state = ExchangeState.CHECKING
        return [RenderMetrics(exchange.request_id)]

    def _on_metrics(self, exchange: Exchange, event: MetricsRendered) -> list[Action]:
        return [exchange.respond(200, event.body, PROMETHEUS_CONTENT)]

    def _principal(self, admission: Admission, event: RequestReceived) -> Principal:
        principal = admission.principal
        if principal is None or admission.keys_version != self._keys_version:
            # Judged by an older key table (or not at all): judge again.
            guard = self._guard
            principal = guard.authenticate(
                self._keys,
                credentials(admission.endpoint, event.headers),
                admission.client,
                event.wall,
            )
            assert admission.endpoint is not None
            guard.check_endpoint(principal, admission.endpoint)
        return principal

    def _on_refused(self, event: RequestRefused) -> list[Action]:
        exchange = self._new_exchange(event.request_id, None, event.method, event.target, event.now)
        exchange.created = int(event.wall)
        return [exchange.fail(refusal_error(event.refusal, event.limit))]

    def _find_model(self, model_id: str, principal: Principal | None) -> ModelRoute:
        found = self._routes.get(model_id)
        if found is None or (principal is not None and not principal.role.may_use_model(model_id)):
            raise NotFoundError(
                f"The model `{model_id}` does not exist or you do not have access to it.",
                param="model",
                code="model_not_found",
            )
        return found

    def _model_dict(self, r: ModelRoute) -> dict[str, object]:
        return encode_model(r.model, created=self._created, owned_by=r.owned_by)

    # -- slots and the queue ---------------------------------------------------------

    def _schedule(self, exchange: Exchange, backend: str, now: float) -> list[Action]:
        call = exchange.call
        assert call is not None
        if not isinstance(call, EmbeddingRequest):
            exchange.output = CompletionOutput(
                call, exchange.request_id, exchange.created, self.limits, self._schema_checker
            )
        outcome = self._backends.submit(exchange, backend, now)
        if outcome is Submitted.RUNNING:
            return [self._backends.dispatch(exchange, now)]
        if outcome is Submitted.QUEUED:
            return []
        error = ServiceUnavailableError(
            "The model's queue is full; retry shortly.",
            code="queue_full",
            retry_after=self._backends.schedulers[backend].estimate_wait(now),
        )
        return [exchange.fail(error)]

    # -- events that belong to no exchange (ticks and the shutdown: :mod:`.endings`) -

    def _on_keys(self, event: KeysReplaced) -> list[Action]:
        self._keys = event.keys
        self._counter(event.tokens)
        self._keys_version += 1
        log = Log("info", "reloaded API keys", {"active_keys": len(event.keys.keys)})
        return [log, *self._viewers.revoked(event.keys)]

    def _on_access(self, event: AccessReplaced) -> list[Action]:
        self._guard.replace(event.access, event.verifier, event.trusted_proxies)
        self._counter(event.tokens)
        fields = {"roles": sorted(event.access.roles), "rate_limits": len(event.access.layers)}
        return [Log("info", "reloaded roles and limits", fields)]

    def _on_output_taken(self, event: OutputTaken) -> list[Action]:
        """See :class:`OutputTaken`. The exchange may have ended or moved on while
        the write waited (timed out, cancelled): then nothing changes."""
        exchange = self._exchanges.get(event.request_id)
        if exchange is not None and exchange.state is ExchangeState.STREAMING:
            exchange.last_output = max(exchange.last_output, event.now)
        return []

    def _counter(self, tokens: TokenCodec | None) -> None:
        """A token counter the runtime loaded because a limit came to need one."""
        if tokens is not None:
            self._guard.tokens = tokens
            if self._tokens is None:
                self._tokens = tokens

    def _on_failed_auth_shared(self, event: FailedAuthShared) -> list[Action]:
        self._guard.failures_shared(event.limit, event.deficit, event.wall)
        return []

    # -- late backend news, readiness (backend output and endings: :mod:`.endings`) --

    def _on_late_output(self, exchange: Exchange, event: Event) -> list[Action]:
        """Backend news after the gateway cancelled the call: expected, ignored."""
        if not exchange.cancelled:
            raise GatewayUsageError(
                f"{type(event).__name__} after the response of {exchange.request_id!r}"
            )
        return []

    def _on_readiness(self, exchange: Exchange, event: ReadinessChecked) -> list[Action]:
        return self._readiness.answer(exchange, event, self._guard.on_failure == "local")


#: An admission the shared store did not decide in time, refused or judged here
#: (``[redis] on_failure``).
_UNDECIDED_REFUSED = Count("ostiary_limiter_unavailable_total", (("on_failure", "refuse"),))
_UNDECIDED_LOCAL = Count("ostiary_limiter_unavailable_total", (("on_failure", "local"),))

_S = ExchangeState
#: The lifecycle: (state, event type) → what the gateway does. Anything missing is a
#: usage error.
TRANSITIONS: dict[tuple[ExchangeState, type], Callable[[Gateway, Exchange, Any], list[Action]]] = {
    # A request whose own handling broke (a bug) is still answered once, or ended.
    (_S.RECEIVED, BackendFailed): on_failed,
    (_S.RECEIVED, ClientGone): on_client_gone,
    (_S.LIMITING, LimitsDecided): Gateway._on_limits,
    (_S.LIMITING, BackendFailed): on_failed,
    (_S.LIMITING, ClientGone): on_client_gone,
    (_S.QUEUED, ClientGone): on_client_gone,
    (_S.RUNNING, BackendChunk): on_chunk,
    (_S.RUNNING, BackendFinished): on_finished,
    (_S.RUNNING, EmbeddingsComputed): on_embeddings,
    (_S.RUNNING, BackendFailed): on_failed,
    (_S.RUNNING, ClientGone): on_client_gone,
    (_S.STREAMING, BackendChunk): on_chunk,
    (_S.STREAMING, BackendFinished): on_finished,
    (_S.STREAMING, BackendFailed): on_failed,
    (_S.STREAMING, ClientGone): on_client_gone,
    (_S.CHECKING, ReadinessChecked): Gateway._on_readiness,
    (_S.CHECKING, MetricsRendered): Gateway._on_metrics,
    (_S.CHECKING, BackendFailed): on_failed,
    (_S.CHECKING, ClientGone): on_client_gone,
    (_S.SENDING, ResponseSent): on_sent,
    (_S.LIVE, ResponseSent): on_viewer_left,
    (_S.LIVE, ClientGone): on_viewer_left,
    (_S.SENDING, ClientGone): on_client_gone,
    (_S.SENDING, BackendChunk): Gateway._on_late_output,
    (_S.SENDING, BackendFinished): Gateway._on_late_output,
    (_S.SENDING, EmbeddingsComputed): Gateway._on_late_output,
    (_S.SENDING, BackendFailed): Gateway._on_late_output,
}
#: Events that start an exchange or belong to none.
_STARTS: dict[type, Callable[[Gateway, Any], list[Action]]] = {
    RequestReceived: Gateway._on_request,
    RequestRefused: Gateway._on_refused,
    Tick: on_tick,
    KeysReplaced: Gateway._on_keys,
    AccessReplaced: Gateway._on_access,
    FailedAuthShared: Gateway._on_failed_auth_shared,
    ShutdownStarted: on_shutdown,
    OutputTaken: Gateway._on_output_taken,
}
