"""The fair queue tried as a user would: a real server, a backend with 2 slots and
about 100 ms per request, one tenant keeping a deep queue."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2
import pytest

from tests.e2e.conftest import Launcher, ServerProcess

#: Two pieces 50 ms apart: about 100 ms a request.
CONFIG = """
[[roles]]
name = "light"
weight = 1

[[roles]]
name = "heavy"
weight = 3

[[backends]]
name = "scripted"
kind = "scripted"
models = ["slow"]
chunks = 2
chunk_delay = 0.05
max_concurrency = 2
max_queue = 512
"""
SERVICE = 0.1
DEEP = 100
BODY = b'{"model":"slow","messages":[{"role":"user","content":"x"}]}'


@pytest.fixture(scope="module")
def server(launch_server: Launcher) -> ServerProcess:
    return launch_server("fair", CONFIG)


def key(server: ServerProcess, name: str, role: str) -> str:
    secret = server.cli("keys", "create", "--name", name, "--role", role).stdout.strip()
    server.secrets.append(secret)
    return secret


def wait_for_keys(server: ServerProcess, *secrets: str) -> None:
    with httpx2.Client(base_url=server.base_url, timeout=10.0) as client:
        deadline = time.monotonic() + 10.0
        for secret in secrets:
            while client.get("/models", headers=_auth(secret)).status_code != 200:
                assert time.monotonic() < deadline, "the new keys were not loaded"
                server.pause()


def queued_up(server: ServerProcess, client: httpx2.Client, depth: int) -> None:
    """Wait (with a deadline) until ``GET /v1/queue`` shows ``depth`` queued."""
    deadline = time.monotonic() + 20.0
    while True:
        body = client.get("/queue", headers=_auth(server.key)).json()
        if sum(b["queued"] for b in body["backends"]) >= depth:
            return
        assert time.monotonic() < deadline, str(body["backends"][0])[:600]
        server.pause()


def _auth(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}", "content-type": "application/json"}


def _post(client: httpx2.Client, secret: str) -> int:
    return client.post("/chat/completions", content=BODY, headers=_auth(secret)).status_code


def _timed(client: httpx2.Client, secret: str) -> tuple[int, float]:
    start = time.monotonic()
    status = _post(client, secret)
    return status, time.monotonic() - start


def test_a_light_tenant_waits_a_few_service_times_not_behind_the_deep_queue(
    server: ServerProcess,
) -> None:
    deep, light = key(server, "deep", "light"), key(server, "one-at-a-time", "light")
    wait_for_keys(server, deep, light)
    limits = httpx2.Limits(max_connections=DEEP + 4)
    with (
        httpx2.Client(base_url=server.base_url, timeout=60.0, limits=limits) as client,
        ThreadPoolExecutor(DEEP) as pool,
    ):
        burst = [pool.submit(_timed, client, deep) for _ in range(DEEP)]
        queued_up(server, client, 20)  # the burst waits before light starts
        waits = []
        for _ in range(10):
            start = time.monotonic()
            assert _post(client, light) == 200
            waits.append(time.monotonic() - start)
        results = [f.result() for f in burst]
    assert [status for status, _ in results] == [200] * DEEP
    # The deep tenant's own requests wait for its queue; behind a FIFO the light
    # tenant's first request would wait about as long as the deep one's median.
    deep_median = sorted(t for _, t in results)[DEEP // 2]
    worst = max(waits)
    print(
        f"light tenant: p99 wait {worst:.3f} s over 10 requests "
        f"(service ~{SERVICE} s); the deep tenant's median {deep_median:.3f} s"
    )
    assert worst < deep_median / 2


def test_backlogged_tenants_of_weights_one_and_three_are_served_one_to_three(
    server: ServerProcess,
) -> None:
    one, three = key(server, "w1", "light"), key(server, "w3", "heavy")
    wait_for_keys(server, one, three)
    order: list[str] = []
    lock = threading.Lock()

    def send(client: httpx2.Client, secret: str, name: str) -> None:
        assert _post(client, secret) == 200
        with lock:
            order.append(name)

    limits = httpx2.Limits(max_connections=2 * 60 + 4)
    with (
        httpx2.Client(base_url=server.base_url, timeout=60.0, limits=limits) as client,
        ThreadPoolExecutor(2 * 60) as pool,
    ):
        futures = []
        for _ in range(60):
            futures.append(pool.submit(send, client, one, "w1"))
            futures.append(pool.submit(send, client, three, "w3"))
        for future in futures:
            future.result()
    # While both were backlogged: the heavier tenant's 60 last until about the 80th.
    window = order[:72]
    heavy, light = window.count("w3"), window.count("w1")
    print(f"served weight-3 : weight-1 = {heavy}:{light}")
    assert 2.0 <= heavy / light <= 4.5
