"""What the gateway shows of its queues, and what it guesses a request costs.

- :func:`estimate_cost`: a request's cost in tokens when it is submitted, before any
  usage is known (the fair queue's charge; real usage replaces it at the end);
- :class:`WaitWindow`: a bounded ring of recent queue waits of one backend, for the
  p50 / p99 of ``GET /v1/queue``;
- :func:`queue_body`: the JSON of ``GET /v1/queue``;
- :func:`peer_allowed`: whether a socket peer is inside ``[server] metrics_allow``.

All pure: ``ipaddress`` is the standard library's, no I/O.
"""

from __future__ import annotations

import ipaddress
import math
from collections import deque
from collections.abc import Iterable, Mapping

import orjson

from .actions import BackendCall
from .exchange import BackendPolicy
from .scheduler import Scheduler

__all__ = [
    "MAX_COST",
    "Network",
    "WaitWindow",
    "estimate_cost",
    "parse_networks",
    "peer_allowed",
    "queue_body",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The most one request is charged at submission: bounds ``C``, the largest cost in
#: the fair queue's fairness and latency bounds.
MAX_COST = 1 << 20


def estimate_cost(call: BackendCall, body_bytes: int) -> float:
    """Tokens a request is charged when it is queued: its prompt, its body's bytes / 4
    (about four bytes a token in English; JSON's own syntax makes it a slight
    overestimate), at most :data:`MAX_COST`. Its output is charged as real usage when
    it ends, as the virtual token counter charges output as it is generated: charging
    a guess of the output up front, then refunding it, would make every running flow
    look dearer than it is and erase the weights between backlogged flows."""
    del call
    return float(min(body_bytes // 4, MAX_COST))


class WaitWindow:
    """The queue waits (seconds, 0 for a request that found a free slot) of the last
    ``size`` dispatches of one backend; percentiles count those of the last
    ``window`` seconds. Adding is O(1); a percentile sorts at most ``size`` values."""

    __slots__ = ("_waits", "window")

    def __init__(self, size: int = 1024, window: float = 60.0) -> None:
        if size < 1 or not window > 0:
            raise ValueError("size must be >= 1 and window > 0")
        self.window = window
        self._waits: deque[tuple[float, float]] = deque(maxlen=size)

    def add(self, now: float, wait: float) -> None:
        self._waits.append((now, wait))

    def recent(self, now: float) -> list[float]:
        """The waits of dispatches within the window, sorted."""
        since = now - self.window
        return sorted(wait for at, wait in self._waits if at >= since)


def percentile(ordered: list[float], q: float) -> float | None:
    """The nearest-rank ``q`` quantile of sorted values (None if there are none)."""
    if not ordered:
        return None
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def queue_body(
    policies: Mapping[str, BackendPolicy],
    schedulers: Mapping[str, Scheduler],
    waits: Mapping[str, WaitWindow],
    now: float,
    ended: Iterable[tuple[object, ...]] = (),
) -> bytes:
    """``GET /v1/queue``: per backend, its limits, what runs and waits (per principal
    too), the recent wait percentiles and the service rate; and the requests that
    ended last, newest first (``ended``: id, created, endpoint, model, status,
    duration, principal)."""
    backends = []
    for name, policy in policies.items():
        snap = schedulers[name].snapshot(now)
        window = waits[name]
        recent = window.recent(now)
        backends.append(
            {
                "name": name,
                "scheduler": policy.scheduler,
                "max_concurrency": policy.max_concurrency,
                "max_queue": policy.max_queue,
                "queued": snap.queued,
                "running": snap.running,
                "service_rate": round(snap.service_rate, 6),
                "estimated_wait": round(snap.estimated_wait, 6),
                "wait": {
                    "window_seconds": window.window,
                    "samples": len(recent),
                    "p50": percentile(recent, 0.50),
                    "p99": percentile(recent, 0.99),
                },
                "principals": [
                    {"principal": p, "queued": q, "running": r} for p, q, r in snap.principals
                ],
            }
        )
    last = [dict(zip(_RECENT_FIELDS, r, strict=True)) for r in reversed(list(ended))]
    return orjson.dumps({"object": "queue", "backends": backends, "recent": last})


_RECENT_FIELDS = (
    "request_id",
    "created",
    "endpoint",
    "model",
    "status",
    "duration_ms",
    "principal",
)


def parse_networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    """``[server] metrics_allow`` entries as networks; ValueError names a bad one."""
    networks: list[Network] = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError:
            raise ValueError(f"{cidr!r} is not an address or network (CIDR)") from None
    return tuple(networks)


def peer_allowed(peer: str, networks: tuple[Network, ...]) -> bool:
    """Whether the socket peer ``peer`` (an IP address, maybe with an IPv6 zone) is
    inside one of ``networks``; never for a peer that is not an address."""
    if not networks or not peer:
        return False
    try:
        address = ipaddress.ip_address(peer.partition("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)
