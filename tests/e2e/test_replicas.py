"""Three ``ostiary serve`` processes sharing one Redis and one key store behave as one
server for limits (issue 8's acceptance), tried as a user would, over real sockets.

Each burst is 300 concurrent chat requests spread over the three replicas with one
key. A bucket admits its capacity at once and refills continuously, so over a burst
lasting ``d`` seconds at most ``capacity + floor(d * capacity / 60) + 1`` requests
can pass (the +1: the burst's measured start is after the bucket's last refill
began). The refused ones are 429 with ``retry-after``. Then Redis is killed: the
replicas configured ``refuse`` answer 503 ``rate_limiter_unavailable`` (with
``retry-after``), the one configured ``local`` counts in process; none answers 500,
whether Redis dies between bursts or in the middle of one.
Restarted (empty), Redis is found again by every replica without restarting it, and
a new burst is shared again.
"""

from __future__ import annotations

import inspect
import math
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import h11
import orjson
import pytest
import trio

from ostiary.protocol.gateway import Gateway
from ostiary.runtime.keystore import open_key_store
from tests.e2e.conftest import KEY_RELOAD_INTERVAL, ServerProcess
from tests.runtime.redis_server import RedisServer

pytestmark = pytest.mark.skipif(
    "shared_limits" not in inspect.signature(Gateway).parameters,
    reason="the gateway does not judge limits in a shared store yet",
)

#: Requests per burst, spread evenly over the replicas.
BURST = 300
RPM = 50
TPM = 2000
#: max_tokens of each request of the tokens burst: its estimate is this plus the prompt's.
MAX_TOKENS = 100
#: Seconds any one request or wait may take (a hang guard, never a measure).
GUARD = 30.0
#: ``[redis] timeout``: generous, as three servers, Redis and this test share the
#: machine's cores; a burst must be judged in Redis, not fall back for slowness.
REDIS_TIMEOUT = 5.0
#: "slow" answers in 8 pieces a quarter second apart: no request of a burst ends (and
#: gives back what it reserved beyond its use) before the burst has been judged.
SCRIPTED = """
[[backends]]
name = "scripted"
kind = "scripted"
models = ["scripted"]

[[backends]]
name = "slow"
kind = "scripted"
models = ["slow"]
chunks = 8
chunk_delay = 0.25
max_concurrency = 400
"""


def replica_config(state_dir: Path, keys_db: Path, redis_url: str, on_failure: str) -> str:
    return f"""
[server]
host = "127.0.0.1"
port = 0
state_dir = "{state_dir}"
log_format = "json"
access_log = false
drain_timeout = 2.0
max_connections = 1024

[auth]
keys_db = "{keys_db}"
key_reload_interval = {KEY_RELOAD_INTERVAL}

[redis]
url = "{redis_url}"
on_failure = "{on_failure}"
timeout = {REDIS_TIMEOUT}

[[roles]]
name = "tenant"
requests_per_minute = {RPM}

[[roles]]
name = "metered"
tokens_per_minute = {TPM}

{SCRIPTED}"""


def make_replica(root: Path, name: str, config: str) -> ServerProcess:
    """A replica's directory and config; :func:`spawn` starts it."""
    workdir = root / name
    workdir.mkdir()
    state_dir = workdir / "state"
    config_path = workdir / "cfg.toml"
    config_path.write_text(config.replace("STATE", str(state_dir)), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    return ServerProcess(name, None, workdir, config_path, state_dir, workdir / "stderr.log", env)  # type: ignore[arg-type]


def spawn(server: ServerProcess) -> subprocess.Popen[bytes]:
    with server.stderr_path.open("wb") as stderr:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ostiary.runtime.cli",
                "serve",
                "--config",
                str(server.config_path),
            ],
            cwd=server.workdir,
            env=server.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )


class Cluster:
    def __init__(
        self, redis: RedisServer, replicas: Sequence[ServerProcess], keys: dict[str, str]
    ) -> None:
        self.redis = redis
        self.replicas = list(replicas)
        #: One key per test, all made before the replicas start (no reload to wait for).
        self.keys = keys


