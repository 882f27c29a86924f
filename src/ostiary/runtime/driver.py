"""The driver: feeds the gateway events and carries out the actions it returns.

It is the only place where the core meets I/O. Each request has a
:class:`_Context`: its responder, the cancel scope of its backend call, and a small
bounded mailbox. Actions for the request whose event is being handled run inline in
its own task (the common path pays nothing for routing); actions for another request
(a slot freed by A dispatches B, a timer ends C) go to that request's mailbox, and
``CancelBackend`` cancels that request's backend scope at once. ``Log`` and
``Count`` are carried out on the spot. ``RenderMetrics`` renders the tally of those
counts (:mod:`.exposition`) and hands the bytes back to the gateway, which answers.
``AcceptWebSocket`` turns the connection into a live queue feed (:mod:`.live`) until
it closes.

``Dispatch`` is fire and report: the backend call runs in the request's task, its
output is fed back as events (streamed output through a bounded channel, so a slow
client slows only its own stream). One timer task per gateway sleeps until
:meth:`Gateway.next_deadline` and feeds a ``Tick``. However a request ends
(answered, failed, timed out, client gone, a write that failed), the gateway hears
of it exactly once and writes its one access-log record.
"""

from __future__ import annotations

import itertools
import logging
import math
import secrets
import time
from collections.abc import Mapping, Sequence
from contextlib import aclosing

import trio

from ostiary.backends import Backend, Generation
from ostiary.protocol.access import AccessPolicy
from ostiary.protocol.actions import (
    AcceptWebSocket,
    Action,
    CancelBackend,
    CheckLimits,
    CheckReadiness,
    Count,
    CountExchange,
    Dispatch,
    EndStream,
    Log,
    RenderMetrics,
    Respond,
    SendBytes,
    SettleLimits,
    ShareFailedAuth,
    StartStream,
)
from ostiary.protocol.admission import Admission
from ostiary.protocol.auth import KeyTable
from ostiary.protocol.buckets import Limit
from ostiary.protocol.credentials import TokenVerifier
from ostiary.protocol.errors import InternalServerError, OpenAIError
from ostiary.protocol.events import (
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
    Refusal,
    RequestReceived,
    RequestRefused,
    ResponseSent,
    ShutdownStarted,
    Tick,
)
from ostiary.protocol.exchange import ExchangeState
from ostiary.protocol.gateway import Gateway
from ostiary.protocol.generation import Delta, Usage
from ostiary.protocol.requests import ChatCompletionRequest, EmbeddingRequest
from ostiary.protocol.responses import error_body, error_headers
from ostiary.protocol.tokens import TokenCodec
from ostiary.protocol.visibility import Network

from .access_log import AccessLog
from .exposition import Exposition
from .http import ClientDisconnected, HttpRequest
from .jwt import KeyRefresher
from .live import serve_viewer
from .metrics import Metrics
from .responder import ResponseWriter
from .shared_limits import SharedLimits

__all__ = ["Driver"]

access_log = logging.getLogger("ostiary.access")
log = logging.getLogger("ostiary.driver")

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
_INTERNAL = "The server had an error while processing your request."
#: Seconds a stream write may take before the core is told the backend waited for
#: the client (:class:`OutputTaken`); quicker writes cost it no event.
_SLOW_WRITE = 0.01
#: Pieces of a non-streamed generation handed to the gateway at once.
_BATCH = 256
#: Actions one request may have waiting in its mailbox: far more than the gateway
#: ever sends one request from other requests' events (a Dispatch, or a response).
_MAILBOX = 16
#: Actions for no request's own task that few requests bring.
_RARE = (SettleLimits, ShareFailedAuth, CancelBackend)


