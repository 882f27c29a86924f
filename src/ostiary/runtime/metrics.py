"""The runtime's tally of the core's :class:`~ostiary.protocol.actions.Count` and
:class:`~ostiary.protocol.actions.CountExchange` actions: counters (``*_total``) and
histograms (everything else), keyed by name and labels. Label values are bounded by
the core (model ids come from the config), so the tally's size is bounded by the
config, not by clients.
"""

from __future__ import annotations

import bisect

from ostiary.protocol.actions import Count, CountExchange

__all__ = ["DEFAULT_BUCKETS", "Histogram", "Metrics"]

#: Upper bounds (seconds) of histogram buckets: 5 ms to 5 min.
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

Key = tuple[str, tuple[tuple[str, str], ...]]


class Histogram:
    """Counts per bucket (the last one is +Inf), the sum and the count."""

    __slots__ = ("buckets", "count", "sum")

    def __init__(self, size: int) -> None:
        self.buckets = [0] * (size + 1)
        self.sum = 0.0
        self.count = 0


class Metrics:
    def __init__(self, buckets: tuple[float, ...] = DEFAULT_BUCKETS) -> None:
        self.bounds = buckets
        self.counters: dict[Key, float] = {}
        self.histograms: dict[Key, Histogram] = {}
        #: By (endpoint, model, status), bounded as the labels are: the keys of an
        #: ended exchange's request count, duration and token counts.
        self._exchange_keys: dict[tuple[str, str, int], tuple[Key, Key, Key, Key]] = {}

    def observe(self, count: Count) -> None:
        key = (count.name, count.labels)
        if count.name.endswith("_total"):
            self.counters[key] = self.counters.get(key, 0.0) + count.value
            return
        self._sample(key, count.value)

    def _sample(self, key: Key, value: float) -> None:
        histogram = self.histograms.get(key)
        if histogram is None:
            histogram = self.histograms[key] = Histogram(len(self.bounds))
        histogram.buckets[bisect.bisect_left(self.bounds, value)] += 1
        histogram.sum += value
        histogram.count += 1

    def observe_exchange(self, ended: CountExchange) -> None:
        """The same tally as observing each of ``ended.counts()``, in one go."""
        keys = self._exchange_keys.get((ended.endpoint, ended.model, ended.status))
        if keys is None:
            keys = self._keys_of(ended)
        requests, duration, prompt, completion = keys
        counters = self.counters
        counters[requests] = counters.get(requests, 0.0) + 1.0
        self._sample(duration, ended.duration)
        if ended.model:
            if ended.prompt_tokens:
                counters[prompt] = counters.get(prompt, 0.0) + ended.prompt_tokens
            if ended.completion_tokens:
                counters[completion] = counters.get(completion, 0.0) + ended.completion_tokens
        if ended.auth_failure is not None:
            key = ("ostiary_auth_failures_total", (("reason", ended.auth_failure),))
            counters[key] = counters.get(key, 0.0) + 1.0

    def _keys_of(self, ended: CountExchange) -> tuple[Key, Key, Key, Key]:
        labels = (("endpoint", ended.endpoint), ("model", ended.model))
        keys = (
            ("ostiary_requests_total", (*labels, ("status", str(ended.status)))),
            ("ostiary_request_duration_seconds", labels),
            ("ostiary_tokens_total", (("model", ended.model), ("kind", "prompt"))),
            ("ostiary_tokens_total", (("model", ended.model), ("kind", "completion"))),
        )
        self._exchange_keys[ended.endpoint, ended.model, ended.status] = keys
        return keys
