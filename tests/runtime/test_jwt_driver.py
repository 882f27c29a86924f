"""JWTs through the driver and the real gateway, in memory under MockClock: a token
naming an unknown kid makes the driver refresh the keys (rate-limited, one fetch
shared by everyone waiting) and judge the head once more."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
import trio.testing

from ostiary.backends.scripted import ScriptedBackend, ScriptedSettings
from ostiary.protocol.access import AccessPolicy, Role
from ostiary.protocol.gateway import Gateway, ModelRoute
from ostiary.runtime.config import Config, load_config
from ostiary.runtime.driver import Driver
from ostiary.runtime.jwt import JwtVerifier
from ostiary.runtime.server import load_verifier, reload_access
from tests.conftest import chat_body, key_table
from tests.runtime.inprocess import Connect, in_memory
from tests.runtime.jwks import AUDIENCE, ISSUER, claims, ec_key, jwks, mint, rsa_key
from tests.runtime.test_jwt import CountingVerifier

RSA = rsa_key("drv-rsa")
ROTATED = ec_key("drv-rotated")
STRANGER = rsa_key("drv-stranger")


@asynccontextmanager
async def serving(
    verifier: JwtVerifier | None, *, refresh: bool = True
) -> AsyncIterator[tuple[Connect, Driver]]:
    backend = ScriptedBackend(ScriptedSettings(models=("s",), chunks=2))
    gateway = Gateway(
        routes=[ModelRoute("s", "scripted", capabilities=backend._settings.capabilities("s"))],
        keys=key_table(),
        access=AccessPolicy([Role(name="tenant")], failed_auth_per_minute=0),
        verifier=verifier,
        created=1,
    )
    driver = Driver(
        gateway, {"scripted": backend}, verifier=verifier if refresh else None, access_log=False
    )
    async with in_memory(driver) as connect:
        yield connect, driver


async def ask(connect: Connect, token: str, target: str = "/v1/models") -> tuple[int, Any]:
    client = await connect()
    if target == "/v1/models":
        await client.request("GET", target, authorization=f"Bearer {token}")
    else:
        await client.request(
            target=target, body=chat_body(model="s"), authorization=f"Bearer {token}"
        )
    status, _, body = await client.response()
    return status, orjson.loads(body)


def tok(key: Any, **overrides: Any) -> str:
    return mint(key, "RS256" if key.key_type == "RSA" else "ES256", claims(**overrides))


async def test_a_rotated_key_is_fetched_and_the_head_judged_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    verifier = CountingVerifier(jwks(RSA), jwks_min_refetch_interval=10.0)
    await verifier.load()
    async with serving(verifier) as (connect, _):
        assert (await ask(connect, tok(RSA)))[0] == 200
        verifier.document = jwks(RSA, ROTATED)  # published after start-up
        status, body = await ask(connect, tok(ROTATED), "/v1/chat/completions")
        assert status == 200, body
        assert body["object"] == "chat.completion"
        assert verifier.fetches == 2


async def test_a_flood_of_bogus_kids_costs_one_fetch_per_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    verifier = CountingVerifier(jwks(RSA), jwks_min_refetch_interval=10.0)
    await verifier.load()
    answers: list[tuple[int, Any]] = []
    async with serving(verifier) as (connect, _):

        async def bogus(i: int) -> None:
            token = mint(STRANGER, "RS256", claims(), kid=f"bogus-{i}")
            answers.append(await ask(connect, token))

        async with trio.open_nursery() as nursery:
            for i in range(100):
                nursery.start_soon(bogus, i)
        assert verifier.fetches == 2  # one fetch, shared by all hundred
        await bogus(100)
        await trio.sleep(5)
        await bogus(101)
        assert verifier.fetches == 2  # within the interval: none
        await trio.sleep(6)
        await bogus(102)
        assert verifier.fetches == 3
    assert len(answers) == 103
    for status, body in answers:
        assert status == 401 and body["error"]["code"] == "invalid_token"
        assert "unknown kid" in body["error"]["message"]


async def test_roles_map_to_configured_ones(autojump_clock: trio.testing.MockClock) -> None:
    verifier = CountingVerifier(jwks(RSA))
    await verifier.load()
    async with serving(verifier) as (connect, _):
        assert (await ask(connect, tok(RSA, roles=["auditor", "tenant"])))[0] == 200
        status, body = await ask(connect, tok(RSA, roles="auditor"))
        assert status == 403 and body["error"]["code"] == "permission_denied"
        status, body = await ask(connect, tok(RSA, roles=None))
        assert status == 403 and body["error"]["code"] == "permission_denied"


async def test_without_a_refresher_an_unknown_kid_is_simply_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    verifier = CountingVerifier(jwks(RSA))
    await verifier.load()
    async with serving(verifier, refresh=False) as (connect, _):
        verifier.document = jwks(RSA, ROTATED)
        status, body = await ask(connect, tok(ROTATED))
        assert status == 401 and "unknown kid" in body["error"]["message"]
        assert verifier.fetches == 1


def config_text(jwt: str) -> str:
    return (
        jwt
        + '[[roles]]\nname = "tenant"\n'
        + '[[backends]]\nname = "scripted"\nkind = "scripted"\nmodels = ["s"]\n'
    )


def jwt_table(jwks_file: Path, issuer: str) -> str:
    return (
        f'[auth.jwt]\njwks_file = "{jwks_file}"\nissuer = "{issuer}"\naudience = "{AUDIENCE}"\n'
        'algorithms = ["RS256", "ES256"]\n'
    )


async def jwt_config(tmp_path: Path) -> tuple[Path, Path, Config, JwtVerifier]:
    """A config file with ``[auth.jwt]`` on a JWKS file of the RSA key: the JWKS
    file, the config file, the config loaded and its verifier (its keys loaded)."""
    first = tmp_path / "first.json"
    first.write_bytes(jwks(RSA))
    path = tmp_path / "cfg.toml"
    path.write_text(config_text(jwt_table(first, ISSUER)), encoding="utf-8")
    config = load_config(path)
    verifier = await load_verifier(config)
    assert verifier is not None
    return first, path, config, verifier


async def test_sighup_reloads_the_jwt_settings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, path, config, verifier = await jwt_config(tmp_path)
    second = tmp_path / "second.json"
    second.write_bytes(jwks(ROTATED))
    async with serving(verifier) as (connect, driver):
        old = tok(RSA)
        assert (await ask(connect, old))[0] == 200
        # A new issuer and key set: loaded first, then swapped in with the settings.
        other = "https://other.test"
        path.write_text(config_text(jwt_table(second, other)), encoding="utf-8")
        reloaded = await reload_access(config, driver)
        assert reloaded is not None and reloaded.auth.jwt is not None
        assert (await ask(connect, tok(ROTATED, iss=other)))[0] == 200
        status, body = await ask(connect, old)
        assert status == 401 and "unknown kid" in body["error"]["message"]
        # A key set that cannot be loaded: the whole reload is refused.
        path.write_text(config_text(jwt_table(tmp_path / "gone.json", ISSUER)), encoding="utf-8")
        assert await reload_access(reloaded, driver) is None
        refusals = [getattr(r, "fields", {}).get("error", "") for r in caplog.records]
        assert any("[auth.jwt] JWKS" in e and "gone.json: cannot read" in e for e in refusals)
        assert (await ask(connect, tok(ROTATED, iss=other)))[0] == 200
        # [auth.jwt] removed: JWTs are no longer accepted, the refresh task ends.
        path.write_text(config_text(""), encoding="utf-8")
        assert await reload_access(reloaded, driver) is not None
        assert (await ask(connect, tok(ROTATED, iss=other)))[0] == 401
        assert driver.verifier is None
        with trio.fail_after(5):
            await verifier.run()  # returns at once: retired


async def test_adding_jwt_on_reload_needs_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "k.json").write_bytes(jwks(RSA))
    path = tmp_path / "cfg.toml"
    path.write_text(config_text(""), encoding="utf-8")
    config = load_config(path)
    async with serving(None) as (connect, driver):
        path.write_text(config_text(jwt_table(tmp_path / "k.json", ISSUER)), encoding="utf-8")
        assert await reload_access(config, driver) is not None
        assert "adding [auth.jwt] needs a restart" in caplog.text
        assert (await ask(connect, tok(RSA)))[0] == 401


async def test_readyz_is_unavailable_until_a_key_set_is_loaded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    verifier = CountingVerifier(None)  # the identity provider is not answering yet
    async with serving(verifier) as (connect, _):
        client = await connect()
        await client.request("GET", "/readyz")
        status, headers, body = await client.response()
        assert status == 503
        assert orjson.loads(body) == {"status": "unavailable", "jwt": "no key set loaded"}
        # Asked again within the readiness cache's second, the answer is the same.
        assert (headers[b"retry-after"], headers[b"retry-after-ms"]) == (b"1", b"1000")
        verifier.document = jwks(RSA)
        await verifier.load()
        await trio.sleep(2)  # past the readiness cache (mock clock)
        await client.request("GET", "/readyz")
        assert (await client.response())[0] == 200


async def test_a_reload_whose_token_counter_cannot_load_is_refused_whole(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Token limits added by SIGHUP need the counter: if it cannot be loaded, nothing
    of the reload is applied (the JWT settings included), and the server goes on."""
    from ostiary.runtime import server as server_module

    def broken() -> None:
        raise OSError("no cl100k")

    monkeypatch.setattr(server_module, "load_cl100k", broken)
    first, path, config, verifier = await jwt_config(tmp_path)
    async with serving(verifier) as (connect, driver):
        limited = config_text(jwt_table(first, "https://other.test")).replace(
            'name = "tenant"\n', 'name = "tenant"\ntokens_per_minute = 1000\n'
        )
        path.write_text(limited, encoding="utf-8")
        assert await reload_access(config, driver) is None
        refusals = [getattr(r, "fields", {}).get("error", "") for r in caplog.records]
        assert any("cannot load the token counter" in e for e in refusals)
        assert (await ask(connect, tok(RSA)))[0] == 200  # the old issuer still holds
        assert not driver.gateway.guard.access.counts_tokens
