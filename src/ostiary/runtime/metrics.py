"""The runtime's tally of the core's :class:`~ostiary.protocol.actions.Count`
actions: counters (``*_total``) and histograms (everything else), keyed by name and
labels. Label values are bounded by the core (model ids come from the config), so
the tally's size is bounded by the config, not by clients.
"""

from __future__ import annotations

import bisect

from ostiary.protocol.actions import Count

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

    def observe(self, count: Count) -> None:
        key = (count.name, count.labels)
        if count.name.endswith("_total"):
            self.counters[key] = self.counters.get(key, 0.0) + count.value
            return
        histogram = self.histograms.get(key)
        if histogram is None:
            histogram = self.histograms[key] = Histogram(len(self.bounds))
        histogram.buckets[bisect.bisect_left(self.bounds, count.value)] += 1
        histogram.sum += count.value
        histogram.count += 1
