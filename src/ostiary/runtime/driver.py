"""The driver: feeds the gateway events and carries out the actions it returns.

It is the only place where the core meets I/O. Per request it builds a
:class:`RequestReceived` from the HTTP request, then executes actions in order:
responses go to the :class:`Responder`, ``Dispatch`` runs the backend call (streamed
generations through a bounded channel, so a slow client slows only its own stream),
``Log`` goes to :mod:`logging`. However a request ends (answered, failed, client gone,
server shut down), the gateway hears of it exactly once.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from collections.abc import Mapping, Sequence
from contextlib import aclosing

import trio

from ostiary.backends import Backend, Generation
from ostiary.protocol.actions import (
    Action,
    CheckReadiness,
    Dispatch,
    EndStream,
    Log,
    Respond,
    SendBytes,
    StartStream,
)
from ostiary.protocol.errors import InternalServerError, OpenAIError, ServiceUnavailableError
from ostiary.protocol.events import (
    BackendChunk,
    BackendFailed,
    BackendFinished,
    ClientGone,
    EmbeddingsComputed,
    ReadinessChecked,
    RequestReceived,
)
from ostiary.protocol.gateway import Gateway
from ostiary.protocol.generation import Delta, Usage
from ostiary.protocol.requests import ChatCompletionRequest, EmbeddingRequest
from ostiary.protocol.responses import error_body
from ostiary.protocol.sse import sse_error

from .http import ClientDisconnected, HttpRequest, Responder

__all__ = ["BackendSlots", "Driver"]

access_log = logging.getLogger("ostiary.access")
log = logging.getLogger("ostiary.driver")

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
_INTERNAL = "The server had an error while processing your request."
#: Pieces of a non-streamed generation handed to the gateway at once.
_BATCH = 256


class BackendSlots:
    """At most ``max_concurrency`` calls run on a backend; at most ``max_queue`` wait
    for a slot, and a call beyond that is refused at once with 503. Use as
    ``async with slots:`` (a plain class, not a generator: this is the hot path)."""

    def __init__(self, max_concurrency: int, max_queue: int) -> None:
        self._limiter = trio.CapacityLimiter(max_concurrency)
        self._max_queue = max_queue
        self.waiting = 0

    @property
    def running(self) -> int:
        return self._limiter.borrowed_tokens

    async def __aenter__(self) -> None:
        try:
            self._limiter.acquire_nowait()
        except trio.WouldBlock:
            if self.waiting >= self._max_queue:
                raise ServiceUnavailableError(
                    "The model is busy; retry shortly.", code="backend_busy", retry_after=1.0
                ) from None
            self.waiting += 1
            try:
                await self._limiter.acquire()
            finally:
                self.waiting -= 1

    async def __aexit__(self, *exc_info: object) -> None:
        self._limiter.release()


class Driver:
    """The HTTP handler that runs requests through ``gateway`` and ``backends``."""

    def __init__(
        self,
        gateway: Gateway,
        backends: Mapping[str, Backend],
        slots: Mapping[str, BackendSlots],
        *,
        access_log: bool = True,
        stream_buffer: int = 64,
        ready_timeout: float = 5.0,
        ready_cache: float = 1.0,
    ) -> None:
        self.gateway = gateway
        self._backends = backends
        self._slots = slots
        self._access_log = access_log
        self._stream_buffer = stream_buffer
        self._ready_timeout = ready_timeout
        self._ready_cache = ready_cache
        self._ready_lock = trio.Lock()
        self._ready_until = -float("inf")
        self._ready_failures: tuple[tuple[str, str], ...] = ()
        self._prefix = secrets.token_hex(4)
        self._counter = itertools.count(1)

    def next_request_id(self) -> str:
        """A new request id: unique within the process, unpredictable across runs."""
        return f"{self._prefix}{next(self._counter):08x}"

    async def __call__(self, request: HttpRequest, responder: Responder) -> None:
        request_id = self.next_request_id()
        event = RequestReceived(
            request_id=request_id,
            method=request.method,
            target=request.target,
            headers=request.headers,
            body=request.body,
            now=trio.current_time(),
            created=int(time.time()),
            client=request.client,
        )
        try:
            await self._execute(self.gateway.handle(event), responder)
        except ClientDisconnected:
            raise
        except Exception:
            # A bug of ours: log it, show the client nothing of it.
            log.exception("unhandled error", extra={"fields": {"request_id": request_id}})
            await self._internal_error(request_id, responder)
        finally:
            if self.gateway.state_of(request_id) is not None:
                # Cancelled (client gone, shutdown) or broken: the gateway still
                # counts it in flight, so tell it. Only sync actions follow.
                self._execute_now(self.gateway.handle(ClientGone(request_id, trio.current_time())))

    async def _internal_error(self, request_id: str, responder: Responder) -> None:
        error = InternalServerError(_INTERNAL)
        if self.gateway.state_of(request_id) is not None:
            actions = self.gateway.handle(BackendFailed(request_id, error, trio.current_time()))
            await self._execute(actions, responder)
        elif not responder.started:
            headers = (
                (b"content-type", b"application/json"),
                (b"x-request-id", request_id.encode()),
            )
            await responder.respond(500, headers, error_body(error))
        elif not responder.finished:
            await responder.send(sse_error(error))
            await responder.end()

    def _execute_now(self, actions: Sequence[Action]) -> None:
        for action in actions:
            if isinstance(action, Log):
                self._log(action)

    def _log(self, action: Log) -> None:
        if action.message == "request":
            if self._access_log and access_log.isEnabledFor(logging.INFO):
                access_log.log(_LEVELS[action.level], "request", extra={"fields": action.fields})
        else:
            log.log(_LEVELS[action.level], action.message, extra={"fields": action.fields})

    async def _execute(self, actions: Sequence[Action], responder: Responder) -> None:
        for i, action in enumerate(actions):
            try:
                await self._execute_one(action, responder)
            except ClientDisconnected:
                # The exchange's last write failed: its record still gets logged, as
                # the client leaving (the gateway has already forgotten it).
                for later in actions[i + 1 :]:
                    if isinstance(later, Log):
                        fields = later.fields
                        if later.message == "request":
                            fields = {**fields, "status": 499}
                        self._log(Log(later.level, later.message, fields))
                raise

    async def _execute_one(self, action: Action, responder: Responder) -> None:
        if isinstance(action, SendBytes):
            await responder.send(action.data)
        elif isinstance(action, Respond):
            await responder.respond(action.status, action.headers, action.body)
        elif isinstance(action, StartStream):
            await responder.start(action.status, action.headers)
        elif isinstance(action, EndStream):
            await responder.end()
        elif isinstance(action, Log):
            self._log(action)
        elif isinstance(action, Dispatch):
            await self._execute(await self._dispatch(action, responder), responder)
        elif isinstance(action, CheckReadiness):
            await self._execute(await self._check_ready(action.request_id), responder)
        # CancelBackend needs nothing here: the backend call runs inside this
        # request's task, and is already being cancelled when it is emitted.

    async def _dispatch(self, action: Dispatch, responder: Responder) -> Sequence[Action]:
        """Run the call; return the actions for its ending (stream output is
        executed as it arrives)."""
        rid = action.request_id
        backend = self._backends[action.backend]
        call = action.call
        try:
            async with self._slots[action.backend]:
                if isinstance(call, EmbeddingRequest):
                    result = await backend.embed(call)
                    return self.gateway.handle(EmbeddingsComputed(rid, result, trio.current_time()))
                if isinstance(call, ChatCompletionRequest):
                    generation = backend.chat(call)
                else:
                    generation = backend.complete(call)
                if call.stream:
                    failure = await self._pump(rid, generation, responder)
                    if failure is not None:
                        raise failure
                else:
                    await self._collect(rid, generation)
        except OpenAIError as error:
            return self.gateway.handle(BackendFailed(rid, error, trio.current_time()))
        except ClientDisconnected:
            raise
        except Exception:
            log.exception("backend failed", extra={"fields": {"request_id": rid}})
            internal = InternalServerError(_INTERNAL)
            return self.gateway.handle(BackendFailed(rid, internal, trio.current_time()))
        return self.gateway.handle(BackendFinished(rid, trio.current_time()))

    async def _collect(self, rid: str, generation: Generation) -> None:
        """Feed a non-streamed generation to the gateway in batches, yielding to
        other tasks between them (a huge answer must not stall the event loop)."""
        batch: list[Delta | Usage] = []
        try:
            async for piece in generation:
                batch.append(piece)
                if len(batch) >= _BATCH:
                    self.gateway.handle(BackendChunk(rid, tuple(batch)))
                    batch = []
                    await trio.lowlevel.checkpoint()
        finally:
            await generation.aclose()
        self.gateway.handle(BackendChunk(rid, tuple(batch)))

    async def _pump(
        self, rid: str, generation: Generation, responder: Responder
    ) -> OpenAIError | None:
        """Stream a generation to the client through a bounded channel, sending
        whatever has piled up in one write. Returns the backend's error, if any;
        raises ClientDisconnected if the client went away."""
        send, receive = trio.open_memory_channel[Delta | Usage](self._stream_buffer)
        failure: OpenAIError | None = None
        disconnected = False

        async def produce() -> None:
            nonlocal failure
            async with send, aclosing(generation):
                try:
                    async for piece in generation:
                        # No checkpoint while there is room: what the backend has
                        # ready piles up and goes out in one write.
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
                try:
                    async for piece in receive:
                        batch = [piece]
                        while True:
                            try:
                                batch.append(receive.receive_nowait())
                            except (trio.WouldBlock, trio.EndOfChannel):
                                break
                        actions = self.gateway.handle(BackendChunk(rid, tuple(batch)))
                        await self._execute(actions, responder)
                except ClientDisconnected:
                    disconnected = True
                    nursery.cancel_scope.cancel()
        if disconnected:
            raise ClientDisconnected()
        return failure

    async def _check_ready(self, request_id: str) -> Sequence[Action]:
        """Check every backend at most once per ``ready_cache`` seconds, however
        often ``/readyz`` is asked (anyone may ask it: no amplification)."""
        async with self._ready_lock:
            if trio.current_time() >= self._ready_until:
                self._ready_failures = await self._check_backends()
                self._ready_until = trio.current_time() + self._ready_cache
            failures = self._ready_failures
        return self.gateway.handle(ReadinessChecked(request_id, failures, trio.current_time()))

    async def _check_backends(self) -> tuple[tuple[str, str], ...]:
        failures: list[tuple[str, str]] = []

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

        async with trio.open_nursery() as nursery:
            for name, backend in self._backends.items():
                nursery.start_soon(check, name, backend)
        return tuple(sorted(failures))
