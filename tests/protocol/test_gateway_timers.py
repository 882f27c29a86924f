"""The gateway's slots, queue and timers: one event acting for another request, Ticks
that time out queued and running requests, shutdown, and the HTTP layer's refusals."""

from __future__ import annotations

import math
from typing import Any

import orjson
import pytest

from ostiary.protocol.actions import (
    CancelBackend,
    Count,
    Dispatch,
    EndStream,
    Log,
    Respond,
    SendBytes,
)
from ostiary.protocol.events import (
    BackendFinished,
    ClientGone,
    OutputTaken,
    Refusal,
    RequestRefused,
    ResponseSent,
    ShutdownStarted,
    Tick,
)
from ostiary.protocol.exchange import BackendPolicy, ExchangeState
from ostiary.protocol.gateway import Gateway, ModelRoute
from ostiary.protocol.generation import Delta
from tests.conftest import chat_body, key_table
from tests.protocol.test_gateway import chunk, json_of, only, request


def gateway(**policy: Any) -> Gateway:
    return Gateway(
        routes=[ModelRoute("m", "b1")],
        keys=key_table(),
        backends=[BackendPolicy(name="b1", **policy)],
    )


def test_a_finished_request_dispatches_the_next_queued_one() -> None:
    gw = gateway(max_concurrency=1, max_queue=2)
    assert isinstance(gw.handle(request(gw, "a", chat_body(), now=1.0))[0], Dispatch)
    assert gw.handle(request(gw, "b", chat_body(), now=2.0)) == []
    assert gw.state_of("b") is ExchangeState.QUEUED
    assert gw.scheduler("b1").queued == 1
    # An event of request a produces the Dispatch of request b, in the same call.
    actions = gw.handle(BackendFinished("a", 5.0))
    dispatch = only(actions, Dispatch)
    assert dispatch.request_id == "b"
    assert only(actions, Respond).request_id == "a"
    wait = [a for a in actions if isinstance(a, Count) and a.name == "ostiary_queue_wait_seconds"]
    assert wait == [Count("ostiary_queue_wait_seconds", (("backend", "b1"),), 3.0)]
    assert gw.state_of("b") is ExchangeState.RUNNING
    assert gw.scheduler("b1").running == 1
    assert gw.scheduler("b1").queued == 0


def test_a_client_leaving_frees_its_slot_for_the_next() -> None:
    gw = gateway(max_concurrency=1, max_queue=2)
    gw.handle(request(gw, "a", chat_body(stream=True), now=1.0))
    gw.handle(request(gw, "b", chat_body(), now=1.0))
    actions = gw.handle(ClientGone("a", 2.0))
    assert CancelBackend("a") in actions
    assert only(actions, Dispatch).request_id == "b"


def test_a_queued_client_leaving_takes_no_slot() -> None:
    gw = gateway(max_concurrency=1, max_queue=2)
    gw.handle(request(gw, "a", chat_body(), now=1.0))
    gw.handle(request(gw, "b", chat_body(), now=1.0))
    actions = gw.handle(ClientGone("b", 2.0))
    assert only(actions, Log).fields["status"] == 499
    assert not any(isinstance(a, CancelBackend | Dispatch) for a in actions)
    assert gw.scheduler("b1").queued == 0
    assert not any(isinstance(a, Dispatch) for a in gw.handle(BackendFinished("a", 3.0)))


def test_a_full_queue_refuses_at_once() -> None:
    gw = gateway(max_concurrency=1, max_queue=1)
    gw.handle(request(gw, "a", chat_body()))
    gw.handle(request(gw, "b", chat_body()))
    status, body, headers = json_of(gw.handle(request(gw, "c", chat_body())))
    assert (status, body["error"]["code"]) == (503, "queue_full")
    # From the queue's state: one running, one queued, at the prior rate of 1/s.
    assert headers[b"retry-after"] == b"2"
    assert gw.state_of("c") is ExchangeState.SENDING


