"""What one ``/metrics`` scrape costs to render (prometheus-client over the tally),
as the number of label sets grows, and what ``/v1/queue`` costs with many principals.

Fills a :class:`~ostiary.runtime.metrics.Metrics` tally with ``models`` models times
four endpoints times five statuses (a counter and a histogram each, plus tokens and
time to first token), then times :meth:`Exposition.render`; and times the core's
``/v1/queue`` body with ``principals`` keys queued on one fair queue.

    python bench/metrics_render.py [--models 1 10 100] [--principals 10 1000] [--runs 20]
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

from ostiary.protocol.actions import Count
from ostiary.protocol.auth import KeyTable
from ostiary.protocol.exchange import BackendPolicy
from ostiary.protocol.gateway import Gateway, ModelRoute
from ostiary.protocol.scheduler import Ticket
from ostiary.protocol.visibility import WaitWindow, queue_body
from ostiary.runtime.exposition import Exposition
from ostiary.runtime.metrics import Metrics

ENDPOINTS = ("chat.completions", "completions", "embeddings", "models")
STATUSES = ("200", "400", "404", "429", "503")


def tally(models: int) -> tuple[Metrics, Gateway]:
    metrics = Metrics()
    routes = [ModelRoute(f"model-{i}", f"backend-{i % 4}") for i in range(models)]
    gateway = Gateway(routes=routes, keys=KeyTable())
    for route in routes:
        model = ("model", route.model)
        metrics.observe(Count("ostiary_time_to_first_token_seconds", (model,), 0.2))
        for kind in ("prompt", "completion"):
            metrics.observe(Count("ostiary_tokens_total", (model, ("kind", kind)), 100))
        for endpoint in ENDPOINTS:
            labels = (("endpoint", endpoint), model)
            metrics.observe(Count("ostiary_request_duration_seconds", labels, 0.5))
            for status in STATUSES:
                metrics.observe(Count("ostiary_requests_total", (*labels, ("status", status))))
    return metrics, gateway


def best_of(runs: int, fn: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--principals", type=int, nargs="+", default=[10, 1000])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    for models in args.models:
        metrics, gateway = tally(models)
        exposition = Exposition(metrics, gateway)
        size = len(exposition.render())
        seconds = best_of(args.runs, exposition.render)
        print(f"/metrics  models={models:4d}  {size / 1024:8.1f} KiB  {seconds * 1e3:8.2f} ms")
    for principals in args.principals:
        policy = BackendPolicy(name="b", max_concurrency=4, max_queue=principals * 2)
        gateway = Gateway(routes=[ModelRoute("m", "b")], keys=KeyTable(), backends=[policy])
        scheduler = gateway.scheduler("b")
        for i in range(principals * 2):
            scheduler.submit(Ticket(f"r{i}", principal=f"key{i % principals}"), 0.0)
        window = WaitWindow()
        for i in range(1024):
            window.add(1.0, i / 1000)
        body = functools.partial(queue_body, {"b": policy}, {"b": scheduler}, {"b": window}, 1.0)
        seconds = best_of(args.runs, body)
        print(f"/v1/queue principals={principals:5d}  {seconds * 1e3:8.2f} ms")


if __name__ == "__main__":
    main()
