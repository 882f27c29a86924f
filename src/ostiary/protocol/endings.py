"""How an exchange ends: the backend's output turned into the response (or the
stream), a call stopped with an error or timed out, the queue drained at shutdown,
and the one end of every exchange, with its access-log record, its counts and its
settlement.

These are :class:`~.gateway.Gateway`'s own transitions (its lifecycle table names
them), kept in a module of their own for size: plain functions of the gateway, so a
request's path through them costs what the methods did.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .actions import (
    Action,
    CancelBackend,
    Count,
    CountExchange,
    EndStream,
    Log,
    SendBytes,
    StartStream,
)
from .admission import ENDPOINT_LABELS
from .errors import OpenAIError, ServiceUnavailableError
from .events import (
    BackendChunk,
    BackendFailed,
    BackendFinished,
    ClientGone,
    EmbeddingsComputed,
    ResponseSent,
    ShutdownStarted,
    Tick,
)
from .exchange import Exchange, ExchangeState
from .generation import Delta, Usage
from .requests import EmbeddingRequest
from .responses import encode_embeddings
from .sse import sse_error

if TYPE_CHECKING:
    from .gateway import Gateway

__all__ = [
    "CLIENT_GONE",
    "end",
    "no_output",
    "on_chunk",
    "on_client_gone",
    "on_embeddings",
    "on_failed",
    "on_finished",
    "on_sent",
    "on_shutdown",
    "on_tick",
    "on_viewer_left",
    "shutting_down",
    "stop",
]

#: 499: nginx's "client closed request"; only ever seen in our logs.
CLIENT_GONE = 499


def on_chunk(gateway: Gateway, exchange: Exchange, event: BackendChunk) -> list[Action]:
    actions: list[Action] = []
    if exchange.last_output == -math.inf:
        exchange.last_output = event.now
        call = exchange.call
        assert call is not None
        labels = (("model", call.model),)
        wait = event.now - exchange.dispatched
        actions.append(Count("ostiary_time_to_first_token_seconds", labels, wait))
    else:
        exchange.last_output = event.now
    deltas: list[Delta] = []
    for piece in event.pieces:
        if isinstance(piece, Usage):
            exchange.usage = piece
        else:
            deltas.append(piece)
    exchange.produced += len(deltas)
    output = exchange.output
    assert output is not None
    try:
        data = output.feed(deltas)
    except OpenAIError as error:
        return [*actions, *stop(gateway, exchange, error, event.now)]
    if not data:
        return actions
    if exchange.state is ExchangeState.RUNNING:
        exchange.state = ExchangeState.STREAMING
        actions.append(StartStream(exchange.request_id, 200, exchange.stream_headers()))
    actions.append(SendBytes(exchange.request_id, data))
    return actions


def on_finished(gateway: Gateway, exchange: Exchange, event: BackendFinished) -> list[Action]:
    call = exchange.call
    if isinstance(call, EmbeddingRequest):
        return stop(gateway, exchange, no_output(), event.now, cancel=False)
    output = exchange.output
    assert output is not None
    usage = exchange.usage if exchange.usage is not None else Usage(prompt_tokens=0)
    exchange.usage = usage
    try:
        data = output.finish(usage)
    except OpenAIError as error:
        return stop(gateway, exchange, error, event.now, cancel=False)
    actions = gateway._backends.release(exchange, event.now)
    if not output.streaming:
        actions.append(exchange.respond(200, data))
        return actions
    if exchange.state is ExchangeState.RUNNING:
        actions.append(StartStream(exchange.request_id, 200, exchange.stream_headers()))
    actions.append(SendBytes(exchange.request_id, data))
    actions.append(EndStream(exchange.request_id))
    exchange.state = ExchangeState.SENDING
    exchange.status = 200
    return actions


def on_embeddings(gateway: Gateway, exchange: Exchange, event: EmbeddingsComputed) -> list[Action]:
    call = exchange.call
    if not isinstance(call, EmbeddingRequest):
        return stop(gateway, exchange, no_output(), event.now, cancel=False)
    exchange.usage = event.result.usage
    actions = gateway._backends.release(exchange, event.now)
    body = encode_embeddings(event.result, model=call.model, encoding_format=call.encoding_format)
    actions.append(exchange.respond(200, body))
    return actions


def on_failed(gateway: Gateway, exchange: Exchange, event: BackendFailed) -> list[Action]:
    return stop(gateway, exchange, event.error, event.now, cancel=False)


def stop(
    gateway: Gateway, exchange: Exchange, error: OpenAIError, now: float, *, cancel: bool = True
) -> list[Action]:
    """End a running (or checking) exchange with ``error``: cancel its backend
    call if it may still run, free its slot, tell the client."""
    actions: list[Action] = []
    if cancel:
        exchange.cancelled = True
        actions.append(CancelBackend(exchange.request_id))
    if exchange.running:
        actions.extend(gateway._backends.release(exchange, now))
    if exchange.state is ExchangeState.STREAMING:
        exchange.state = ExchangeState.SENDING
        exchange.status = error.status
        exchange.error = error
        actions.append(SendBytes(exchange.request_id, sse_error(error)))
        actions.append(EndStream(exchange.request_id))
        return actions
    actions.append(exchange.fail(error))
    return actions


def on_client_gone(gateway: Gateway, exchange: Exchange, event: ClientGone) -> list[Action]:
    actions: list[Action] = []
    state = exchange.state
    if state is ExchangeState.QUEUED:
        gateway._backends.cancel(exchange)
    elif exchange.running:
        actions.append(CancelBackend(exchange.request_id))
        actions.extend(gateway._backends.release(exchange, event.now))
    exchange.status = CLIENT_GONE
    actions.extend(end(gateway, exchange, event.now))
    return actions


def on_viewer_left(
    gateway: Gateway, exchange: Exchange, event: ResponseSent | ClientGone
) -> list[Action]:
    gateway._viewers.leave(exchange.request_id)
    if isinstance(event, ClientGone):
        exchange.status = CLIENT_GONE
    return end(gateway, exchange, event.now)


def on_sent(gateway: Gateway, exchange: Exchange, event: ResponseSent) -> list[Action]:
    return end(gateway, exchange, event.now)


def end(gateway: Gateway, exchange: Exchange, now: float) -> list[Action]:
    """The exchange is over: its one access-log record, its counts; forget it."""
    del gateway._exchanges[exchange.request_id]
    status = exchange.status
    call = exchange.call
    model = call.model if call is not None else ""
    endpoint = ENDPOINT_LABELS[exchange.endpoint] if exchange.endpoint is not None else "none"
    principal = exchange.principal
    gateway._recent.append(
        (
            exchange.request_id,
            exchange.created,
            endpoint,
            model,
            status,
            exchange.duration_ms(now),
            principal.id if principal is not None else "",
        )
    )
    counted = CountExchange(endpoint, model, status, now - exchange.started)
    usage = exchange.usage
    if usage is not None and model:
        counted.prompt_tokens = usage.prompt_tokens
        counted.completion_tokens = usage.completion_tokens
    error = exchange.error
    if status == 401 and error is not None:
        counted.auth_failure = error.code or "unknown"
    actions: list[Action] = [counted]
    if status == 429 and principal is None:
        # Refused before its credentials were read: the failed-authentication
        # budget of its address (every other 429 is counted when it is judged).
        actions.append(Count("ostiary_rate_limited_total", (("scope", "failed_auth"),)))
    if gateway.access_records:
        level = "error" if status >= 500 and status != CLIENT_GONE else "info"
        actions.insert(0, Log(level, "request", exchange.access_fields(now)))
    reservation = exchange.reservation
    if reservation is not None:
        settle = gateway._guard.settle(reservation, exchange.usage, exchange.produced, now)
        if settle is not None:
            actions.append(settle)
    return actions


def on_tick(gateway: Gateway, event: Tick) -> list[Action]:
    now = event.now
    actions: list[Action] = []
    for exchange, wait in gateway._backends.expired(now):
        error = ServiceUnavailableError(
            "The request waited too long for the model; retry shortly.",
            code="queue_timeout",
            retry_after=wait,
        )
        actions.append(exchange.fail(error))
    for timed in gateway._backends.timed_out(now):
        actions.extend(stop(gateway, timed, timed.timeout_error(now), now))
    return actions


def on_shutdown(gateway: Gateway, event: ShutdownStarted) -> list[Action]:
    gateway._shutting_down = True
    actions: list[Action] = [
        exchange.fail(shutting_down()) for exchange in gateway._backends.drain()
    ]
    actions.extend(gateway._viewers.close_all())
    return actions


def shutting_down() -> ServiceUnavailableError:
    return ServiceUnavailableError(
        "The server is shutting down; retry on another instance.", code="shutting_down"
    )


def no_output() -> OpenAIError:
    return ServiceUnavailableError("The backend ended without a result.", code="backend_error")
