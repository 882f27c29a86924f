"""The gateway's queues made fair and visible: the scheduler each backend gets, the
cost it charges, ``GET /v1/queue``, ``GET /metrics`` (access and hand-off) and the
counts an exchange leaves behind."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from ostiary.protocol.actions import Count, CountExchange, Dispatch, Log, RenderMetrics, Respond
from ostiary.protocol.events import (
    BackendFinished,
    MetricsRendered,
    RequestReceived,
    ResponseSent,
)
from ostiary.protocol.exchange import BackendPolicy, ExchangeState
from ostiary.protocol.fair_queue import FairQueue
from ostiary.protocol.gateway import Gateway, ModelRoute
from ostiary.protocol.generation import Delta, Usage
from ostiary.protocol.requests import ChatCompletionRequest, ChatMessage, EmbeddingRequest
from ostiary.protocol.scheduler import FifoScheduler
from ostiary.protocol.visibility import (
    MAX_COST,
    WaitWindow,
    estimate_cost,
    parse_networks,
    peer_allowed,
)
from tests.conftest import USER_SECRET, auth_headers, chat_body, key_table
from tests.protocol.test_gateway import chunk, json_of, only, request, sent

ADMIN_ID, USER_ID = "key:" + "a" * 12, "key:" + "b" * 12  # principals are key:<id>
USER = auth_headers(USER_SECRET)


def gateway(**kwargs: Any) -> Gateway:
    policy = kwargs.pop("policy", {})
    return Gateway(
        routes=[ModelRoute("m", "b1")],
        keys=key_table(),
        backends=[BackendPolicy(name="b1", **policy)],
        **kwargs,
    )


def get(
    gw: Gateway, target: str, headers: tuple[tuple[bytes, bytes], ...] | None, peer: str = ""
) -> RequestReceived:
    hdrs = auth_headers() if headers is None else headers
    return RequestReceived(
        "g", gw.admits("GET", target, hdrs, peer), "GET", target, hdrs, b"", 20.0, 1.0
    )


def dispatched(actions: list[Any]) -> list[str]:
    return [a.request_id for a in actions if isinstance(a, Dispatch)]


# -- the scheduler -----------------------------------------------------------------


def test_every_backend_gets_a_fair_queue_unless_its_policy_says_fifo() -> None:
    assert isinstance(gateway().scheduler("b1"), FairQueue)
    fifo = gateway(policy={"scheduler": "fifo"}).scheduler("b1")
    assert isinstance(fifo, FifoScheduler)
    fair = gateway(policy={"aging_seconds": 5.0, "rate_window": 7.0}).scheduler("b1")
    assert isinstance(fair, FairQueue) and fair.aging_seconds == 5.0
    with pytest.raises(ValueError):
        BackendPolicy(name="b", scheduler="lifo")


@pytest.mark.parametrize(
    ("kind", "order"),
    [
        # Arrival order: the user's one request waits behind the admin's burst.
        ("fifo", ["a2", "a3", "a4", "u1"]),
        # Fair: the user, who has had nothing, goes before the admin's second.
        ("fair", ["u1", "a2", "a3", "a4"]),
    ],
)
def test_one_keys_burst_does_not_starve_another_key(kind: str, order: list[str]) -> None:
    gw = gateway(policy={"scheduler": kind, "max_concurrency": 1, "max_queue": 10})
    assert dispatched(gw.handle(request(gw, "a1", chat_body(), now=1.0))) == ["a1"]
    for rid in ("a2", "a3", "a4"):
        assert gw.handle(request(gw, rid, chat_body(), now=2.0)) == []
    assert gw.handle(request(gw, "u1", chat_body(), headers=USER, now=3.0)) == []
    served = []
    running = "a1"
    for step in range(4):
        now = 4.0 + step
        gw.handle(chunk(running, (Delta("x"),), now))
        started = dispatched(gw.handle(BackendFinished(running, now)))
        sent(gw, running, now)
        assert len(started) == 1
        running = started[0]
        served.append(running)
    assert served == order


class _Recording(FairQueue):
    def __init__(self, calls: list[tuple[str, str, float]]) -> None:
        super().__init__(4, 4)
        self.calls = calls

    def charge(self, request_id: str, actual_cost: float) -> bool:
        self.calls.append(("charge", request_id, actual_cost))
        return super().charge(request_id, actual_cost)

    def release(self, request_id: str, now: float) -> list[Any]:
        self.calls.append(("release", request_id, now))
        return super().release(request_id, now)


def test_real_usage_is_charged_before_the_slot_is_released() -> None:
    calls: list[tuple[str, str, float]] = []
    gw = gateway(scheduler=lambda policy: _Recording(calls))
    body = chat_body(max_tokens=100)
    gw.handle(request(gw, "r", body, now=1.0))
    assert gw.scheduler("b1").snapshot(1.0).principals == ((ADMIN_ID, 0, 1),)
    gw.handle(chunk("r", (Delta("hi"), Usage(prompt_tokens=7, completion_tokens=5))))
    gw.handle(BackendFinished("r", 2.0))
    assert calls == [("charge", "r", 12.0), ("release", "r", 2.0)]


def test_the_cost_estimate_is_the_prompt_bytes_over_four() -> None:
    messages = (ChatMessage(role="user", content="hi"),)
    asked = ChatCompletionRequest(model="m", messages=messages, max_tokens=100, n=3)
    assert estimate_cost(asked, 400) == 100  # output is charged as it is used
    assert estimate_cost(EmbeddingRequest(model="e", input="x"), 4000) == 1000
    assert estimate_cost(asked, 1 << 30) == MAX_COST


# -- GET /v1/queue -------------------------------------------------------------------


def test_queue_reports_depth_in_flight_principals_waits_and_rate() -> None:
    gw = gateway(policy={"max_concurrency": 1, "max_queue": 5})
    gw.handle(request(gw, "a1", chat_body(), now=1.0))
    gw.handle(request(gw, "a2", chat_body(), now=1.0))
    gw.handle(request(gw, "u1", chat_body(), headers=USER, now=2.0))
    gw.handle(BackendFinished("a1", 5.0))  # u1 (fair) goes next, after 3 s
    status, body, headers = json_of(gw.handle(get(gw, "/v1/queue", None)))
    assert status == 200 and headers[b"content-type"] == b"application/json"
    (b1,) = body["backends"]
    assert b1["name"] == "b1" and b1["scheduler"] == "fair"
    assert (b1["queued"], b1["running"], b1["max_concurrency"]) == (1, 1, 1)
    assert b1["principals"] == [
        {"principal": ADMIN_ID, "queued": 1, "running": 0},
        {"principal": USER_ID, "queued": 0, "running": 1},
    ]
    # Waits of the dispatched: a1 found a free slot (0 s), u1 waited 3 s.
    assert b1["wait"] == {"window_seconds": 60.0, "samples": 2, "p50": 0.0, "p99": 3.0}
    assert b1["service_rate"] > 0 and b1["estimated_wait"] > 0


def test_queue_is_for_the_admin_role_only() -> None:
    gw = gateway()
    status, body, _ = json_of(gw.handle(get(gw, "/v1/queue", USER)))
    assert (status, body["error"]["code"]) == (403, "permission_denied")
    sent(gw, "g")
    status, body, _ = json_of(gw.handle(get(gw, "/v1/queue", ())))
    assert (status, body["error"]["code"]) == (401, "missing_api_key")


def test_wait_window_forgets_old_waits_and_keeps_at_most_its_size() -> None:
    window = WaitWindow(size=3, window=10.0)
    for at, wait in ((0.0, 9.0), (5.0, 1.0), (6.0, 2.0), (7.0, 3.0)):
        window.add(at, wait)
    assert window.recent(7.0) == [1.0, 2.0, 3.0]  # the first fell out of the ring
    assert window.recent(15.5) == [2.0, 3.0]  # 5.0 is older than the window


# -- GET /metrics ----------------------------------------------------------------------


def test_metrics_are_rendered_by_the_runtime_and_answered_by_the_core() -> None:
    gw = gateway()
    actions = gw.handle(get(gw, "/metrics", None))
    assert actions == [RenderMetrics("g")]
    assert gw.state_of("g") is ExchangeState.CHECKING
    respond = only(gw.handle(MetricsRendered("g", b"# metrics\n", 20.5)), Respond)
    assert (respond.status, respond.body) == (200, b"# metrics\n")
    assert dict(respond.headers)[b"content-type"] == b"text/plain; version=0.0.4; charset=utf-8"
    log = sent(gw, "g", 21.0)
    assert (log.fields["path"], log.fields["status"]) == ("/metrics", 200)


def test_metrics_need_the_admin_key_or_an_allowed_peer() -> None:
    gw2 = gateway(metrics_allow=parse_networks(["10.0.0.0/8"]))
    status, body, _ = json_of(gw2.handle(get(gw2, "/metrics", USER, "192.168.0.1")))
    assert (status, body["error"]["code"]) == (403, "permission_denied")
    sent(gw2, "g")
    status, body, _ = json_of(gw2.handle(get(gw2, "/metrics", (), "192.168.0.1")))
    assert (status, body["error"]["code"]) == (401, "missing_api_key")
    sent(gw2, "g")
    assert gw2.handle(get(gw2, "/metrics", (), "10.9.9.9")) == [RenderMetrics("g")]


def test_peer_allowed_matches_addresses_only() -> None:
    nets = parse_networks(["10.0.0.0/8", "fe80::/10"])
    assert peer_allowed("10.0.0.1", nets)
    assert peer_allowed("::ffff:10.0.0.1", nets)
    assert peer_allowed("fe80::1%eth0", nets)
    assert not peer_allowed("11.0.0.1", nets)
    assert not peer_allowed("", nets)
    assert not peer_allowed("unix-socket", nets)
    assert not peer_allowed("10.0.0.1", ())
    with pytest.raises(ValueError, match="not-a-net"):
        parse_networks(["not-a-net"])


# -- counts -------------------------------------------------------------------------------


def test_an_exchange_counts_its_tokens_and_a_401_its_reason() -> None:
    gw = gateway()
    gw.handle(request(gw, "r", chat_body(), now=1.0))
    gw.handle(chunk("r", (Delta("x"), Usage(prompt_tokens=7, completion_tokens=5))))
    gw.handle(BackendFinished("r", 2.0))
    ending = gw.handle(ResponseSent("r", 3.0))
    (counted,) = [a for a in ending if isinstance(a, CountExchange)]
    assert not [a for a in ending if isinstance(a, Count)]
    assert counted == CountExchange("chat.completions", "m", 200, 2.0, 7, 5)
    tokens = [c for c in counted.counts() if c.name == "ostiary_tokens_total"]
    assert tokens == [
        Count("ostiary_tokens_total", (("model", "m"), ("kind", "prompt")), 7),
        Count("ostiary_tokens_total", (("model", "m"), ("kind", "completion")), 5),
    ]
    gw.handle(request(gw, "bad", chat_body(), headers=((b"authorization", b"Bearer nope"),)))
    ending = gw.handle(ResponseSent("bad", 3.0))
    (counted,) = [a for a in ending if isinstance(a, CountExchange)]
    assert (counted.status, counted.auth_failure) == (401, "invalid_api_key")
    failures = [c for c in counted.counts() if c.name.startswith("ostiary_auth")]
    assert failures == [Count("ostiary_auth_failures_total", (("reason", "invalid_api_key"),))]
    assert not [c for c in counted.counts() if c.name == "ostiary_tokens_total"]


def test_queue_json_is_valid_for_a_gateway_with_nothing_served() -> None:
    gw = gateway()
    status, body, _ = json_of(gw.handle(get(gw, "/v1/queue", None)))
    wait = body["backends"][0]["wait"]
    assert status == 200 and (wait["samples"], wait["p50"], wait["p99"]) == (0, None, None)
    assert orjson.loads(orjson.dumps(body)) == body


@pytest.mark.parametrize("records", [True, False])
def test_queue_lists_the_requests_that_ended_newest_first(records: bool) -> None:
    gw = gateway()
    gw.access_records = records  # without access-log records, the same list
    for rid in ("a1", "a2"):
        gw.handle(request(gw, rid, chat_body(), now=1.0))
        gw.handle(chunk(rid, (Delta("hi"), Usage(prompt_tokens=3, completion_tokens=1))))
        gw.handle(BackendFinished(rid, 2.0))
        ending = gw.handle(ResponseSent(rid, 2.5))
        logged = [a.fields["duration_ms"] for a in ending if isinstance(a, Log)]
        assert logged == ([1500.0] if records else [])
        assert [type(a) for a in ending if not isinstance(a, Log)] == [CountExchange]
    _, body, _ = json_of(gw.handle(get(gw, "/v1/queue", None)))
    assert [r["request_id"] for r in body["recent"]] == ["a2", "a1"]
    first = body["recent"][0]
    assert (first["endpoint"], first["model"], first["status"]) == ("chat.completions", "m", 200)
    assert first["principal"] == ADMIN_ID and first["duration_ms"] == 1500.0
