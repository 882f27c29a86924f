"""What ``/readyz`` answers: ready, degraded (Redis away, limits counted locally) or
unavailable, by component; and the log record of each change, with the problems in
full for operators.
"""

from __future__ import annotations

import orjson

from .actions import Action, Log
from .events import ReadinessChecked
from .exchange import Exchange
from .responses import retry_after_headers

__all__ = ["Readiness", "ReadinessState"]

#: What ``/readyz`` last found: (status, failing backends, Redis down, no JWKS).
ReadinessState = tuple[str, tuple[str, ...], bool, bool]
_READY: ReadinessState = ("ready", (), False, False)


class Readiness:
    """The gateway's readiness: what the last check found (its changes are logged)."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last = _READY

    def answer(self, exchange: Exchange, event: ReadinessChecked, local: bool) -> list[Action]:
        """The answer to ``/readyz``: 200 while serving, 503 (with ``retry-after``)
        while not. ``local``: limits are counted in this process while Redis is away."""
        backends = tuple(sorted({name for name, _ in event.failures}))
        redis, jwt = event.redis_unreachable, event.jwks_missing
        # With "local", limits are counted in this process until Redis is back: still
        # serving, so a load balancer should keep sending (every replica would go at once).
        if backends or jwt or (redis and not local):
            status = "unavailable"
        else:
            status = "degraded" if redis else "ready"
        # Anyone may ask: components by name and state, never their error text.
        body: dict[str, object] = {"status": status}
        if backends:
            body["backends"] = dict.fromkeys(backends, "unavailable")
        if redis:
            body["redis"] = "unavailable, limits counted locally" if local else "unavailable"
        if jwt:
            body["jwt"] = "no key set loaded"
        if status == "unavailable":
            wait = retry_after_headers(event.retry_after)
            actions: list[Action] = [exchange.respond(503, orjson.dumps(body), extra=wait)]
        else:
            actions = [exchange.respond(200, orjson.dumps(body))]
        # Logged on a change only: a load balancer polls every second.
        readiness = (status, backends, redis, jwt)
        if readiness != self.last:
            actions.append(_readiness_log(self.last[0], readiness, event))
            self.last = readiness
        return actions


def _readiness_log(was: str, now: ReadinessState, event: ReadinessChecked) -> Log:
    """The record of a change of readiness: the problems in full (for operators)."""
    status, backends, redis, jwt = now
    if status == "ready":
        return Log("info", "ready again", {"was": was})
    if status == "degraded":
        return Log("warning", "redis unavailable; limits counted locally", {"was": was})
    fields: dict[str, object] = {"was": was}
    if backends:
        fields["backends"] = dict(event.failures)
    if redis:
        fields["redis"] = "unreachable"
    if jwt:
        fields["jwt"] = "no JWKS key set loaded yet"
    return Log("warning", "not ready", fields)
