"""The runtime's tally: an ended exchange's one action counts as its Counts would."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ostiary.protocol.actions import Count, CountExchange
from ostiary.runtime.metrics import Metrics

exchanges = st.builds(
    CountExchange,
    endpoint=st.sampled_from(["chat.completions", "embeddings", "none"]),
    model=st.sampled_from(["", "m", "n"]),
    status=st.sampled_from([200, 401, 429, 499, 503]),
    duration=st.floats(min_value=0, max_value=400, allow_nan=False),
    prompt_tokens=st.integers(min_value=0, max_value=10**6),
    completion_tokens=st.integers(min_value=0, max_value=10**6),
    auth_failure=st.none() | st.sampled_from(["invalid_api_key", "missing_api_key"]),
)


def tally(metrics: Metrics) -> tuple[object, ...]:
    """Everything a scrape shows, in the order it shows it."""
    return (
        list(metrics.counters.items()),
        [(k, h.buckets, h.sum, h.count) for k, h in metrics.histograms.items()],
    )


@given(st.lists(exchanges, max_size=12))
def test_an_exchange_counts_as_its_counts(ended: list[CountExchange]) -> None:
    one, each = Metrics(), Metrics()
    for e in ended:
        one.observe_exchange(e)
        for count in e.counts():
            each.observe(count)
    assert tally(one) == tally(each)


def test_counts_of_an_exchange() -> None:
    ended = CountExchange("chat.completions", "m", 200, 0.5, 7, 0)
    labels = (("endpoint", "chat.completions"), ("model", "m"))
    assert ended.counts() == [
        Count("ostiary_requests_total", (*labels, ("status", "200"))),
        Count("ostiary_request_duration_seconds", labels, 0.5),
        Count("ostiary_tokens_total", (("model", "m"), ("kind", "prompt")), 7),
    ]
    refused = CountExchange("none", "", 401, 0.1, 3, 3, "missing_api_key")
    assert [c.name for c in refused.counts()] == [
        "ostiary_requests_total",
        "ostiary_request_duration_seconds",
        "ostiary_auth_failures_total",
    ]
