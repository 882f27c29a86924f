"""JWTs against the real server: an identity provider in this process (a trio HTTP
server on loopback, in a thread) serves the JWKS, ``ostiary serve`` fetches it.

Valid RS256, ES256, EdDSA and Ed25519 tokens pass (the official SDK with a JWT as
its ``api_key``); every kind of bad token gets 401 ``invalid_token`` with its own
message; a role claim maps to a configured role and an unknown one gets 403; a key
published after start-up is fetched by the first token naming it, and a flood of
bogus kids costs the identity provider no further request within
``jwks_min_refetch_interval``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx2
import openai
import pytest

from tests.e2e.conftest import CLI_TIMEOUT, HTTP_TIMEOUT, SCRIPTED_BACKEND, Api, server_config
from tests.runtime.jwks import (
    AUDIENCE,
    ISSUER,
    JwksServer,
    claims,
    ec_key,
    ed_key,
    forge,
    jwks,
    mint,
    rsa_key,
    sign,
    threaded_jwks_server,
)

if TYPE_CHECKING:
    from tests.e2e.conftest import Launcher, ServerProcess
    from tests.e2e.spec import OpenAPI

RSA = rsa_key("idp-rsa")
EC = ec_key("idp-ec")
ED = ed_key("idp-ed")
ROTATED = ec_key("idp-rotated")
MODEL = "scripted"
MESSAGES: list[Any] = [{"role": "user", "content": "hello"}]


def jwt_config(url: str, min_refetch: float = 0.0) -> str:
    return (
        # Still [auth]: this test sends many 401s from one address on purpose.
        "failed_auth_per_minute = 0\n"
        "[auth.jwt]\n"
        f'jwks_url = "{url}"\n'
        f'issuer = "{ISSUER}"\n'
        f'audience = "{AUDIENCE}"\n'
        'algorithms = ["RS256", "ES256", "EdDSA"]\n'
        "leeway = 5.0\n"
        'roles_claim = "app.roles"\n'
        f"jwks_min_refetch_interval = {min_refetch}\n"
        "[[roles]]\n"
        'name = "tenant"\n'
        'models = ["*"]\n'
        "[[roles]]\n"
        'name = "lister"\n'
        'endpoints = ["models"]\n' + SCRIPTED_BACKEND
    )


@pytest.fixture(scope="module")
def idp() -> Iterator[JwksServer]:
    with threaded_jwks_server(jwks(RSA, EC, ED)) as server:
        yield server


@pytest.fixture(scope="module")
def jwt_server(launch_server: Launcher, idp: JwksServer) -> ServerProcess:
    return launch_server("jwt", jwt_config(idp.url))


@pytest.fixture(scope="module")
def rotating_idp() -> Iterator[JwksServer]:
    with threaded_jwks_server(jwks(RSA)) as server:
        yield server


@pytest.fixture(scope="module")
def rotating_server(launch_server: Launcher, rotating_idp: JwksServer) -> ServerProcess:
    """A server of its own, whose refetch budget no other test spends: an hour
    between refetches caused by unknown kids."""
    return launch_server("jwt-rotating", jwt_config(rotating_idp.url, min_refetch=3600.0))


@pytest.fixture(scope="module")
def api(jwt_server: ServerProcess, openapi: OpenAPI) -> Iterator[Api]:
    client = Api(jwt_server, openapi)
    yield client
    client.close()


def token(server: ServerProcess, key: Any, alg: str, **overrides: Any) -> str:
    """A token for ``server``'s audience, remembered so its log is checked for it."""
    roles = overrides.pop("roles", ["tenant"])
    body = claims(now=time.time(), app={"roles": roles}, roles=None, **overrides)
    minted = mint(key, alg, body)
    server.secrets.append(minted)
    return minted


def test_valid_tokens_pass_through_the_official_sdk(api: Api, jwt_server: ServerProcess) -> None:
    for key, alg in ((RSA, "RS256"), (EC, "ES256"), (ED, "EdDSA"), (ED, "Ed25519")):
        sdk = api.sdk(token(jwt_server, key, alg))
        completion = sdk.chat.completions.create(model=MODEL, messages=MESSAGES)
        assert completion.choices[0].message.content
        api.json("CreateChatCompletionResponse")


