"""Roles and limits tried as a user would: a real server with ``[[roles]]`` and
limits, driven by the official SDK in strict mode."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx2
import openai
import pytest

from tests.e2e import spec
from tests.e2e.conftest import Api, Launcher, ServerProcess

ROLES = """failed_auth_per_minute = 3

[[roles]]
name = "tenant"
models = ["scripted"]
endpoints = ["chat.completions", "models"]
max_output_tokens = 64
requests_per_minute = 120
max_concurrent = 8

[[backends]]
name = "scripted"
kind = "scripted"
models = ["scripted", "scripted-embed"]
embedding_models = ["scripted-embed"]
"""
MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "user", "content": "hello"}
]


@pytest.fixture(scope="module")
def server(launch_server: Launcher) -> ServerProcess:
    return launch_server("access", ROLES)


@pytest.fixture(scope="module")
def api(server: ServerProcess, openapi: spec.OpenAPI) -> Iterator[Api]:
    api = Api(server, openapi)
    yield api
    api.close()


@pytest.fixture(scope="module")
def tenant(server: ServerProcess) -> str:
    created = server.cli("keys", "create", "--name", "t", "--role", "tenant")
    secret = created.stdout.strip()
    server.secrets.append(secret)
    server.wait_for_log("reloaded API keys", 1, 10.0)
    return secret


def test_unknown_role_is_refused_by_the_cli_naming_the_configured_ones(
    server: ServerProcess,
) -> None:
    result = server.cli("keys", "create", "--name", "x", "--role", "nope", check=False)
    assert result.returncode == 1
    assert "admin, tenant, user" in result.stderr


def test_the_role_sees_only_its_models_and_endpoints(api: Api, tenant: str) -> None:
    client = api.sdk(tenant)
    assert [m.id for m in client.models.list()] == ["scripted"]
    with pytest.raises(openai.PermissionDeniedError) as denied:
        client.embeddings.create(model="scripted-embed", input="x")
    assert denied.value.code == "permission_denied"
    with pytest.raises(openai.NotFoundError) as hidden:
        client.chat.completions.create(model="scripted-embed", messages=MESSAGES)
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert hidden.value.code == unknown.value.code == "model_not_found"
    assert hidden.value.message.replace("scripted-embed", "?") == unknown.value.message.replace(
        "no-such-model", "?"
    )
    with pytest.raises(openai.BadRequestError) as capped:
        client.chat.completions.create(model="scripted", messages=MESSAGES, max_tokens=65)
    assert capped.value.param == "max_tokens"


def test_sdk_sees_rate_limit_error_and_retries_after_retry_after_ms(
    api: Api, tenant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = api.sdk(tenant)
    ok = client.chat.completions.with_raw_response.create(model="scripted", messages=MESSAGES)
    assert ok.headers["x-ratelimit-limit-requests"] == "120"
    # Spend the burst (the bucket holds 120 requests; one refills every 0.5 s), until
    # a 429; then the SDK's own request is refused too, unless a refill came between
    # (a slow machine): then spend again.
    body = b'{"model":"scripted","messages":[{"role":"user","content":"x"}]}'
    headers = {"authorization": f"Bearer {tenant}", "content-type": "application/json"}

    def spend() -> None:
        statuses = []
        while 429 not in statuses:
            post = api.http.post("/chat/completions", content=body, headers=headers)
            statuses.append(post.status_code)
            assert post.status_code in (200, 429) and len(statuses) <= 1000

    limited: openai.RateLimitError | None = None
    for _ in range(20):
        spend()
        try:
            client.chat.completions.create(model="scripted", messages=MESSAGES)
        except openai.RateLimitError as error:
            limited = error
            break
    assert limited is not None, "the SDK's request always found a refilled bucket"
    response = limited.response
    assert limited.code == "rate_limit_exceeded"
    assert response.headers["x-ratelimit-remaining-requests"] == "0"
    ms = int(response.headers["retry-after-ms"])
    assert 0 < ms <= 500 and response.headers["retry-after"] == "1"
    # The SDK waits what retry-after-ms says (not its own backoff: jittered, from
    # 0.375 s), then gets through. Its waits are recorded, and still waited.
    slept: list[float] = []
    real_sleep = time.sleep

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        real_sleep(seconds)

    monkeypatch.setattr(time, "sleep", sleep)  # the SDK calls time.sleep
    retrying = openai.OpenAI(
        base_url=api.server.base_url,
        api_key=tenant,
        max_retries=3,
        http_client=api.http,
        _strict_response_validation=True,
    )
    for _ in range(20):  # again if a refill came before its first try (a slow machine)
        spend()
        slept.clear()
        before = len(api.transport.exchanges)
        retrying.chat.completions.create(model="scripted", messages=MESSAGES)
        tries = api.transport.exchanges[before:]
        if len(tries) > 1:
            break
    assert tries[-1].status == 200 and len(tries) > 1
    assert all(r.status == 429 for r in tries[:-1])
    assert slept == [int(r.headers["retry-after-ms"]) / 1000 for r in tries[:-1]]


def test_wrong_keys_slow_one_address_but_not_another(api: Api, server: ServerProcess) -> None:
    """Runs last: it spends 127.0.0.1's failed-authentication budget."""
    wrong = {"authorization": "Bearer ost_000000000000_" + "x" * 43}
    statuses = [api.http.get("/models", headers=wrong).status_code for _ in range(3)]
    assert statuses == [401, 401, 401]
    good = {"authorization": f"Bearer {server.key}"}
    refused = api.http.get("/models", headers=good)
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    # 127.0.0.2 is loopback too: another client address, not slowed.
    other = httpx2.Client(
        transport=httpx2.HTTPTransport(local_address="127.0.0.2"), base_url=server.base_url
    )
    with other:
        assert other.get("/models", headers=good).status_code == 200


def test_a_key_s_own_limits_hold_on_a_config_that_limits_nothing(
    launch_server: Launcher, openapi: spec.OpenAPI
) -> None:
    """As an operator would: the default config (built-in roles, no limits), then
    ``keys create --requests-per-minute 1 --tokens-per-minute 5000`` while it runs.
    The key is held to them, and its prompts are counted with the token counter,
    which the server loads then (nothing needed it at start)."""
    from tests.e2e.conftest import SCRIPTED_BACKEND

    server = launch_server("own-limits", SCRIPTED_BACKEND)
    created = server.cli(
        "keys", "create", "--name", "own", "--role", "user",
        "--requests-per-minute", "1", "--tokens-per-minute", "5000",
    )  # fmt: skip
    secret = created.stdout.strip()
    server.secrets.append(secret)
    server.wait_for_log("reloaded API keys", 1, 10.0)
    assert server.log_records("loading the token counter for token limits")
    api = Api(server, openapi)
    try:
        client = api.sdk(secret)
        raw = client.chat.completions.with_raw_response.create(
            model="scripted", messages=MESSAGES, max_tokens=5
        )
        assert raw.headers["x-ratelimit-limit-requests"] == "1"
        assert raw.headers["x-ratelimit-limit-tokens"] == "5000"
        with pytest.raises(openai.RateLimitError) as limited:
            client.chat.completions.create(model="scripted", messages=MESSAGES, max_tokens=5)
        assert limited.value.code == "rate_limit_exceeded"
        # The admin key, without limits of its own, is not limited.
        assert api.sdk(server.key).chat.completions.create(model="scripted", messages=MESSAGES)
    finally:
        api.close()