def test_tick_before_and_at_a_queued_requests_deadline() -> None:
    gw = gateway(max_concurrency=1, max_queue=4, max_queue_wait=30.0)
    gw.handle(request(gw, "a", chat_body(), now=0.0))
    gw.handle(chunk("a", (Delta("x"),), now=0.5))
    gw.handle(request(gw, "b", chat_body(), now=10.0))
    assert gw.next_deadline() == 40.0
    assert gw.handle(Tick(39.999)) == []
    assert gw.state_of("b") is ExchangeState.QUEUED
    actions = gw.handle(Tick(40.0))
    status, body, headers = json_of(actions)
    assert (status, body["error"]["code"]) == (503, "queue_timeout")
    # Nothing was served in 40 s: the wait quoted from the queue's state is long.
    assert int(headers[b"retry-after"]) > 10
    assert gw.scheduler("b1").queued == 0
    assert only(gw.handle(ResponseSent("b", 40.1)), Log).fields["status"] == 503
    assert gw.state_of("a") is ExchangeState.RUNNING


def test_first_output_timeout_cancels_the_call_and_frees_the_slot() -> None:
    gw = gateway(max_concurrency=1, first_output_timeout=5.0)
    gw.handle(request(gw, "a", chat_body(), now=0.0))
    gw.handle(request(gw, "b", chat_body(), now=1.0))
    assert gw.next_deadline() == 5.0
    assert gw.handle(Tick(4.0)) == []
    actions = gw.handle(Tick(5.0))
    assert actions[0] == CancelBackend("a")
    assert only(actions, Dispatch).request_id == "b"
    status, body, _ = json_of(actions)
    assert (status, body["error"]["code"]) == (504, "backend_timeout")
    assert "within 5 seconds" in body["error"]["message"]
    # Output the cancelled call had already produced is ignored.
    assert gw.handle(chunk("a", (Delta("late"),), now=5.1)) == []
    assert gw.handle(BackendFinished("a", 5.2)) == []
    assert only(gw.handle(ResponseSent("a", 5.3)), Log).fields["error_code"] == "backend_timeout"


def test_a_stalled_stream_ends_with_an_error_event() -> None:
    gw = gateway(stall_timeout=2.0, first_output_timeout=100.0)
    gw.handle(request(gw, "a", chat_body(stream=True), now=0.0))
    # A lower bound: no deadline of the call can come sooner than its stall timeout.
    assert gw.next_deadline() == 2.0
    gw.handle(chunk("a", (Delta("x"),), now=1.0))
    assert gw.handle(Tick(2.0)) == []
    assert gw.next_deadline() == 3.0  # the stall deadline after the first output
    gw.handle(chunk("a", (Delta("y"),), now=2.5))
    assert gw.handle(Tick(3.0)) == []  # output came: the deadline moved on
    assert gw.next_deadline() == 4.5
    assert gw.state_of("a") is ExchangeState.STREAMING
    actions = gw.handle(Tick(4.5))
    assert actions[0] == CancelBackend("a")
    data = only(actions, SendBytes).data
    assert orjson.loads(data[len(b"data: ") :])["error"]["code"] == "backend_stalled"
    assert isinstance(actions[-1], EndStream)


def test_a_slow_reader_s_waits_do_not_count_as_the_model_stalling() -> None:
    """While a write waits for a slow client, the backend is paused behind it: the
    stall clock starts again when the client has taken the output (OutputTaken),
    and only the model's own silence after that counts."""
    gw = gateway(stall_timeout=2.0, first_output_timeout=100.0, total_timeout=100.0)
    gw.handle(request(gw, "a", chat_body(stream=True), now=0.0))
    gw.handle(chunk("a", (Delta("x"),), now=1.0))
    assert gw.handle(OutputTaken("a", 2.5)) == []  # the write took 1.5 s
    assert gw.handle(Tick(3.0)) == []  # would have been the stall deadline
    assert gw.next_deadline() == 4.5
    assert gw.handle(OutputTaken("a", 2.0)) == []  # an older write: nothing moves back
    assert gw.next_deadline() == 4.5
    actions = gw.handle(Tick(4.5))
    data = only(actions, SendBytes).data
    assert orjson.loads(data[len(b"data: ") :])["error"]["code"] == "backend_stalled"
    # Once the exchange has moved on (or ended), a late OutputTaken changes nothing.
    assert gw.handle(OutputTaken("a", 5.0)) == []
    assert gw.handle(OutputTaken("gone", 5.0)) == []


