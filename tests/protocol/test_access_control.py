"""Roles, the order of checks, limits in the gateway (memory and shared store),
failed-auth budgets and the client address: DESIGN §5a, through ``Gateway``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import pytest

from ostiary.protocol.access import AccessPolicy, RateLimitLayer, Role, Scope, glob_matcher
from ostiary.protocol.actions import (
    Action,
    CheckLimits,
    Count,
    Dispatch,
    Log,
    Respond,
    SettleLimits,
    ShareFailedAuth,
)
from ostiary.protocol.auth import ApiKey, KeyTable, digest_secret, format_secret
from ostiary.protocol.buckets import BucketSpec, Limit, Unit
from ostiary.protocol.capabilities import Capabilities, ModelKind
from ostiary.protocol.credentials import TokenClaims, UnknownSigningKey, looks_like_jwt
from ostiary.protocol.errors import AuthenticationError
from ostiary.protocol.events import (
    AccessReplaced,
    BackendChunk,
    BackendFinished,
    ClientGone,
    FailedAuthShared,
    KeysReplaced,
    LimitsDecided,
    RequestReceived,
    ResponseSent,
)
from ostiary.protocol.gateway import ExchangeState, Gateway, ModelRoute
from ostiary.protocol.generation import Delta, Usage
from ostiary.protocol.guard import format_reset
from ostiary.protocol.limits import MemoryLimitStore
from ostiary.protocol.visibility import parse_networks
from tests.conftest import ADMIN_SECRET, USER_SECRET, chat_body

TENANT_SECRET = format_secret("c" * 12, "C" * 43)
GHOST_SECRET = format_secret("d" * 12, "D" * 43)
WALL = 1_700_000_000.0


def keys() -> KeyTable:
    return KeyTable.of(
        [
            ApiKey("a" * 12, "admin", "admin", digest_secret(ADMIN_SECRET)),
            ApiKey("b" * 12, "user", "user", digest_secret(USER_SECRET)),
            ApiKey("c" * 12, "tenant", "tenant", digest_secret(TENANT_SECRET)),
            ApiKey("d" * 12, "ghost", "nobody", digest_secret(GHOST_SECRET)),
        ]
    )


def bearer(secret: str) -> tuple[tuple[bytes, bytes], ...]:
    return ((b"authorization", b"Bearer " + secret.encode()),)


def gateway(*roles: Role, layers: tuple[RateLimitLayer, ...] = (), **kwargs: Any) -> Gateway:
    access = AccessPolicy(roles, layers, failed_auth_per_minute=kwargs.pop("failed", 60))
    return Gateway(
        routes=[
            ModelRoute("m", "b1", capabilities=Capabilities(max_n=4)),
            ModelRoute("secret-model", "b1"),
            ModelRoute("e", "b2", capabilities=Capabilities(kind=ModelKind.EMBEDDING)),
        ],
        keys=keys(),
        access=access,
        **kwargs,
    )


def request(
    gw: Gateway,
    rid: str,
    body: bytes = b"",
    *,
    secret: str = TENANT_SECRET,
    target: str = "/v1/chat/completions",
    method: str = "POST",
    peer: str = "192.0.2.1",
    extra: tuple[tuple[bytes, bytes], ...] = (),
    now: float = 10.0,
    wall: float = WALL,
) -> list[Action]:
    headers = (*bearer(secret), *extra)
    admission = gw.admits(method, target, headers, peer, wall)
    return gw.handle(RequestReceived(rid, admission, method, target, headers, body, now, wall))


def call_of(actions: list[Action]) -> Any:
    """The call a request was dispatched with."""
    (dispatch,) = [a for a in actions if isinstance(a, Dispatch)]
    return dispatch.call


def response(actions: list[Action]) -> tuple[int, dict[str, Any], dict[bytes, bytes]]:
    (respond,) = [a for a in actions if isinstance(a, Respond)]
    return respond.status, orjson.loads(respond.body), dict(respond.headers)


def finish(gw: Gateway, rid: str, now: float = 11.0, usage: Usage | None = None) -> list[Action]:
    """The backend answers ``rid`` with two tokens; the response is written."""
    used = usage if usage is not None else Usage(prompt_tokens=5, completion_tokens=2)
    gw.handle(BackendChunk(rid, (Delta(text="hi"), used), now))
    actions = gw.handle(BackendFinished(rid, now))
    return actions + gw.handle(ResponseSent(rid, now))


TENANT = Role(name="tenant", models=("m", "e"), endpoints=("chat.completions", "models"))


# -- roles -----------------------------------------------------------------------------


def test_endpoint_outside_the_role_is_403_before_the_body_is_read() -> None:
    gw = gateway(TENANT)
    admission = gw.admits("POST", "/v1/embeddings", bearer(TENANT_SECRET), "192.0.2.1", WALL)
    assert admission.error is not None and admission.error.status == 403
    assert admission.error.code == "permission_denied"
    assert not admission.read_body
    status, body, _ = response(request(gw, "r1", b"{}", target="/v1/embeddings"))
    assert status == 403 and "embeddings" in body["error"]["message"]


def test_a_key_whose_role_is_not_configured_gets_403() -> None:
    status, body, _ = response(request(gateway(TENANT), "r1", chat_body(), secret=GHOST_SECRET))
    assert status == 403 and body["error"]["code"] == "permission_denied"
    assert "nobody" in body["error"]["message"]


def test_a_model_the_role_may_not_use_answers_exactly_like_an_unknown_one() -> None:
    gw = gateway(TENANT)
    hidden = response(request(gw, "r1", chat_body(model="secret-model")))
    gw.handle(ResponseSent("r1", 11.0))
    missing = response(request(gw, "r2", chat_body(model="secret-model")))
    gw.handle(ResponseSent("r2", 11.0))
    unknown = response(request(gw, "r3", chat_body(model="no-such")))
    assert hidden[0] == unknown[0] == 404
    assert hidden[1]["error"]["message"].replace("secret-model", "X") == unknown[1]["error"][
        "message"
    ].replace("no-such", "X")
    assert hidden[1]["error"]["code"] == unknown[1]["error"]["code"] == "model_not_found"
    assert missing == hidden or missing[1] == hidden[1]


def test_model_list_and_retrieve_show_only_the_roles_models() -> None:
    gw = gateway(TENANT)
    _, body, _ = response(request(gw, "r1", target="/v1/models", method="GET"))
    assert [m["id"] for m in body["data"]] == ["m", "e"]
    gw.handle(ResponseSent("r1", 11.0))
    status, _, _ = response(request(gw, "r2", target="/v1/models/secret-model", method="GET"))
    assert status == 404
    gw.handle(ResponseSent("r2", 11.0))
    _, body, _ = response(request(gw, "r3", target="/v1/models", method="GET", secret=USER_SECRET))
    assert len(body["data"]) == 3  # the built-in user role may use every model


def test_admin_endpoints_follow_the_role_and_a_custom_role_may_get_metrics() -> None:
    ops = Role(name="tenant", endpoints=("metrics",))
    gw = gateway(ops)
    admission = gw.admits("GET", "/v1/queue", bearer(TENANT_SECRET), "192.0.2.1", WALL)
    assert admission.error is not None and admission.error.status == 403
    admission = gw.admits("GET", "/metrics", bearer(TENANT_SECRET), "192.0.2.1", WALL)
    assert admission.error is None
    admission = gw.admits("GET", "/v1/queue", bearer(USER_SECRET), "192.0.2.1", WALL)
    assert admission.error is not None and admission.error.status == 403
    assert gw.admits("GET", "/v1/queue", bearer(ADMIN_SECRET), "192.0.2.1", WALL).error is None


def test_a_configured_role_replaces_the_builtin_of_that_name() -> None:
    narrow_user = Role(name="user", endpoints=("models",))
    gw = gateway(narrow_user)
    admission = gw.admits("POST", "/v1/chat/completions", bearer(USER_SECRET), "192.0.2.1", WALL)
    assert admission.error is not None and admission.error.status == 403


def test_order_of_checks_401_403_400_404() -> None:
    gw = gateway(TENANT)
    # No key, an endpoint the role lacks and a bad body: 401 first.
    headers = ((b"content-type", b"application/json"),)
    admission = gw.admits("POST", "/v1/embeddings", headers, "192.0.2.1", WALL)
    assert admission.error is not None and admission.error.status == 401
    # Endpoint refused before the body is judged.
    assert response(request(gw, "r1", b"not json", target="/v1/embeddings"))[0] == 403
    # A bad body before an unknown model.
    assert response(request(gw, "r2", b'{"model": "nope"}'))[0] == 400


# -- the role's output cap ----------------------------------------------------------------


def test_output_cap_refuses_more_and_fills_in_a_missing_one() -> None:
    capped = Role(name="tenant", max_output_tokens=100)
    gw = gateway(capped)
    status, body, _ = response(request(gw, "r1", chat_body(max_tokens=101)))
    assert status == 400 and body["error"]["param"] == "max_tokens"
    gw.handle(ResponseSent("r1", 11.0))
    status, body, _ = response(request(gw, "r2", chat_body(max_completion_tokens=500)))
    assert status == 400 and body["error"]["param"] == "max_completion_tokens"
    gw.handle(ResponseSent("r2", 11.0))
    call = call_of(request(gw, "r3", chat_body()))
    assert call.max_completion_tokens == 100
    assert call.raw["max_completion_tokens"] == 100
    call = call_of(request(gw, "r4", chat_body(max_tokens=50)))
    assert call.output_limit == 50


def test_a_legacy_completion_that_sets_no_max_gets_openai_s_default_of_16() -> None:
    """As OpenAI does: without it, a model runs to its context's end (minutes on the
    embedded one), and a token limit reserves the whole output cap for it."""
    body = orjson.dumps({"model": "m", "prompt": "Say hi"})
    gw = gateway(Role(name="tenant", endpoints=("completions",)))
    call = call_of(request(gw, "r1", body, target="/v1/completions"))
    assert call.max_tokens == 16 and call.raw["max_tokens"] == 16
    asked = orjson.dumps({"model": "m", "prompt": "Say hi", "max_tokens": 300})
    assert call_of(request(gw, "r2", asked, target="/v1/completions")).max_tokens == 300
    # A role's smaller cap wins; a chat is not given the completion default.
    small = gateway(Role(name="tenant", max_output_tokens=8))
    assert call_of(request(small, "r1", body, target="/v1/completions")).max_tokens == 8
    open_role = gateway(Role(name="tenant"))
    assert call_of(request(open_role, "r3", chat_body())).output_limit is None


def test_output_cap_is_the_smaller_of_role_and_limits() -> None:
    from ostiary.protocol.request_limits import RequestLimits

    gw = gateway(
        Role(name="tenant", max_output_tokens=4096), limits=RequestLimits(max_output_tokens=64)
    )
    call = call_of(request(gw, "r1", chat_body()))
    assert call.max_completion_tokens == 64


# -- limits in memory ---------------------------------------------------------------------


def test_requests_per_minute_admits_the_burst_then_429_with_headers() -> None:
    gw = gateway(Role(name="tenant", requests_per_minute=2))
    first = request(gw, "r1", chat_body(), now=0.0)
    assert any(isinstance(a, Dispatch) for a in first)
    done = finish(gw, "r1", now=0.1)
    (ok,) = [a for a in done if isinstance(a, Respond)]
    headers = dict(ok.headers)
    assert headers[b"x-ratelimit-limit-requests"] == b"2"
    assert headers[b"x-ratelimit-remaining-requests"] == b"1"
    assert headers[b"x-ratelimit-reset-requests"] == b"30s"
    assert b"x-ratelimit-limit-tokens" not in headers
    request(gw, "r2", chat_body(), now=0.0)
    status, body, headers = response(request(gw, "r3", chat_body(), now=0.0))
    assert status == 429
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert body["error"]["type"] == "rate_limit_error"
    assert "requests per minute" in body["error"]["message"]
    assert "tenant" in body["error"]["message"] and "c" * 12 not in body["error"]["message"]
    assert headers[b"retry-after"] == b"30" and headers[b"retry-after-ms"] == b"30000"
    assert headers[b"x-ratelimit-remaining-requests"] == b"0"
    assert b"x-should-retry" not in headers
    # Refilled one request's worth after 30 s.
    gw.handle(ResponseSent("r3", 0.0))
    assert any(isinstance(a, Dispatch) for a in request(gw, "r4", chat_body(), now=30.0))


def test_rate_limited_requests_are_counted_by_scope() -> None:
    gw = gateway(layers=(RateLimitLayer(scope=Scope.GLOBAL, requests_per_minute=1),))
    request(gw, "r1", chat_body(), secret=USER_SECRET)
    actions = request(gw, "r2", chat_body(), secret=USER_SECRET)
    counts = [a for a in actions if isinstance(a, Count) and a.name == "ostiary_rate_limited_total"]
    assert [c.labels for c in counts] == [(("scope", "global"),)]
    _, body, _ = response(actions)
    assert "rate_limits[0] (global)" in body["error"]["message"]


def test_a_principal_no_layer_applies_to_gets_no_ratelimit_headers() -> None:
    layer = RateLimitLayer(scope=Scope.IP, requests_per_minute=10, roles=("tenant",))
    gw = gateway(TENANT, layers=(layer,))
    request(gw, "r1", chat_body(), secret=USER_SECRET)
    (ok,) = [a for a in finish(gw, "r1") if isinstance(a, Respond)]
    assert not any(name.startswith(b"x-ratelimit") for name, _ in ok.headers)
    request(gw, "r2", chat_body())
    (ok,) = [a for a in finish(gw, "r2") if isinstance(a, Respond)]
    assert dict(ok.headers)[b"x-ratelimit-limit-requests"] == b"10"


def test_tightest_minute_layer_is_reported() -> None:
    layers = (
        RateLimitLayer(scope=Scope.IP, requests_per_minute=100),
        RateLimitLayer(scope=Scope.MODEL, requests_per_minute=5, requests_per_day=3),
    )
    gw = gateway(Role(name="tenant", requests_per_minute=50), layers=layers)
    request(gw, "r1", chat_body())
    (ok,) = [a for a in finish(gw, "r1") if isinstance(a, Respond)]
    headers = dict(ok.headers)
    assert headers[b"x-ratelimit-limit-requests"] == b"5"  # per-day layers are not reported
    assert headers[b"x-ratelimit-remaining-requests"] == b"4"


def test_a_per_day_layer_that_refuses_is_reported_at_zero() -> None:
    layer = RateLimitLayer(scope=Scope.PRINCIPAL, requests_per_day=1)
    gw = gateway(Role(name="tenant", requests_per_minute=50), layers=(layer,))
    request(gw, "r0", chat_body())
    finish(gw, "r0")
    status, body, headers = response(request(gw, "r1", chat_body()))
    assert status == 429 and "requests per day" in body["error"]["message"]
    assert headers[b"x-ratelimit-limit-requests"] == b"1"
    assert headers[b"x-ratelimit-remaining-requests"] == b"0"
    assert headers[b"retry-after"] == b"86400"


def test_tokens_reserve_the_estimate_and_settle_with_real_usage() -> None:
    gw = gateway(Role(name="tenant", tokens_per_minute=1000))
    request(gw, "r1", chat_body(max_tokens=100), now=0.0)
    store = gw.guard.store
    ((_limit, cost),) = store._open[next(iter(store._open))].charges
    assert 100 < cost < 120  # "hi there" (2-3 tokens) + message overhead + 100 output
    finish(gw, "r1", now=0.0, usage=Usage(prompt_tokens=10, completion_tokens=20))
    assert store.open_holds == 0
    # 30 used of 1000: 970 left (nothing refilled at the same millisecond).
    request(gw, "r2", chat_body(max_tokens=900), now=0.0)
    (ok,) = [a for a in finish(gw, "r2", now=0.0) if isinstance(a, Respond)]
    assert dict(ok.headers)[b"x-ratelimit-limit-tokens"] == b"1000"


def test_a_reservation_over_the_limit_can_never_pass() -> None:
    gw = gateway(Role(name="tenant", tokens_per_minute=50))
    status, body, headers = response(request(gw, "r1", chat_body(max_tokens=100)))
    assert status == 429 and headers[b"x-should-retry"] == b"false"
    assert "can never pass" in body["error"]["message"]
    assert headers[b"x-ratelimit-remaining-tokens"] == b"0"
    gw.handle(ResponseSent("r1", 11.0))
    # A small request without max_tokens still passes a small limit, clamped to
    # the whole bucket: the next one waits for it, and is told what it reserves.
    assert any(isinstance(a, Dispatch) for a in request(gw, "r2", chat_body()))
    status, body, _ = response(request(gw, "r3", chat_body()))
    assert status == 429 and "can never pass" not in body["error"]["message"]
    assert "This request reserves 50 tokens" in body["error"]["message"]


def test_a_prompt_counted_only_up_to_the_limit_needs_at_least_its_cost() -> None:
    gw = gateway(Role(name="tenant", tokens_per_minute=50))
    huge = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "word " * 5000}]})
    status, body, headers = response(request(gw, "r1", huge))
    assert status == 429 and headers[b"x-should-retry"] == b"false"
    assert "needs at least " in body["error"]["message"]
    gw.handle(ResponseSent("r1", 11.0))
    # Counted whole (asking for too much output), the figure is exact.
    status, body, _ = response(request(gw, "r2", chat_body(max_tokens=100)))
    assert status == 429 and "needs at least" not in body["error"]["message"]


def test_a_key_s_own_limits_hold_when_no_role_or_layer_has_any() -> None:
    """A key's overrides (``keys create --requests-per-minute 2 --max-concurrent 1``)
    are limits of their own: with the built-in roles and no ``[[rate_limits]]``,
    nothing else is limited, and the key is still held to them."""
    gw = gateway()
    assert not gw.guard.access.limited
    own = ApiKey(
        "c" * 12, "own", "user", digest_secret(TENANT_SECRET),
        requests_per_minute=2, max_concurrent=1, tokens_per_minute=40,
    )  # fmt: skip
    others = [k for k in keys().keys.values() if k.id != own.id]
    gw.handle(KeysReplaced(KeyTable.of([*others, own]), 0.0))
    first = request(gw, "r1", chat_body(max_tokens=5), now=0.0)
    assert any(isinstance(a, Dispatch) for a in first)
    # Still running: the slot is full.
    status, body, _ = response(request(gw, "r2", chat_body(max_tokens=5), now=0.0))
    assert status == 429 and "concurrent" in body["error"]["message"]
    gw.handle(ResponseSent("r2", 0.0))
    (ok,) = [a for a in finish(gw, "r1", now=0.0) if isinstance(a, Respond)]
    headers = dict(ok.headers)
    assert headers[b"x-ratelimit-limit-requests"] == b"2"
    assert headers[b"x-ratelimit-limit-tokens"] == b"40"
    # The slot is back; the minute's second request spends the budget.
    assert any(isinstance(a, Dispatch) for a in request(gw, "r3", chat_body(max_tokens=5), now=0.0))
    finish(gw, "r3", now=0.0)
    status, body, headers = response(request(gw, "r4", chat_body(max_tokens=5), now=0.0))
    assert status == 429 and "requests per minute" in body["error"]["message"]
    assert headers[b"retry-after"] == b"30"
    gw.handle(ResponseSent("r4", 0.0))
    # Its token limit too: a reservation larger than 40 can never pass.
    status, body, headers = response(request(gw, "r5", chat_body(max_tokens=100), now=60.0))
    assert status == 429 and headers[b"x-should-retry"] == b"false"
    # Another key, without overrides, is not limited at all.
    plain = request(gw, "r6", chat_body(max_tokens=100), secret=USER_SECRET, now=60.0)
    assert any(isinstance(a, Dispatch) for a in plain)


def test_a_token_counter_loaded_later_comes_with_the_keys() -> None:
    """The runtime loads the counter when a key with a token limit first appears (no
    limit in the config needed it at start) and hands it over with the keys."""

    class Words:
        def decode(self, ids: Sequence[int]) -> str:
            return ""

        def count(self, text: str, limit: int) -> int:
            return len(text.split())

    gw = gateway()
    assert gw.guard.tokens is None
    counter = Words()
    gw.handle(KeysReplaced(keys(), 0.0, tokens=counter))
    assert gw.guard.tokens is counter
    gw.handle(KeysReplaced(keys(), 1.0))  # none handed over: the one loaded stays
    assert gw.guard.tokens is counter


def test_concurrency_counts_from_admission_to_the_end_and_comes_back() -> None:
    gw = gateway(Role(name="tenant", max_concurrent=1))
    assert any(isinstance(a, Dispatch) for a in request(gw, "r1", chat_body(stream=True)))
    status, body, headers = response(request(gw, "r2", chat_body()))
    assert status == 429 and "concurrent" in body["error"]["message"]
    assert headers[b"retry-after"] == b"1"
    gw.handle(ResponseSent("r2", 10.0))
    gw.handle(BackendChunk("r1", (Delta(text="x"),), 10.5))
    gw.handle(ClientGone("r1", 10.6))  # cut off mid-stream: its slot comes back
    assert gw.guard.store.in_flight("principal:key:" + "c" * 12) == 0
    assert any(isinstance(a, Dispatch) for a in request(gw, "r3", chat_body()))


def test_a_stream_cut_off_settles_what_it_produced() -> None:
    gw = gateway(Role(name="tenant", tokens_per_minute=10_000))
    request(gw, "r1", chat_body(stream=True, max_tokens=1000), now=0.0)
    gw.handle(BackendChunk("r1", (Delta(text="a"), Delta(text="b"), Delta(text="c")), 0.0))
    gw.handle(ClientGone("r1", 0.0))
    (limit,) = _limits(gw)
    used = gw.guard.store.deficit(limit, 0.0) // limit.spec.per_token
    assert 3 < used < 20  # the prompt estimate plus three pieces, not the 1000 reserved


def test_queued_requests_that_time_out_refund_their_tokens() -> None:
    gw = gateway(Role(name="tenant", tokens_per_minute=10_000))
    request(gw, "r1", chat_body(max_tokens=500), now=0.0)
    gw.handle(ClientGone("r1", 0.0))  # never produced anything: a full refund
    assert gw.guard.store.deficit(next(iter(_limits(gw))), 0.0) == 0


def _limits(gw: Gateway) -> Any:
    from ostiary.protocol.buckets import Limit, Unit

    spec = gw.guard.access.roles["tenant"].buckets()[0][1]
    yield Limit("principal:key:" + "c" * 12, "tpm", spec, Unit.TOKENS)


# -- failed authentication per IP ---------------------------------------------------------


def test_wrong_keys_from_one_ip_are_slowed_while_another_ip_is_not() -> None:
    gw = gateway(failed=3)
    for i in range(3):
        status, _, _ = response(
            request(gw, f"bad{i}", chat_body(), secret="ost_wrong", peer="198.51.100.7")
        )
        assert status == 401
        gw.handle(ResponseSent(f"bad{i}", 10.0))
    # Over budget: refused unheard, even with a good key.
    status, body, headers = response(
        request(gw, "x", chat_body(), secret=USER_SECRET, peer="198.51.100.7")
    )
    assert status == 429 and "failed authentications" in body["error"]["message"]
    assert int(headers[b"retry-after"]) >= 1
    gw.handle(ResponseSent("x", 10.0))
    # Another address with a valid key is unaffected.
    assert any(
        isinstance(a, Dispatch)
        for a in request(gw, "ok", chat_body(), secret=USER_SECRET, peer="203.0.113.9")
    )
    # The budget refills: 20 s later one more attempt is heard.
    later = request(gw, "y", chat_body(), secret=USER_SECRET, peer="198.51.100.7", wall=WALL + 20.0)
    assert any(isinstance(a, Dispatch) for a in later)


def test_refusals_of_the_failed_auth_budget_are_counted_as_rate_limited() -> None:
    """They are 429 rate_limit_exceeded like any other limit's, but were missing from
    ``ostiary_rate_limited_total``: key guessing being throttled did not show."""
    gw = gateway(failed=1)
    request(gw, "bad", chat_body(), secret="ost_wrong", peer="198.51.100.7")
    sent = gw.handle(ResponseSent("bad", 10.0))
    assert not [a for a in sent if isinstance(a, Count) and a.name == "ostiary_rate_limited_total"]
    status, _, _ = response(request(gw, "x", chat_body(), secret=USER_SECRET, peer="198.51.100.7"))
    assert status == 429
    sent = gw.handle(ResponseSent("x", 10.0))
    counts = [a for a in sent if isinstance(a, Count) and a.name == "ostiary_rate_limited_total"]
    assert [c.labels for c in counts] == [(("scope", "failed_auth"),)]
    # A limit judged after authentication is counted once, when it is judged.
    gw = gateway(layers=(RateLimitLayer(scope=Scope.GLOBAL, requests_per_minute=1),))
    request(gw, "r1", chat_body(), secret=USER_SECRET)
    refused = request(gw, "r2", chat_body(), secret=USER_SECRET) + gw.handle(
        ResponseSent("r2", 10.0)
    )
    counts = [a for a in refused if isinstance(a, Count) and a.name == "ostiary_rate_limited_total"]
    assert [c.labels for c in counts] == [(("scope", "global"),)]


def test_failed_authentications_leave_nothing_open_behind() -> None:
    """A 401 is a debit of the address' budget, not a request in flight: memory stays
    bounded however many addresses fail."""
    gw = gateway(failed=3)
    for i in range(50):
        status, _, _ = response(
            request(gw, f"bad{i}", chat_body(), secret="ost_wrong", peer=f"198.51.100.{i}")
        )
        assert status == 401
        gw.handle(ResponseSent(f"bad{i}", 10.0))
    assert gw.guard.failures.open_holds == 0
    assert gw.guard.failures.tracked == 50


def test_with_a_shared_store_failed_authentications_are_shared_and_merged_back() -> None:
    gw = gateway(failed=3, shared_limits=True)
    peer = "198.51.100.7"
    actions = request(gw, "bad", chat_body(), secret="ost_wrong", peer=peer)
    (share,) = [a for a in actions if isinstance(a, ShareFailedAuth)]
    assert share.limit.key == f"auth:{peer}:failed:3/60000"
    assert gw.guard.access.failed_auth_key(peer) == share.limit.key
    gw.handle(ResponseSent("bad", 10.0))
    spec = share.limit.spec
    # Another replica's view, smaller than this one's: nothing changes.
    assert gw.handle(FailedAuthShared(share.limit, 0, WALL)) == []
    assert response(request(gw, "ok", chat_body(), secret="ost_wrong", peer=peer))[0] == 401
    gw.handle(ResponseSent("ok", 10.0))
    # The shared bucket is spent (failures on other replicas): refused unheard here.
    gw.handle(FailedAuthShared(share.limit, spec.full, WALL))
    status, body, _ = response(request(gw, "x", chat_body(), secret=USER_SECRET, peer=peer))
    assert status == 429 and "failed authentications" in body["error"]["message"]
    # Without a shared store, nothing is shared.
    alone = gateway(failed=3)
    assert not any(
        isinstance(a, ShareFailedAuth)
        for a in request(alone, "b", chat_body(), secret="ost_wrong", peer=peer)
    )


def test_merging_another_store_s_deficit_keeps_the_larger() -> None:
    store = MemoryLimitStore(max_buckets=8)
    limits = [
        Limit(f"auth:10.0.0.{i}", "failed", BucketSpec.per(3, 60), Unit.REQUESTS) for i in range(9)
    ]
    spec = limits[0].spec
    store.raise_deficit(limits[0], spec.per_token, 0.0)
    assert store.deficit(limits[0], 0.0) == spec.per_token
    store.raise_deficit(limits[0], 1, 0.0)  # smaller: kept as it was
    assert store.deficit(limits[0], 0.0) == spec.per_token
    for limit in limits[1:]:  # more than the store holds: swept, still bounded
        store.raise_deficit(limit, spec.full, 0.0)
    assert store.tracked <= 8


def test_failed_auth_budget_off_with_zero() -> None:
    gw = gateway(failed=0)
    for i in range(5):
        assert (
            response(request(gw, f"b{i}", chat_body(), secret="nope", peer="198.51.100.7"))[0]
            == 401
        )
        gw.handle(ResponseSent(f"b{i}", 10.0))


# -- the client address -------------------------------------------------------------------


def test_ip_layer_counts_the_forwarded_client_only_from_trusted_proxies() -> None:
    layer = RateLimitLayer(scope=Scope.IP, requests_per_minute=1)
    gw = gateway(layers=(layer,), trusted_proxies=parse_networks(["10.0.0.0/8"]))
    xff = ((b"x-forwarded-for", b"203.0.113.5"),)
    assert any(
        isinstance(a, Dispatch)
        for a in request(gw, "r1", chat_body(), secret=USER_SECRET, peer="10.1.1.1", extra=xff)
    )
    # Same client behind the proxy: limited.
    assert (
        response(request(gw, "r2", chat_body(), secret=USER_SECRET, peer="10.1.1.2", extra=xff))[0]
        == 429
    )
    gw.handle(ResponseSent("r2", 10.0))
    # A spoofed header from an untrusted peer is ignored: counted as that peer.
    assert any(
        isinstance(a, Dispatch)
        for a in request(gw, "r3", chat_body(), secret=USER_SECRET, peer="198.51.100.1", extra=xff)
    )
    log = next(a for a in finish(gw, "r3") if isinstance(a, Log))
    assert log.fields["client"] == "198.51.100.1"


# -- the shared store ---------------------------------------------------------------------


def test_shared_limits_go_through_the_runtime_and_settle_there() -> None:
    gw = gateway(Role(name="tenant", requests_per_minute=5), shared_limits=True)
    (check,) = request(gw, "r1", chat_body(), now=0.0)
    assert isinstance(check, CheckLimits) and gw.state_of("r1") is ExchangeState.LIMITING
    decision = MemoryLimitStore().admit(check.charges, check.slots, 0.0)
    actions = gw.handle(LimitsDecided("r1", decision, 0.0))
    assert any(isinstance(a, Dispatch) for a in actions)
    done = finish(gw, "r1", now=0.5)
    (settle,) = [a for a in done if isinstance(a, SettleLimits)]
    assert settle.hold == decision.hold and settle.actual_tokens == 7


def test_shared_store_down_refuses_or_counts_locally() -> None:
    refuse = gateway(Role(name="tenant", requests_per_minute=1), shared_limits=True)
    request(refuse, "r1", chat_body())
    refused = refuse.handle(LimitsDecided("r1", None, 10.0))
    status, body, headers = response(refused)
    assert status == 503 and body["error"]["code"] == "rate_limiter_unavailable"
    undecided = Count("ostiary_limiter_unavailable_total", (("on_failure", "refuse"),))
    assert undecided in refused
    assert headers[b"retry-after"] == b"1"
    local = gateway(
        Role(name="tenant", requests_per_minute=1), shared_limits=True, on_limits_failure="local"
    )
    request(local, "r1", chat_body())
    judged = local.handle(LimitsDecided("r1", None, 10.0))
    assert any(isinstance(a, Dispatch) for a in judged)
    assert Count("ostiary_limiter_unavailable_total", (("on_failure", "local"),)) in judged
    request(local, "r2", chat_body())
    assert response(local.handle(LimitsDecided("r2", None, 10.0)))[0] == 429
    # A local hold is settled locally, not through the runtime.
    assert not any(isinstance(a, SettleLimits) for a in finish(local, "r1"))


def test_a_client_gone_while_limiting_ends_once() -> None:
    gw = gateway(Role(name="tenant", requests_per_minute=5), shared_limits=True)
    request(gw, "r1", chat_body())
    actions = gw.handle(ClientGone("r1", 10.0))
    assert gw.state_of("r1") is None
    assert sum(type(a).__name__ == "Log" for a in actions) == 1


# -- reload -------------------------------------------------------------------------------


def test_access_replaced_swaps_roles_and_keeps_buckets() -> None:
    gw = gateway(Role(name="tenant", requests_per_minute=1))
    request(gw, "r1", chat_body())
    stricter = AccessPolicy([Role(name="tenant", requests_per_minute=1, endpoints=("models",))])
    gw.handle(AccessReplaced(stricter, None, (), 10.0))
    admission = gw.admits("POST", "/v1/chat/completions", bearer(TENANT_SECRET), "192.0.2.1", WALL)
    assert admission.error is not None and admission.error.status == 403


def test_a_limit_changed_by_a_reload_is_a_new_bucket_that_starts_full() -> None:
    """A deficit is counted in units of its limit: read under another limit it would
    mean another level (7 rpm -> 6 rpm: an empty bucket read as refilling for hours
    in one path, and a full one read as six requests over in another)."""
    gw = gateway(Role(name="tenant", requests_per_minute=7))

    def status(rid: str) -> int:
        actions = request(gw, rid, chat_body(), now=0.0)
        refused = [a for a in actions if isinstance(a, Respond)]
        if refused:
            gw.handle(ResponseSent(rid, 0.0))
            return refused[0].status
        finish(gw, rid, now=0.0)
        return 200

    assert [status(f"a{i}") for i in range(8)] == [200] * 7 + [429]
    gw.handle(
        AccessReplaced(AccessPolicy([Role(name="tenant", requests_per_minute=6)]), None, (), 0.0)
    )
    assert [status(f"b{i}") for i in range(7)] == [200] * 6 + [429]


def test_a_shared_refusal_judged_after_a_reload_names_the_layer_it_was_judged_on() -> None:
    layer = RateLimitLayer(scope=Scope.GLOBAL, requests_per_minute=1)
    gw = gateway(TENANT, layers=(layer,), shared_limits=True)
    store = MemoryLimitStore()
    for rid in ("r1", "r2"):
        (check,) = request(gw, rid, chat_body(), now=0.0)
        assert isinstance(check, CheckLimits)
        decisions = store.admit(check.charges, check.slots, 0.0)
    # The layers are gone by the time the runtime answers r2's refusal.
    gw.handle(AccessReplaced(AccessPolicy([TENANT]), None, (), 0.0))
    actions = gw.handle(LimitsDecided("r2", decisions, 0.0))
    status, body, _ = response(actions)
    assert status == 429 and "of rate_limits[0] (global)" in body["error"]["message"]
    (count,) = [a for a in actions if isinstance(a, Count)]
    assert count.labels == (("scope", "global"),)


# -- JWTs through a verifier ----------------------------------------------------------------


class FakeVerifier:
    def __init__(self, claims: dict[str, TokenClaims]) -> None:
        self.claims = claims
        self.walls: list[float] = []

    def verify(self, token: str, wall: float) -> TokenClaims:
        self.walls.append(wall)
        if token.endswith(".unknown"):
            raise UnknownSigningKey("k9")
        found = self.claims.get(token)
        if found is None:
            raise AuthenticationError("The token's signature is not valid.", code="invalid_token")
        return found


JWT_A = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln"
JWT_B = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJiIn0.c2ln"


def test_jwt_principal_takes_the_first_configured_role_in_claim_order() -> None:
    verifier = FakeVerifier(
        {
            JWT_A: TokenClaims("alice", ("viewer", "tenant", "user")),
            JWT_B: TokenClaims("bob", ("viewer",)),
        }
    )
    gw = gateway(TENANT, verifier=verifier)
    admission = gw.admits("POST", "/v1/chat/completions", bearer(JWT_A), "192.0.2.1", WALL)
    assert admission.error is None and admission.principal is not None
    assert admission.principal.id == "jwt:alice" and admission.principal.role.name == "tenant"
    assert verifier.walls == [WALL]
    admission = gw.admits("POST", "/v1/chat/completions", bearer(JWT_B), "192.0.2.1", WALL)
    assert admission.error is not None and admission.error.status == 403
    admission = gw.admits(
        "POST", "/v1/chat/completions", bearer(JWT_A[:-4] + "AAAA"), "192.0.2.1", WALL
    )
    assert admission.error is not None and admission.error.status == 401
    assert admission.error.code == "invalid_token"


def test_a_token_whose_role_lacks_the_endpoint_is_told_so_in_the_endpoint_s_name() -> None:
    verifier = FakeVerifier({JWT_A: TokenClaims("alice", ("tenant",))})
    chat_only = Role(name="tenant", endpoints=("chat.completions",))
    gw = gateway(chat_only, verifier=verifier)
    admission = gw.admits("GET", "/v1/models/m", bearer(JWT_A), "192.0.2.1", WALL)
    assert admission.error is not None and admission.error.status == 403
    assert admission.error.message == "This token's role may not use the models endpoint."
    admission = gw.admits("GET", "/v1/models/m", bearer(TENANT_SECRET), "192.0.2.1", WALL)
    assert admission.error is not None
    assert admission.error.message == "This key's role may not use the models endpoint."


def test_unknown_kid_asks_the_runtime_to_refresh() -> None:
    gw = gateway(verifier=FakeVerifier({}))
    admission = gw.admits("GET", "/v1/models", bearer(JWT_A[:-4] + "unknown"), "192.0.2.1", WALL)
    assert admission.refresh_keys and admission.error is not None and admission.error.status == 401


def test_keys_still_work_beside_jwts_and_shapes_are_told_apart() -> None:
    gw = gateway(verifier=FakeVerifier({}))
    assert gw.admits("GET", "/v1/models", bearer(USER_SECRET), "192.0.2.1", WALL).error is None
    assert looks_like_jwt(JWT_A) and not looks_like_jwt(USER_SECRET)
    assert not looks_like_jwt("eyJ" + "a" * 20_000 + ".b.c")


# -- small pieces -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "0ms"),
        (250, "250ms"),
        (1000, "1s"),
        (1500, "1.5s"),
        (360_000, "6m0s"),
        (3_723_000, "1h2m3s"),
    ],
)
def test_reset_durations(ms: int, text: str) -> None:
    assert format_reset(ms) == text


def test_globs() -> None:
    matcher = glob_matcher(["gpt-*", "llama-?b", "exact.model"])
    assert matcher.fullmatch("gpt-4o") and matcher.fullmatch("llama-7b")
    assert not matcher.fullmatch("llama-70b") and not matcher.fullmatch("exactXmodel")
    assert glob_matcher([]).fullmatch("anything") is None


def test_layer_filters() -> None:
    layer = RateLimitLayer(
        scope=Scope.MODEL,
        requests_per_minute=1,
        roles=("tenant",),
        models=("m*",),
        endpoints=("chat.completions",),
    )
    assert layer.applies("tenant", "m", "chat.completions")
    assert not layer.applies("user", "m", "chat.completions")
    assert not layer.applies("tenant", "e", "chat.completions")
    assert not layer.applies("tenant", "m", "embeddings")
    with pytest.raises(ValueError, match="sets no limit"):
        RateLimitLayer(scope=Scope.IP)
    for never in ("models", "queue", "metrics"):
        with pytest.raises(ValueError, match="never rate-limited"):
            RateLimitLayer(scope=Scope.IP, requests_per_minute=1, endpoints=(never,))
    with pytest.raises(ValueError, match="unknown endpoint"):
        RateLimitLayer(scope=Scope.IP, requests_per_minute=1, endpoints=("chat",))


def test_readiness_with_redis_down_depends_on_on_failure() -> None:
    from ostiary.protocol.events import ReadinessChecked

    for on_failure, expected in (("refuse", 503), ("local", 200)):
        gw = gateway(shared_limits=True, on_limits_failure=on_failure)
        request(gw, "r1", target="/readyz", method="GET")
        status, body, _ = response(
            gw.handle(ReadinessChecked("r1", (), 1.0, redis_unreachable=True))
        )
        assert status == expected, body
        gw2 = gateway(shared_limits=True, on_limits_failure=on_failure)
        request(gw2, "r2", target="/readyz", method="GET")
        checked = ReadinessChecked("r2", (("b1", "down"),), 1.0, redis_unreachable=True)
        assert response(gw2.handle(checked))[0] == 503


def test_a_refused_stream_is_logged_as_a_stream() -> None:
    gw = gateway(Role(name="tenant", requests_per_minute=1))
    request(gw, "r1", chat_body(stream=True), now=0.0)
    assert response(request(gw, "r2", chat_body(stream=True), now=0.0))[0] == 429
    (record,) = [a for a in gw.handle(ResponseSent("r2", 0.0)) if isinstance(a, Log)]
    assert record.fields["status"] == 429 and record.fields["stream"] is True