def test_bad_tokens_get_401_each_with_its_own_message(api: Api, jwt_server: ServerProcess) -> None:
    now = int(time.time())
    good = token(jwt_server, RSA, "RS256")
    head, body, sig = good.split(".")
    other_body = token(jwt_server, RSA, "RS256", sub="mallory").split(".")[1]
    public_pem = RSA.as_pem(private=False)
    cases = {
        "expired": token(jwt_server, RSA, "RS256", exp=now - 3600),
        "not valid yet": token(jwt_server, EC, "ES256", nbf=now + 3600),
        "wrong audience": token(jwt_server, ED, "EdDSA", aud="another-service"),
        "issuer (iss) is not accepted": token(jwt_server, RSA, "RS256", iss="https://evil"),
        "no expiry (exp)": token(jwt_server, RSA, "RS256", exp=None),
        "signature is not valid": f"{head}.{other_body}.{sig}",
        "signature is not valid.": f"{head}.{body}.{sig[:-6]}AAAAAA",
        "algorithm is not allowed": forge({"alg": "none", "kid": "idp-rsa"}, claims(now)),
        "algorithm is not allowed (": sign(public_pem, "HS256", claims(now), kid="idp-rsa"),
        "unknown kid": token(jwt_server, rsa_key("not-published"), "RS256"),
    }
    for expected, bad in cases.items():
        response = api.http.post(
            "/chat/completions",
            headers={"authorization": f"Bearer {bad}"},
            json={"model": MODEL, "messages": MESSAGES},
        )
        assert response.status_code == 401, (expected, response.text)
        error = api.error(401)
        assert error["code"] == "invalid_token", error
        assert expected in error["message"], (expected, error["message"])
        assert sig not in error["message"] and body not in error["message"]
    # The SDK sees the same as an AuthenticationError.
    with pytest.raises(openai.AuthenticationError, match="expired"):
        api.sdk(cases["expired"]).models.list()


def test_a_role_claim_maps_to_a_configured_role(api: Api, jwt_server: ServerProcess) -> None:
    lister = api.sdk(token(jwt_server, EC, "ES256", roles=["unknown", "lister", "tenant"]))
    # The first configured role in claim order wins: "lister" may list models only.
    assert [m.id for m in lister.models.list()]
    with pytest.raises(openai.PermissionDeniedError) as denied:
        lister.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert denied.value.status_code == 403
    assert api.error(403)["code"] == "permission_denied"
    stranger = api.sdk(token(jwt_server, EC, "ES256", roles="auditor"))
    with pytest.raises(openai.PermissionDeniedError):
        stranger.models.list()
    error = api.error(403)
    assert error["code"] == "permission_denied" and "auditor" not in error["message"]


def test_rotation_without_restart_and_a_bogus_kid_flood(
    rotating_server: ServerProcess, rotating_idp: JwksServer, openapi: OpenAPI
) -> None:
    api = Api(rotating_server, openapi)
    try:
        assert rotating_idp.requests == 1  # the start-up load
        rotated = token(rotating_server, ROTATED, "ES256")
        rotating_idp.document = jwks(RSA, ROTATED)  # the IdP publishes a new key
        sdk = api.sdk(rotated)
        assert sdk.chat.completions.create(model=MODEL, messages=MESSAGES).choices
        assert rotating_idp.requests == 2  # the first token naming it fetched it, once
        assert sdk.models.list().data  # held now: no further fetch
        stranger = rsa_key("stranger")
        for i in range(40):
            bogus = mint(stranger, "RS256", claims(time.time()), kid=f"bogus-{i}")
            response = api.http.get("/models", headers={"authorization": f"Bearer {bogus}"})
            assert response.status_code == 401
            assert "unknown kid" in response.json()["error"]["message"]
        # jwks_min_refetch_interval (an hour) has not passed since the rotation.
        assert rotating_idp.requests == 2
    finally:
        api.close()


def test_start_up_fails_clearly_when_the_jwks_file_is_missing(tmp_path: Path) -> None:
    config = tmp_path / "cfg.toml"
    config.write_text(
        server_config(tmp_path / "state", "")
        + "[auth.jwt]\n"
        + f'jwks_file = "{tmp_path / "absent.json"}"\n'
        + f'issuer = "{ISSUER}"\naudience = "{AUDIENCE}"\n'
        + SCRIPTED_BACKEND,
        encoding="utf-8",
    )
    result = subprocess.run(
        [sys.executable, "-m", "ostiary.runtime.cli", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    assert result.returncode == 1
    assert "absent.json: cannot read" in result.stderr


def test_keys_keep_working_beside_jwts(api: Api) -> None:
    assert api.client.models.list().data
    assert httpx2.get(f"{api.server.base_url}/models", timeout=HTTP_TIMEOUT).status_code == 401