def test_no_output_at_all_times_out_after_the_first_output_timeout() -> None:
    gw = gateway(stall_timeout=2.0, first_output_timeout=10.0)
    gw.handle(request(gw, "a", chat_body(stream=True), now=0.0))
    for t in (2.0, 4.0, 6.0, 8.0, 9.99):
        assert gw.handle(Tick(t)) == []
    status, body, _ = json_of(gw.handle(Tick(10.0)))
    assert (status, body["error"]["code"]) == (504, "backend_timeout")


def test_total_timeout_bounds_even_a_steady_stream() -> None:
    gw = gateway(stall_timeout=2.0, total_timeout=5.0)
    gw.handle(request(gw, "a", chat_body(stream=True), now=0.0))
    for t in (1.0, 2.0, 3.0, 4.0):
        gw.handle(chunk("a", (Delta("x"),), now=t))
    assert gw.handle(Tick(4.9)) == []
    actions = gw.handle(Tick(5.0))
    data = only(actions, SendBytes).data
    assert b"did not finish within 5 seconds" in data


def test_finished_calls_leave_no_timers_behind() -> None:
    gw = gateway(max_concurrency=1000)
    for i in range(1000):
        gw.handle(request(gw, f"r{i}", chat_body(), now=float(i)))
        gw.handle(BackendFinished(f"r{i}", float(i)))
        gw.handle(ResponseSent(f"r{i}", float(i)))
    assert gw.in_flight == 0
    assert len(gw._backends.timers) <= 65  # compacted, not one per request ever served
    assert gw.handle(Tick(1e9)) == []
    assert gw.next_deadline() == math.inf


def test_shutdown_refuses_the_queued_and_lets_the_running_finish() -> None:
    gw = gateway(max_concurrency=1)
    gw.handle(request(gw, "a", chat_body()))
    gw.handle(request(gw, "b", chat_body()))
    actions = gw.handle(ShutdownStarted(11.0))
    status, body, _ = json_of(actions)
    assert (status, body["error"]["code"]) == (503, "shutting_down")
    assert only(actions, Respond).request_id == "b"
    assert gw.state_of("a") is ExchangeState.RUNNING
    status, body, _ = json_of(gw.handle(request(gw, "c", chat_body())))
    assert (status, body["error"]["code"]) == (503, "shutting_down")


@pytest.mark.parametrize(
    ("refusal", "status", "code"),
    [
        (Refusal.MALFORMED, 400, "invalid_request"),
        (Refusal.SMUGGLING, 400, "invalid_request"),
        (Refusal.ENDED_EARLY, 400, "invalid_request"),
        (Refusal.HEAD_TIMEOUT, 408, "request_timeout"),
        (Refusal.BODY_TIMEOUT, 408, "request_timeout"),
        (Refusal.HEAD_TOO_LARGE, 431, "headers_too_large"),
        (Refusal.BODY_TOO_LARGE, 413, "request_too_large"),
        (Refusal.TOO_MANY_CHUNKS, 413, "too_many_body_chunks"),
        (Refusal.CONNECTION_LIMIT, 503, "connection_limit"),
        (Refusal.OLD_CHUNKED, 400, "invalid_request"),
        (Refusal.UNSUPPORTED_CODING, 501, "unsupported_transfer_coding"),
    ],
)
def test_http_refusals_are_answered_and_logged_by_the_core(
    refusal: Refusal, status: int, code: str
) -> None:
    gw = gateway()
    event = RequestRefused("h1", refusal, 1.0, 1700000000.0, "POST", "/v1/chat/completions", 99)
    got, body, headers = json_of(gw.handle(event))
    assert (got, body["error"]["code"]) == (status, code)
    assert headers[b"x-request-id"] == b"h1"
    assert (b"retry-after" in headers) == (status == 503)
    log = only(gw.handle(ResponseSent("h1", 1.5)), Log)
    assert log.fields["status"] == status
    assert log.fields["path"] == "/v1/chat/completions"
    assert log.fields["error_code"] == code
    if refusal is Refusal.BODY_TOO_LARGE:
        assert "99 bytes" in body["error"]["message"]
    if refusal is Refusal.TOO_MANY_CHUNKS:
        assert "more than 99 chunks" in body["error"]["message"]