#: The keys the tests use, by name, and their roles.
KEYS = {"rpm": "tenant", "tpm": "metered", "midburst": "tenant", "outage": "tenant"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("replicas")
    keys_db = root / "keys.sqlite3"
    redis = RedisServer()
    redis.start()
    replicas: list[ServerProcess] = []
    keys: dict[str, str] = {}
    try:
        for i, on_failure in enumerate(("refuse", "refuse", "local")):
            config = replica_config(Path("STATE"), keys_db, redis.url, on_failure)
            replicas.append(make_replica(root, f"r{i}", config))
        store = open_key_store(keys_db)  # as `ostiary keys create` does, without a process each
        for name, role in KEYS.items():  # a store with keys: no bootstrap key is made
            keys[name] = store.create(name, role)[1]
        for replica in replicas:
            replica.process = spawn(replica)
        for replica in replicas:
            replica.wait_until_listening(timeout=60)  # three start at once on shared cores
        yield Cluster(redis, replicas, keys)
    finally:
        codes = [replica.stop() for replica in replicas if replica.process is not None]
        redis.kill()
    assert codes == [0] * len(replicas)
    for replica in replicas:
        log = replica.log_text()
        assert "unhandled error" not in log
        assert not any(secret in log for secret in keys.values())


async def request(
    port: int, method: str, target: str, key: str, body: bytes = b""
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 exchange on its own connection."""
    headers = [("host", "127.0.0.1"), ("connection", "close")]
    if key:
        headers.append(("authorization", f"Bearer {key}"))
    if body:
        headers += [("content-type", "application/json"), ("content-length", str(len(body)))]
    conn = h11.Connection(h11.CLIENT)
    with trio.fail_after(GUARD):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            out = conn.send(h11.Request(method=method, target=target, headers=headers))
            if body:
                out += conn.send(h11.Data(data=body))
            out += conn.send(h11.EndOfMessage())
            await stream.send_all(out)
            status, got, chunks = 0, {}, []
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    got = {k.decode(): v.decode() for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    return status, got, b"".join(chunks)


def chat(max_tokens: int | None = None, model: str = "scripted") -> bytes:
    body: dict[str, object] = {
        "model": model,
        "messages": [{"role": "user", "content": "hello there"}],
    }
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return orjson.dumps(body)


async def burst(
    cluster: Cluster, key: str, body: bytes, replicas: Sequence[ServerProcess] | None = None
) -> tuple[list[tuple[int, dict[str, str], bytes]], float]:
    """BURST concurrent requests over ``replicas``; the answers and the burst's span."""
    targets = list(replicas or cluster.replicas)
    results: list[tuple[int, dict[str, str], bytes]] = []

    async def one(i: int) -> None:
        port = targets[i % len(targets)].port
        results.append(await request(port, "POST", "/v1/chat/completions", key, body))

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for i in range(BURST):
            nursery.start_soon(one, i)
    return results, trio.current_time() - start


async def wait_ready(cluster: Cluster) -> None:
    """Until every replica's /readyz is 200: it reaches Redis again (a bounded poll
    paced by waiting on the replica's process, as the e2e fixtures do)."""
    with trio.fail_after(GUARD):
        for replica in cluster.replicas:
            while (await request(replica.port, "GET", "/readyz", ""))[0] != 200:
                await trio.to_thread.run_sync(replica.pause, 0.05)


async def readiness_after_the_kill(replica: ServerProcess) -> tuple[int, dict[str, str], bytes]:
    """/readyz once it has looked again: it checks at most once a second, so for up
    to a second after Redis went it may still answer the "ready" it found before
    (a bounded poll, paced as :func:`wait_ready`)."""
    with trio.fail_after(GUARD):
        while True:
            answer = await request(replica.port, "GET", "/readyz", "")
            if b"unavailable" in answer[2]:
                return answer
            await trio.to_thread.run_sync(replica.pause, 0.05)


def most_admitted(capacity: int, span: float) -> int:
    return capacity + math.floor(span * capacity / 60) + 1


def assert_refused_properly(results: Sequence[tuple[int, dict[str, str], bytes]]) -> None:
    for status, headers, body in results:
        assert status in (200, 429), (status, body[:300])
        if status == 429:
            assert int(headers["retry-after"]) >= 1
            assert orjson.loads(body)["error"]["code"] == "rate_limit_exceeded"


async def test_requests_per_minute_are_shared_exactly(cluster: Cluster) -> None:
    key = cluster.keys["rpm"]
    results, span = await burst(cluster, key, chat())
    assert_refused_properly(results)
    ok = sum(1 for status, _, _ in results if status == 200)
    assert RPM <= ok <= most_admitted(RPM, span), (ok, span)
    served = {h["x-request-id"][:8] for s, h, _ in results if s == 200}
    assert len(served) > 1  # the budget was spent on several replicas, not one


async def test_tokens_per_minute_are_shared_within_one_estimate(cluster: Cluster) -> None:
    """Every request reserves the same estimate ``e`` (its prompt's plus max_tokens)
    and none ends during the burst, so ``S`` admitted requests hold ``S * e`` tokens:
    at most the limit plus what refilled, and more than the limit less one ``e``
    (the first refusal found less than ``e`` left)."""
    key = cluster.keys["tpm"]
    results, span = await burst(cluster, key, chat(MAX_TOKENS, model="slow"))
    assert_refused_properly(results)
    admitted = [h for s, h, _ in results if s == 200]
    assert {int(h["x-ratelimit-limit-tokens"]) for h in admitted} == {TPM}
    # The first admission found the bucket full: what it left is the limit less e.
    estimate = TPM - max(int(h["x-ratelimit-remaining-tokens"]) for h in admitted)
    assert MAX_TOKENS < estimate < MAX_TOKENS + 50
    held = len(admitted) * estimate
    assert TPM - estimate < held <= most_admitted(TPM, span) + estimate, (held, span)


async def test_redis_killed_in_the_middle_of_a_burst(cluster: Cluster) -> None:
    """A stream of requests, 30 in flight at a time; Redis dies once a third are
    answered: every answer is still a 200, a 429 or (from the replicas that refuse) a
    503 with retry-after; the one counting locally never answers 503; none answers
    500 or hangs."""
    key = cluster.keys["midburst"]
    results: list[tuple[int, int, dict[str, str], bytes]] = []
    third = trio.Event()
    in_flight = trio.CapacityLimiter(30)

    async def one(i: int) -> None:
        replica = i % len(cluster.replicas)
        port = cluster.replicas[replica].port
        async with in_flight:
            answer = await request(port, "POST", "/v1/chat/completions", key, chat())
        results.append((replica, *answer))
        if len(results) >= BURST // 3:
            third.set()

    async def kill() -> None:
        await third.wait()
        cluster.redis.kill()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(kill)
            for i in range(BURST):
                nursery.start_soon(one, i)
        assert len(results) == BURST
        unavailable = 0
        for replica, status, headers, body in results:
            if replica < 2 and status == 503:
                unavailable += 1
                assert orjson.loads(body)["error"]["code"] == "rate_limiter_unavailable"
                assert int(headers["retry-after"]) >= 1
            else:
                assert_refused_properly([(status, headers, body)])
        assert unavailable > 0  # the kill came while the refusing replicas still asked
        admitted = sum(1 for _, status, _, _ in results if status == 200)
        assert admitted >= RPM  # the shared budget, then the local replica's own
    finally:
        cluster.redis.restart()
    await wait_ready(cluster)


async def test_redis_killed_and_restarted(cluster: Cluster) -> None:
    key = cluster.keys["outage"]
    cluster.redis.kill()
    refusing, local = cluster.replicas[:2], cluster.replicas[2]
    results, _ = await burst(cluster, key, chat(), refusing)
    for status, headers, body in results:
        assert status == 503, (status, body[:300])
        assert orjson.loads(body)["error"]["code"] == "rate_limiter_unavailable"
        assert int(headers["retry-after"]) >= 1
    results, span = await burst(cluster, key, chat(), [local])
    assert_refused_properly(results)
    ok = sum(1 for status, _, _ in results if status == 200)
    assert RPM <= ok <= most_admitted(RPM, span)  # counted in that process alone
    ready = [await readiness_after_the_kill(r) for r in cluster.replicas]
    assert [status for status, _, _ in ready] == [503, 503, 200]  # "local": degraded, not out
    for _, headers, body in ready[:2]:
        assert orjson.loads(body) == {"status": "unavailable", "redis": "unavailable"}
        assert int(headers["retry-after"]) >= 1 and int(headers["retry-after-ms"]) >= 1
    assert orjson.loads(ready[2][2]) == {
        "status": "degraded",
        "redis": "unavailable, limits counted locally",
    }

    cluster.redis.restart()  # empty: the key's bucket is full again, and shared
    await wait_ready(cluster)
    results, span = await burst(cluster, key, chat())
    assert_refused_properly(results)
    ok = sum(1 for status, _, _ in results if status == 200)
    assert RPM <= ok <= most_admitted(RPM, span), (ok, span)
