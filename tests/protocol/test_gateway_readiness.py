"""``/readyz`` in the core: what its body names, its 503's ``retry-after``, and its
log records, written on a change of readiness only."""

from __future__ import annotations

import itertools
from typing import Any

import orjson

from ostiary.protocol.actions import Action, CheckReadiness, Log, Respond
from ostiary.protocol.events import ReadinessChecked, ResponseSent
from ostiary.protocol.gateway import Gateway
from tests.protocol.test_gateway import gateway, request

Failures = tuple[tuple[str, str], ...]


class Poller:
    """A load balancer asking one gateway's ``/readyz``, the runtime's checks
    answering with what the test says."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.ids = itertools.count(1)
        self.logs: list[Log] = []

    def poll(
        self, failures: Failures = (), **checks: Any
    ) -> tuple[int, dict[str, Any], dict[bytes, bytes]]:
        rid = f"ready-{next(self.ids)}"
        started = self.gw.handle(request(self.gw, rid, method="GET", target="/readyz", headers=()))
        assert started == [CheckReadiness(rid)]
        actions: list[Action] = self.gw.handle(ReadinessChecked(rid, failures, 10.5, **checks))
        (respond,) = [a for a in actions if isinstance(a, Respond)]
        self.logs.extend(a for a in actions if isinstance(a, Log))
        self.gw.handle(ResponseSent(rid, 10.6))
        assert self.gw.state_of(rid) is None
        return respond.status, orjson.loads(respond.body), dict(respond.headers)

    def take_logs(self) -> list[tuple[str, str, dict[str, Any]]]:
        taken = [(log.level, log.message, log.fields) for log in self.logs]
        self.logs.clear()
        return taken


def test_a_503_carries_retry_after_from_the_readiness_cache() -> None:
    poller = Poller(gateway())
    status, body, headers = poller.poll()
    assert (status, body) == (200, {"status": "ready"})
    assert b"retry-after" not in headers
    down = (("b1", "connection refused"),)
    status, body, headers = poller.poll(down, retry_after=0.4)
    assert (status, body) == (503, {"status": "unavailable", "backends": {"b1": "unavailable"}})
    assert (headers[b"retry-after"], headers[b"retry-after-ms"]) == (b"1", b"400")
    assert headers[b"x-request-id"] == b"ready-2"
    # A cached answer that expires in 2.5 s; and the default when the runtime names none.
    headers = poller.poll(down, retry_after=2.5)[2]
    assert (headers[b"retry-after"], headers[b"retry-after-ms"]) == (b"3", b"2500")
    headers = poller.poll(down)[2]
    assert (headers[b"retry-after"], headers[b"retry-after-ms"]) == (b"1", b"1000")
    # An answer already expired (a cache of 0 s) still asks for a positive wait.
    headers = poller.poll(down, retry_after=-0.2)[2]
    assert (headers[b"retry-after"], headers[b"retry-after-ms"]) == (b"1", b"1")


def test_components_are_named_apart_from_backends_without_their_errors() -> None:
    refuse = Poller(gateway(shared_limits=True, on_limits_failure="refuse"))
    status, body, headers = refuse.poll(redis_unreachable=True, jwks_missing=True)
    assert status == 503
    assert body == {"status": "unavailable", "redis": "unavailable", "jwt": "no key set loaded"}
    assert headers[b"retry-after"] == b"1"
    status, body, _ = refuse.poll((("b2", "Traceback: secret=abc"),), jwks_missing=True)
    assert (status, body) == (
        503,
        {"status": "unavailable", "backends": {"b2": "unavailable"}, "jwt": "no key set loaded"},
    )

    local = Poller(gateway(shared_limits=True, on_limits_failure="local"))
    status, body, headers = local.poll(redis_unreachable=True)
    assert (status, body) == (
        200,
        {"status": "degraded", "redis": "unavailable, limits counted locally"},
    )
    assert b"retry-after" not in headers
    # Redis counted locally does not hide a backend that is down, nor a missing JWKS.
    status, body, _ = local.poll((("b1", "down"),), redis_unreachable=True)
    assert (status, body) == (
        503,
        {
            "status": "unavailable",
            "backends": {"b1": "unavailable"},
            "redis": "unavailable, limits counted locally",
        },
    )
    assert local.poll(redis_unreachable=True, jwks_missing=True)[0] == 503
    # A backend may be named "redis": it is a backend, and "local" does not excuse it.
    status, body, _ = local.poll((("redis", "connection refused"),))
    assert (status, body) == (503, {"status": "unavailable", "backends": {"redis": "unavailable"}})


def test_readiness_is_logged_on_changes_only() -> None:
    poller = Poller(gateway(shared_limits=True, on_limits_failure="local"))
    for _ in range(3):
        poller.poll()
    assert poller.take_logs() == []  # ready from the start: nothing to say
    for _ in range(5):
        assert poller.poll(redis_unreachable=True)[0] == 200
    assert poller.take_logs() == [
        ("warning", "redis unavailable; limits counted locally", {"was": "ready"})
    ]
    for problem in ("connection refused", "timed out", "connection refused"):
        assert poller.poll((("b1", problem),), redis_unreachable=True)[0] == 503
    # Its problem changing is not a change of what is failing.
    assert poller.take_logs() == [
        (
            "warning",
            "not ready",
            {"was": "degraded", "backends": {"b1": "connection refused"}, "redis": "unreachable"},
        )
    ]
    both = (("b2", "timed out"), ("b1", "down"))
    for failures in (both, both[::-1], both + both[:1]):  # the same set, in any order
        poller.poll(failures, redis_unreachable=True)
    poller.poll(both, jwks_missing=True)
    assert poller.take_logs() == [
        (
            "warning",
            "not ready",
            {
                "was": "unavailable",
                "backends": {"b1": "down", "b2": "timed out"},
                "redis": "unreachable",
            },
        ),
        (
            "warning",
            "not ready",
            {
                "was": "unavailable",
                "backends": {"b1": "down", "b2": "timed out"},
                "jwt": "no JWKS key set loaded yet",
            },
        ),
    ]
    for _ in range(3):
        assert poller.poll()[0] == 200
    assert poller.take_logs() == [("info", "ready again", {"was": "unavailable"})]
    poller.poll(redis_unreachable=True)
    poller.poll()
    assert poller.take_logs() == [
        ("warning", "redis unavailable; limits counted locally", {"was": "ready"}),
        ("info", "ready again", {"was": "degraded"}),
    ]


def test_readiness_logs_are_deterministic() -> None:
    """Two gateways fed the same checks log the same records (the state is the core's,
    not a clock's)."""
    script: list[tuple[Failures, dict[str, bool]]] = [
        ((), {}),
        ((("b1", "x"),), {}),
        ((("b1", "y"),), {}),
        ((), {"jwks_missing": True}),
        ((), {}),
    ]
    logs = []
    for _ in range(2):
        poller = Poller(gateway())
        for failures, checks in script:
            poller.poll(failures, **checks)
        logs.append(poller.take_logs())
    assert logs[0] == logs[1]
    assert [m for _, m, _ in logs[0]] == ["not ready", "not ready", "ready again"]
