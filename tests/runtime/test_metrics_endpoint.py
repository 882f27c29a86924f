"""``GET /metrics`` and ``GET /v1/queue`` end to end in-process: HTTP bytes in, the
core deciding access, the runtime rendering the tally, bytes out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from ostiary.backends.scripted import ScriptedBackend, ScriptedSettings
from ostiary.protocol.exchange import BackendPolicy
from ostiary.protocol.gateway import Gateway, ModelRoute
from ostiary.protocol.visibility import parse_networks
from ostiary.runtime.driver import Driver
from tests.conftest import USER_SECRET, auth_headers, chat_body, key_table
from tests.runtime.inprocess import Connect, in_memory
from tests.runtime.test_http import Client

PROMETHEUS = b"text/plain; version=0.0.4; charset=utf-8"


@asynccontextmanager
async def serving() -> AsyncIterator[tuple[Connect, Driver]]:
    backend = ScriptedBackend(ScriptedSettings(models=("s",), chunks=4))
    gateway = Gateway(
        routes=[ModelRoute("s", "scripted")],
        keys=key_table(),
        backends=[BackendPolicy(name="scripted", max_concurrency=2, max_queue=4)],
        metrics_allow=parse_networks(["10.0.0.0/8"]),
    )
    driver = Driver(gateway, {"scripted": backend})
    async with in_memory(driver) as connect:
        yield connect, driver


def headers_for(secret: str | None) -> dict[str, str]:
    if secret is None:
        return {}
    return {"authorization": f"Bearer {secret}"}


ADMIN = auth_headers()[0][1].decode().removeprefix("Bearer ")


async def get(client: Client, target: str, secret: str | None = ADMIN) -> Any:
    await client.request("GET", target, b"", **headers_for(secret))
    return await client.response()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, by name and sorted labels (the parser must accept
    the whole text)."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return out


CHAT_200 = (
    "ostiary_requests_total",
    (("endpoint", "chat.completions"), ("model", "s"), ("status", "200")),
)


async def test_metrics_parse_and_move_as_requests_are_served(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving() as (connect, _):
        client = await connect("192.168.1.1")
        status, headers, body = await get(client, "/metrics")
        assert status == 200 and headers[b"content-type"] == PROMETHEUS
        before = samples(body.decode())
        assert CHAT_200 not in before
        assert before["ostiary_queue_depth", (("backend", "scripted"),)] == 0
        assert ("process_cpu_seconds_total", ()) in before
        for _ in range(2):
            await client.request(
                target="/v1/chat/completions", body=chat_body(model="s"), **headers_for(ADMIN)
            )
            assert (await client.response())[0] == 200
        after = samples((await get(client, "/metrics"))[2].decode())
        assert after[CHAT_200] == 2
        count = (
            "ostiary_request_duration_seconds_count",
            (("endpoint", "chat.completions"), ("model", "s")),
        )
        assert after[count] == 2
        prompt = after["ostiary_tokens_total", (("kind", "prompt"), ("model", "s"))]
        completion = after["ostiary_tokens_total", (("kind", "completion"), ("model", "s"))]
        assert prompt > 0 and completion > 0
        # The first scrape itself was counted when it ended.
        metrics_200 = (
            "ostiary_requests_total",
            (("endpoint", "metrics"), ("model", ""), ("status", "200")),
        )
        assert after[metrics_200] == 1


async def test_metrics_access(autojump_clock: trio.testing.MockClock) -> None:
    async with serving() as (connect, _):
        client = await connect("192.168.1.1")
        status, _, body = await get(client, "/metrics", USER_SECRET)
        assert (status, orjson.loads(body)["error"]["code"]) == (403, "permission_denied")
        status, _, body = await get(client, "/metrics", None)
        assert (status, orjson.loads(body)["error"]["code"]) == (401, "missing_api_key")
        # A client inside metrics_allow needs no key; it sees the 401 counted.
        scraper = await connect("10.1.2.3")
        status, headers, body = await get(scraper, "/metrics", None)
        assert status == 200 and headers[b"content-type"] == PROMETHEUS
        failures = samples(body.decode())
        assert failures["ostiary_auth_failures_total", (("reason", "missing_api_key"),)] == 1


async def test_queue_over_http_is_admin_only(autojump_clock: trio.testing.MockClock) -> None:
    async with serving() as (connect, _):
        client = await connect("10.1.2.3")
        status, _, body = await get(client, "/v1/queue", None)
        assert status == 401  # metrics_allow opens /metrics only
        status, _, body = await get(client, "/v1/queue", USER_SECRET)
        assert (status, orjson.loads(body)["error"]["code"]) == (403, "permission_denied")
        status, headers, body = await get(client, "/v1/queue")
        assert status == 200 and headers[b"content-type"] == b"application/json"
        (backend,) = orjson.loads(body)["backends"]
        assert (backend["name"], backend["queued"], backend["running"]) == ("scripted", 0, 0)


async def test_retrieving_a_model_is_labelled_models(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # DESIGN §5a: the endpoint names of metrics labels are those of roles, and
    # `models` covers both listing and retrieving models.
    async with serving() as (connect, _):
        client = await connect("192.168.1.1")
        assert (await get(client, "/v1/models"))[0] == 200
        assert (await get(client, "/v1/models/s"))[0] == 200
        assert (await get(client, "/v1/models/nope"))[0] == 404
        after = samples((await get(client, "/metrics"))[2].decode())
        labels = {dict(k[1]).get("endpoint") for k in after if k[0] == "ostiary_requests_total"}
        assert "models.retrieve" not in labels
        ok = ("ostiary_requests_total", (("endpoint", "models"), ("model", ""), ("status", "200")))
        missing = (
            "ostiary_requests_total",
            (("endpoint", "models"), ("model", ""), ("status", "404")),
        )
        assert after[ok] == 2 and after[missing] == 1