class _Context:
    """One request as the runtime carries it out."""

    __slots__ = ("backend_scope", "mailbox", "request_id", "responder", "waiter")

    def __init__(self, request_id: str, responder: ResponseWriter) -> None:
        self.request_id = request_id
        self.responder = responder
        self.mailbox: list[Action] = []
        self.waiter: trio.Event | None = None
        self.backend_scope: trio.CancelScope | None = None

    def post(self, action: Action) -> None:
        if len(self.mailbox) >= _MAILBOX:
            raise RuntimeError(f"mailbox of {self.request_id} is full")
        self.mailbox.append(action)
        if self.waiter is not None:
            self.waiter.set()
            self.waiter = None

    def cancel_backend(self) -> None:
        if self.backend_scope is not None:
            self.backend_scope.cancel()
        else:  # not started yet: never start it
            self.mailbox = [a for a in self.mailbox if not isinstance(a, Dispatch)]

    async def take(self) -> list[Action]:
        while not self.mailbox:
            self.waiter = trio.Event()
            await self.waiter.wait()
        actions, self.mailbox = self.mailbox, []
        return actions


#: What ``/readyz`` found: backends' (name, problem), Redis unreachable, no JWKS.
_Checks = tuple[tuple[tuple[str, str], ...], bool, bool]


class Driver:
    """The HTTP handler that runs requests through ``gateway`` and ``backends``.

    ``access_log``: ``True`` sends each request's record to the ``ostiary.access``
    logger, ``False`` drops it, an :class:`AccessLog` writes it on its fast path.
    """

    def __init__(
        self,
        gateway: Gateway,
        backends: Mapping[str, Backend],
        *,
        access_log: bool | AccessLog = True,
        stream_buffer: int = 64,
        ready_timeout: float = 5.0,
        ready_cache: float = 1.0,
        metrics: Metrics | None = None,
        verifier: KeyRefresher | None = None,
        shared_limits: SharedLimits | None = None,
    ) -> None:
        self.gateway = gateway
        #: Refreshes the JWT verifier's key set when a token names an unknown kid.
        self.verifier = verifier
        self.shared_limits = shared_limits
        self._backends = backends
        self._access_log = access_log is not False
        if not self._access_log:
            gateway.access_records = False  # dropped here: not even built
        self._access_writer = access_log if isinstance(access_log, AccessLog) else None
        self._stream_buffer = stream_buffer
        self._ready_timeout = ready_timeout
        self._ready_cache = ready_cache
        self.metrics = metrics if metrics is not None else Metrics()
        self._exposition = Exposition(self.metrics, gateway)
        self._ready_lock = trio.Lock()
        self._ready_until = -math.inf
        self._ready_checks: _Checks = ((), False, False)
        self._prefix = secrets.token_hex(4)
        self._counter = itertools.count(1)
        self._contexts: dict[str, _Context] = {}
        #: Requests whose stream output is being written (the backend paused behind
        #: the client): a Tick first tells the core they wait (see OutputTaken).
        self._writing: set[str] = set()
        self._timer: trio.CancelScope | None = None

    def settle_limits(self, action: SettleLimits) -> None:
        """Hand a hold of the shared limit store to its settlers (never awaits)."""
        if self.shared_limits is not None:
            self.shared_limits.settle(action.hold, action.actual_tokens)
        else:
            log.error("a shared-store hold to settle, but no shared store", extra={"fields": {}})

    def _failures_shared(self, limit: Limit, deficit: int) -> None:
        self._feed(FailedAuthShared(limit, deficit, time.time()))

    def next_request_id(self) -> str:
        """A new request id: unique within the process, unpredictable across runs."""
        return f"{self._prefix}{next(self._counter):08x}"

    # -- the HTTP server's handler interface -------------------------------------------

    async def admits(
        self, method: str, target: str, headers: tuple[tuple[bytes, bytes], ...], peer: str
    ) -> Admission:
        admission = self.gateway.admits(method, target, headers, peer, time.time())
        verifier = self.verifier
        # A JWT naming a key we lack: the key set may have rotated. Refresh it
        # (rate-limited, one fetch shared by all who ask) and judge once more.
        if (
            admission.refresh_keys
            and verifier is not None
            and await verifier.refresh_for_unknown_kid()
        ):
            admission = self.gateway.admits(method, target, headers, peer, time.time())
        return admission

    async def handle(self, request: HttpRequest, responder: ResponseWriter) -> None:
        rid = self.next_request_id()
        ctx = _Context(rid, responder)
        event = RequestReceived(
            rid,
            request.admission,
            request.method,
            request.target,
            request.headers,
            request.body,
            trio.current_time(),
            time.time(),
        )
        await self._serve(ctx, event)

    async def refuse(
        self, refusal: Refusal, responder: ResponseWriter, method: str, target: str, limit: int
    ) -> None:
        rid = self.next_request_id()
        event = RequestRefused(
            rid, refusal, trio.current_time(), time.time(), method, target, limit
        )
        await self._serve(_Context(rid, responder), event)

    async def _serve(self, ctx: _Context, event: Event) -> None:
        rid = ctx.request_id
        gateway = self.gateway
        self._contexts[rid] = ctx
        try:
            await self._run(ctx, self._feed(event))
            while gateway.state_of(rid) is not None:
                await self._run(ctx, await ctx.take())
        except ClientDisconnected:
            pass
        except Exception:
            # A bug of ours: log it, show the client nothing of it.
            log.exception("unhandled error", extra={"fields": {"request_id": rid}})
            await self._internal_error(ctx)
        finally:
            if gateway.state_of(rid) is not None:
                # Cancelled (client gone, too slow to read, shutdown) or broken: the
                # gateway still counts it in flight, so tell it.
                self._feed(ClientGone(rid, trio.current_time()))
            del self._contexts[rid]

    async def _internal_error(self, ctx: _Context) -> None:
        rid = ctx.request_id
        state = self.gateway.state_of(rid)
        error = InternalServerError(_INTERNAL)
        try:
            if state is not None and state is not ExchangeState.SENDING:
                failed = BackendFailed(rid, error, trio.current_time())
                if state is ExchangeState.QUEUED:
                    self._feed(ClientGone(rid, trio.current_time()))
                else:
                    await self._run(ctx, self._feed(failed))
            elif state is None and not ctx.responder.started:
                await ctx.responder.respond(500, error_headers(error, rid), error_body(error))
        except (ClientDisconnected, Exception):
            log.exception("cannot report an error", extra={"fields": {"request_id": rid}})

    # -- feeding the gateway and routing what it says ----------------------------------

    def _feed(self, event: Event) -> list[Action]:
        """Hand ``event`` to the gateway. Returns the actions for the event's own
        request; the rest are carried out or posted at once."""
        actions = self.gateway.handle(event)
        own_id = getattr(event, "request_id", None)
        own: list[Action] = []
        # New deadlines come with a queued request or a dispatched call only.
        rearm = type(event) is RequestReceived
        for action in actions:
            # The most frequent first; the rare ones cost the others one test.
            if isinstance(action, Log):
                self._log(action)
            elif isinstance(action, CountExchange):
                self.metrics.observe_exchange(action)
            elif isinstance(action, Count):
                self.metrics.observe(action)
            elif isinstance(action, _RARE):
                self._carry_rare(action)
            elif action.request_id == own_id:
                own.append(action)
                rearm = rearm or isinstance(action, Dispatch)
            else:
                rearm = rearm or isinstance(action, Dispatch)
                target = self._contexts.get(action.request_id)
                if target is None:
                    log.error(
                        "action for a request without a task",
                        extra={"fields": {"request_id": action.request_id}},
                    )
                else:
                    target.post(action)
        timer = self._timer
        if timer is not None and rearm:
            soonest = self.gateway.next_deadline()
            # Setting a deadline is not free, even to the same value: only when sooner.
            if soonest < timer.deadline:  # noqa: PLR1730
                timer.deadline = soonest
        return own

    def _carry_rare(self, action: SettleLimits | ShareFailedAuth | CancelBackend) -> None:
        if isinstance(action, SettleLimits):
            self.settle_limits(action)
        elif isinstance(action, ShareFailedAuth):
            if self.shared_limits is not None:
                self.shared_limits.count_failure(action.limit, self._failures_shared)
        else:
            ctx = self._contexts.get(action.request_id)
            if ctx is not None:
                ctx.cancel_backend()

    def _log(self, action: Log) -> None:
        if action.message == "request":
            writer = self._access_writer
            if writer is not None:
                writer.record(action.level, action.fields)
            elif self._access_log and access_log.isEnabledFor(logging.INFO):
                access_log.log(_LEVELS[action.level], "request", extra={"fields": action.fields})
        else:
            log.log(_LEVELS[action.level], action.message, extra={"fields": action.fields})

    async def run_timers(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The gateway's one timer: feed a ``Tick`` whenever its next deadline comes."""
        started = False
        while True:
            with trio.CancelScope(deadline=self.gateway.next_deadline()) as scope:
                self._timer = scope
                if not started:
                    started = True
                    task_status.started()
                await trio.sleep_forever()
            self._timer = None
            now = trio.current_time()
            if now >= self.gateway.next_deadline():
                for rid in list(self._writing):
                    self._feed(OutputTaken(rid, now))
                self._feed(Tick(now))

    def replace_access(
        self,
        access: AccessPolicy,
        verifier: TokenVerifier | None,
        trusted_proxies: tuple[Network, ...],
        tokens: TokenCodec | None = None,
    ) -> None:
        """The config was reloaded: new roles, limits, JWT settings, trusted proxies
        (and the token counter, if it was loaded for them)."""
        self._feed(AccessReplaced(access, verifier, trusted_proxies, trio.current_time(), tokens))

    def replace_keys(self, keys: KeyTable, tokens: TokenCodec | None = None) -> None:
        """The key store changed: the gateway authenticates against ``keys`` now
        (and counts with ``tokens``, if it was loaded for them)."""
        self._feed(KeysReplaced(keys, trio.current_time(), tokens))

    def shutdown(self) -> None:
        """Draining began: queued requests are refused at once, running ones finish."""
        self._feed(ShutdownStarted(trio.current_time()))

    # -- carrying out a request's own actions --------------------------------------------

    async def _run(self, ctx: _Context, actions: Sequence[Action]) -> None:
        responder = ctx.responder
        rid = ctx.request_id
        count = len(actions)
        i = 0
        while i < count:
            action = actions[i]
            i += 1
            try:
                if isinstance(action, SendBytes):
                    if i < count and isinstance(actions[i], EndStream):
                        # A stream's last events and its end in one write: an SDK
                        # closes as soon as it reads ``[DONE]``, and must not find
                        # the end still to come.
                        i += 1
                        await responder.end(action.data)
                        self._feed(ResponseSent(rid, trio.current_time()))
                    else:
                        before = trio.current_time()
                        self._writing.add(rid)
                        try:
                            await responder.send(action.data)
                        finally:
                            self._writing.discard(rid)
                        after = trio.current_time()
                        if after - before > _SLOW_WRITE:
                            # The backend waited for this client: its stall
                            # clock starts again (see OutputTaken).
                            self._feed(OutputTaken(rid, after))
                elif isinstance(action, Respond):
                    await responder.respond(action.status, action.headers, action.body)
                    self._feed(ResponseSent(rid, trio.current_time()))
                elif isinstance(action, StartStream):
                    self._writing.add(rid)
                    try:
                        await responder.start(action.status, action.headers)
                    finally:
                        self._writing.discard(rid)
                elif isinstance(action, EndStream):
                    await responder.end()
                    self._feed(ResponseSent(rid, trio.current_time()))
                elif isinstance(action, Dispatch):
                    await self._dispatch(ctx, action)
                elif isinstance(action, CheckReadiness):
                    failures, redis, jwks = await self._check_ready()
                    now = trio.current_time()
                    # Asked again before the cached answer expires, it is the same.
                    wait = self._ready_until - now
                    event = ReadinessChecked(rid, failures, now, redis, jwks, wait)
                    await self._run(ctx, self._feed(event))
                elif isinstance(action, CheckLimits):
                    await self._check_limits(ctx, action)
                elif isinstance(action, RenderMetrics):
                    rendered = MetricsRendered(rid, self._exposition.render(), trio.current_time())
                    await self._run(ctx, self._feed(rendered))
                elif isinstance(action, AcceptWebSocket):
                    await serve_viewer(responder, action, self.gateway.queue_snapshot, ctx.take)
                    self._feed(ResponseSent(rid, trio.current_time()))
            except ClientDisconnected:
                if self.gateway.state_of(rid) is not None:
                    self._feed(ClientGone(rid, trio.current_time()))
                raise

    async def _check_limits(self, ctx: _Context, action: CheckLimits) -> None:
        """Judge in the shared store, in the request's own task and within the
        store's timeout; None tells the gateway to apply ``on_failure``."""
        shared = self.shared_limits
        decision = None
        if shared is not None:
            decision = await shared.decide(action.charges, action.slots)
        event = LimitsDecided(ctx.request_id, decision, trio.current_time())
        await self._run(ctx, self._feed(event))

    async def _dispatch(self, ctx: _Context, action: Dispatch) -> None:
        """Run the backend call in its own cancel scope (``CancelBackend`` cancels
        it) and report its ending; stream output is reported as it arrives."""
        rid = ctx.request_id
        backend = self._backends[action.backend]
        call = action.call
        event: Event
        with trio.CancelScope() as scope:
            ctx.backend_scope = scope
            try:
                if isinstance(call, EmbeddingRequest):
                    result = await backend.embed(call)
                    event = EmbeddingsComputed(rid, result, trio.current_time())
                else:
                    if isinstance(call, ChatCompletionRequest):
                        generation = backend.chat(call)
                    else:
                        generation = backend.complete(call)
                    if call.stream:
                        failure, stopped = await self._pump(ctx, generation)
                        if stopped:
                            # The gateway stopped it: its answer is in the mailbox.
                            ctx.backend_scope = None
                            return
                        now = trio.current_time()
                    else:
                        now = await self._collect(ctx, generation)
                        failure = None
                    event = (
                        BackendFinished(rid, now)
                        if failure is None
                        else BackendFailed(rid, failure, now)
                    )
            except OpenAIError as error:
                event = BackendFailed(rid, error, trio.current_time())
            except ClientDisconnected:
                raise
            except Exception:
                log.exception("backend failed", extra={"fields": {"request_id": rid}})
                event = BackendFailed(rid, InternalServerError(_INTERNAL), trio.current_time())
        ctx.backend_scope = None
        if scope.cancelled_caught:
            return  # the gateway stopped it; what it has to say is in the mailbox
        await self._run(ctx, self._feed(event))

    async def _collect(self, ctx: _Context, generation: Generation) -> float:
        """Feed a non-streamed generation to the gateway in batches, yielding to
        other tasks between them (a huge answer must not stall the event loop).
        Returns the time it ended (no checkpoint since: one clock read fewer)."""
        rid = ctx.request_id
        batch: list[Delta | Usage] = []
        try:
            async for piece in generation:
                batch.append(piece)
                if len(batch) >= _BATCH:
                    self._output(ctx, BackendChunk(rid, tuple(batch), trio.current_time()))
                    batch = []
                    await trio.lowlevel.checkpoint()
        finally:
            await generation.aclose()
        now = trio.current_time()
        if batch:
            self._output(ctx, BackendChunk(rid, tuple(batch), now))
        return now

    def _output(self, ctx: _Context, event: BackendChunk) -> list[Action]:
        """Feed the backend's output; returns the actions to carry out here. If the
        gateway stopped the call for it (output it refuses: the tool-call
        normalizer's, strict mode's...), its answer goes to the mailbox instead:
        the backend's scope, the one running now, is cancelled, and whatever ran in
        it would be cut short; the request's task carries the mailbox out once the
        call has unwound."""
        actions = self._feed(event)
        scope = ctx.backend_scope
        if actions and scope is not None and scope.cancel_called:
            for action in actions:
                ctx.post(action)
            return []
        return actions

    async def _pump(self, ctx: _Context, generation: Generation) -> tuple[OpenAIError | None, bool]:
        """Stream a generation to the client through a bounded channel, sending
        whatever has piled up in one write. Returns the backend's error, if any, and
        whether the gateway stopped the call (``CancelBackend``).

        ``CancelBackend`` cancels the producer alone: the writes to the client run
        outside its scope, so a stop (a timeout, output the gateway refuses) never
        cuts a write short in the middle of a chunk; the write in progress ends, and
        the gateway's answer (an error event) follows it from the mailbox."""
        rid = ctx.request_id
        send, receive = trio.open_memory_channel[Delta | Usage](self._stream_buffer)
        failure: OpenAIError | None = None
        producer = ctx.backend_scope = trio.CancelScope()

        async def produce() -> None:
            nonlocal failure
            with producer:
                async with send, aclosing(generation):
                    try:
                        async for piece in generation:
                            # No checkpoint while there is room: what the backend
                            # has ready piles up and goes out in one write.
                            try:
                                send.send_nowait(piece)
                            except trio.WouldBlock:
                                await send.send(piece)
                    except trio.BrokenResourceError:
                        pass  # the consumer stopped first; it reports why
                    except OpenAIError as error:
                        failure = error
                    except Exception:
                        log.exception("backend failed", extra={"fields": {"request_id": rid}})
                        failure = InternalServerError(_INTERNAL)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            async with receive:
                async for piece in receive:
                    batch = [piece]
                    while True:
                        try:
                            batch.append(receive.receive_nowait())
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                    if producer.cancel_called:
                        continue  # stopped: what is left is the gateway's to drop
                    event = BackendChunk(rid, tuple(batch), trio.current_time())
                    await self._run(ctx, self._output(ctx, event))
        return failure, producer.cancel_called

    # -- readiness -------------------------------------------------------------------

    async def _check_ready(self) -> _Checks:
        """Check every backend, Redis and the JWKS at most once per ``ready_cache``
        seconds, however often ``/readyz`` is asked (anyone may ask it: no
        amplification)."""
        async with self._ready_lock:
            if trio.current_time() >= self._ready_until:
                self._ready_checks = await self._check_components()
                self._ready_until = trio.current_time() + self._ready_cache
            return self._ready_checks

    async def _check_components(self) -> _Checks:
        """The backends' failures (name, problem), whether Redis is unreachable, and
        whether the JWT verifier still lacks a key set."""
        failures: list[tuple[str, str]] = []
        redis = False

        async def check(name: str, backend: Backend) -> None:
            try:
                with trio.fail_after(self._ready_timeout):
                    await backend.check_ready()
            except OpenAIError as error:
                failures.append((name, error.message))
            except trio.TooSlowError:
                failures.append((name, "readiness check timed out"))
            except Exception as exc:
                failures.append((name, type(exc).__name__))

        async def check_redis(shared: SharedLimits) -> None:
            nonlocal redis
            redis = bool(await shared.failures())

        async with trio.open_nursery() as nursery:
            for name, backend in self._backends.items():
                nursery.start_soon(check, name, backend)
            if self.shared_limits is not None:
                nursery.start_soon(check_redis, self.shared_limits)
        # A JWKS URL not fetched yet (start-up retries it): every JWT would get 401.
        jwks = self.verifier is not None and not self.verifier.ready
        return tuple(sorted(failures)), redis, jwks
