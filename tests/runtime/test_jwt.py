"""The JWT verifier: what it accepts, what it refuses and why, and how its JWKS is
loaded, refreshed and rate-limited (file, URL over loopback, MockClock)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import settings as settings_
from hypothesis import strategies as st
from joserfc.jwk import Key, RSAKey

from ostiary.protocol.credentials import (
    MAX_TOKEN_LENGTH,
    TokenClaims,
    UnknownSigningKey,
    looks_like_jwt,
)
from ostiary.protocol.errors import AuthenticationError
from ostiary.runtime.config import JwtSettings
from ostiary.runtime.jwt import MAX_JWKS_KEYS, JwksError, JwtVerifier, parse_jwks
from tests.runtime.jwks import (
    AUDIENCE,
    ISSUER,
    NOW,
    JwksServer,
    b64,
    claims,
    ec_key,
    ed_key,
    forge,
    jwks,
    mint,
    rsa_key,
    sign,
)

RSA = rsa_key("rsa-1")
EC = ec_key("ec-1")
ED = ed_key("ed-1")


def settings(**overrides: Any) -> JwtSettings:
    base: dict[str, Any] = {
        "jwks_file": "unused",
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "algorithms": ("RS256", "ES256", "EdDSA"),
    }
    base.update(overrides)
    return JwtSettings(**base)


async def loaded(tmp_path: Path, *keys: Key, **overrides: Any) -> JwtVerifier:
    path = tmp_path / "jwks.json"
    path.write_bytes(jwks(*(keys or (RSA, EC, ED))))
    verifier = JwtVerifier(settings(jwks_file=str(path), **overrides))
    await verifier.load()
    return verifier


def refused(verifier: JwtVerifier, token: str, wall: float = NOW) -> str:
    """The message of the 401 ``token`` gets; checks it never echoes the token."""
    with pytest.raises(AuthenticationError) as caught:
        verifier.verify(token, wall)
    error = caught.value
    assert error.status == 401 and error.code == "invalid_token"
    for part in token.split("."):
        if len(part) > 8:
            assert part not in error.message
    return error.message


# -- what passes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "alg"), [(RSA, "RS256"), (EC, "ES256"), (ED, "EdDSA"), (ED, "Ed25519")]
)
async def test_valid_tokens_pass(tmp_path: Path, key: Key, alg: str) -> None:
    verifier = await loaded(tmp_path)
    token = mint(key, alg)
    assert looks_like_jwt(token)
    assert verifier.verify(token, NOW) == TokenClaims("alice", ("tenant",))


@pytest.mark.parametrize("allowed", ["EdDSA", "Ed25519"])
@pytest.mark.parametrize("alg", ["EdDSA", "Ed25519"])
async def test_eddsa_and_ed25519_are_one_algorithm(tmp_path: Path, allowed: str, alg: str) -> None:
    verifier = await loaded(tmp_path, ED, algorithms=(allowed,))
    assert verifier.verify(mint(ED, alg), NOW).subject == "alice"
    # ... also when the key itself names the other spelling.
    named = ed_key("ed-named")
    named_set = tmp_path / "named"
    named_set.mkdir()
    other = "Ed25519" if alg == "EdDSA" else "EdDSA"
    doc = {**named.as_dict(private=False), "alg": other}
    (named_set / "jwks.json").write_bytes(b'{"keys": [%s]}' % orjson.dumps(doc))
    verifier = JwtVerifier(settings(jwks_file=str(named_set / "jwks.json"), algorithms=(allowed,)))
    await verifier.load()
    assert verifier.verify(mint(named, alg), NOW).subject == "alice"


async def test_leeway_covers_clock_skew(tmp_path: Path) -> None:
    verifier = await loaded(tmp_path, leeway=30.0)
    late = mint(RSA, "RS256", claims(exp=int(NOW) - 20))
    early = mint(RSA, "RS256", claims(nbf=int(NOW) + 20))
    assert verifier.verify(late, NOW).subject == "alice"
    assert verifier.verify(early, NOW).subject == "alice"
    assert "expired" in refused(verifier, late, NOW + 11)
    assert "not valid yet" in refused(verifier, early, NOW - 11)


async def test_audience_list_and_token_without_kid(tmp_path: Path) -> None:
    verifier = await loaded(tmp_path)
    token = mint(EC, "ES256", claims(aud=["other", AUDIENCE]), kid=None)
    assert verifier.verify(token, NOW).subject == "alice"


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        ("roles", {"roles": "tenant"}, ("tenant",)),
        ("roles", {"roles": ["a", "b"]}, ("a", "b")),
        ("roles", {"roles": None}, ()),
        ("realm_access.roles", {"realm_access": {"roles": ["x"]}}, ("x",)),
        ("https://app.example/roles", {"https://app.example/roles": ["ns"]}, ("ns",)),
        ("app.example.roles", {"app.example": {"roles": ["dotted-name"]}}, ("dotted-name",)),
        ("a.b", {"a": {"c": 1}}, ()),
        ("a.b", {"a": "not an object"}, ()),
    ],
)
async def test_roles_from_dotted_claim_paths(
    tmp_path: Path, path: str, body: dict[str, Any], expected: tuple[str, ...]
) -> None:
    verifier = await loaded(tmp_path, roles_claim=path)
    token = mint(RSA, "RS256", claims(**body) | ({} if "roles" in body else {"roles": None}))
    assert verifier.verify(token, NOW).roles == expected


async def test_subject_from_a_configured_claim(tmp_path: Path) -> None:
    verifier = await loaded(tmp_path, subject_claim="ext.user")
    token = mint(RSA, "RS256", claims(ext={"user": "u-42"}))
    assert verifier.verify(token, NOW).subject == "u-42"
    assert "no subject (ext.user)" in refused(verifier, mint(RSA, "RS256"))


# -- what is refused, each with its own message --------------------------------------------


async def test_each_failure_has_its_own_clear_message(tmp_path: Path) -> None:
    verifier = await loaded(tmp_path)
    good = mint(RSA, "RS256")
    head, body, sig = good.split(".")
    tampered_body = mint(RSA, "RS256", claims(sub="mallory")).split(".")[1]
    flipped = sig[:-4] + ("AAAA" if not sig.endswith("AAAA") else "BBBB")
    public = RSA.as_dict(private=False)
    hmac_secret = orjson.dumps(public)
    cases = {
        "expired": mint(RSA, "RS256", claims(exp=int(NOW) - 3600)),
        "not valid yet": mint(RSA, "RS256", claims(nbf=int(NOW) + 3600)),
        "wrong audience": mint(RSA, "RS256", claims(aud="someone-else")),
        "issuer (iss) is not accepted": mint(RSA, "RS256", claims(iss="https://evil.test")),
        "no expiry (exp)": mint(RSA, "RS256", claims(exp=None)),
        "exp is not a number": mint(RSA, "RS256", claims(exp="tomorrow")),
        "nbf is not a number": mint(RSA, "RS256", claims(nbf=True)),
        "signature is not valid": f"{head}.{tampered_body}.{sig}",
        "signature is not valid.": f"{head}.{body}.{flipped}",
        "algorithm is not allowed": forge({"alg": "none", "kid": "rsa-1"}, claims()),
        "algorithm is not allowed (allowed: RS256, ES256, EdDSA)": sign(
            hmac_secret, "HS256", kid="rsa-1"
        ),
        "signing algorithm is not allowed": mint(RSA, "PS256"),
        "does not suit its algorithm": forge({"alg": "ES256", "kid": "rsa-1"}, claims(), b"x"),
        "critical header": forge({"alg": "RS256", "kid": "rsa-1", "crit": ["exp"]}, claims()),
        "kid is not a string": forge({"alg": "RS256", "kid": 7}, claims(), b"x"),
        "three dot-separated parts": f"{head}.{body}",
        "header is not base64url JSON": f"eyJhbGci!.{body}.{sig}",
        "header is not a JSON object": f"{b64(b'[1]')}.{body}.{sig}",
        "payload is not a JSON object": sign(RSA, "RS256", payload=b"42"),
        "payload is not base64url JSON": sign(RSA, "RS256", payload=b"\xff{"),
        "signature is not base64url": f"{head}.{body}.a",
        "too long": f"{head}.{'A' * MAX_TOKEN_LENGTH}.{sig}",
        "payload is not base64url": f"{head}.{body}\u00e9.{sig}",
        "neither a string nor a list": mint(RSA, "RS256", claims(roles=[1, 2])),
        "audience (aud)": mint(RSA, "RS256", claims(aud=None)),
    }
    messages = {expected: refused(verifier, token) for expected, token in cases.items()}
    for expected, message in messages.items():
        assert expected in message, (expected, message)
    # Distinct failures read differently.
    distinct = {
        messages[k]
        for k in (
            "expired",
            "not valid yet",
            "wrong audience",
            "issuer (iss) is not accepted",
            "no expiry (exp)",
            "signature is not valid",
            "algorithm is not allowed",
            "does not suit its algorithm",
            "three dot-separated parts",
        )
    }
    assert len(distinct) == 9


async def test_hmac_signed_with_the_public_key_is_refused_unread(tmp_path: Path) -> None:
    """The classic confusion: HS256 keyed with the published RSA key's bytes. The
    algorithm is refused before any key is looked at, however the secret is spelled."""
    verifier = await loaded(tmp_path, algorithms=("RS256",))
    public_pem = RSA.as_pem(private=False)
    modulus = str(RSA.as_dict(private=False)["n"])
    for secret in (public_pem, modulus.encode()):
        for alg in ("HS256", "HS384", "HS512"):
            token = sign(secret, alg, kid="rsa-1")
            assert "not allowed" in refused(verifier, token)


async def test_algorithm_must_suit_the_key(tmp_path: Path) -> None:
    verifier = await loaded(tmp_path, algorithms=("RS256", "ES256", "ES384", "EdDSA"))
    # A P-256 key cannot check ES384; an Ed25519 key cannot check ES256.
    assert "does not suit" in refused(verifier, forge({"alg": "ES384", "kid": "ec-1"}, claims()))
    assert "does not suit" in refused(verifier, forge({"alg": "ES256", "kid": "ed-1"}, claims()))
    # A key that names its own algorithm is used for that one only.
    pinned = RSAKey.import_key(RSA.as_dict(private=True) | {"alg": "RS512", "kid": "pin"})
    verifier = await loaded(tmp_path, pinned, algorithms=("RS256", "RS512"))
    assert "does not suit" in refused(verifier, sign(pinned, "RS256", kid="pin"))
    assert verifier.verify(mint(pinned, "RS512", kid="pin"), NOW).subject == "alice"


async def test_unknown_kid_raises_unknown_signing_key(tmp_path: Path) -> None:
    verifier = await loaded(tmp_path)
    stranger = rsa_key("stranger")
    with pytest.raises(UnknownSigningKey) as caught:
        verifier.verify(mint(stranger, "RS256"), NOW)
    assert caught.value.kid == "stranger" and caught.value.status == 401
    assert "unknown kid" in caught.value.message


async def test_a_verifier_without_keys_says_unknown_key() -> None:
    verifier = JwtVerifier(settings())
    assert not verifier.ready
    with pytest.raises(UnknownSigningKey):
        verifier.verify(mint(RSA, "RS256", kid=None), NOW)


# -- parsing a JWKS ---------------------------------------------------------------------------


def test_jwks_skips_keys_it_must_never_use(caplog: pytest.LogCaptureFixture) -> None:
    small = RSAKey.generate_key(1024, parameters={"kid": "small"})
    extra = (
        {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
        {**ec_key("enc").as_dict(private=False), "use": "enc"},
        {"kty": "RSA", "kid": "broken", "n": "AQAB"},
        {"kty": "XYZ", "kid": "alien"},
        {"kty": "EC", "kid": 5},
        "not an object",
    )
    snapshot = parse_jwks(jwks(small, RSA, extra=extra))
    assert sorted(snapshot.by_kid) == ["rsa-1"]
    reasons = [r.fields["why"] for r in caplog.records if r.getMessage() == "JWKS key skipped"]  # type: ignore[attr-defined]
    assert len(reasons) == 7
    assert any("HMAC" in r for r in reasons) and any("1024 bits" in r for r in reasons)


def test_jwks_private_members_are_dropped() -> None:
    snapshot = parse_jwks(b'{"keys": [%s]}' % orjson.dumps(RSA.as_dict(private=True)))
    (key,) = snapshot.by_kid["rsa-1"]
    assert not key.is_private


@pytest.mark.parametrize(
    ("document", "why"),
    [
        (b"not json", "not JSON"),
        (b"[]", 'no "keys" list'),
        (b'{"keys": {}}', 'no "keys" list'),
        (b'{"keys": []}', "no usable signing key"),
        (b'{"keys": [{"kty": "oct", "k": "AA"}]}', "no usable signing key"),
    ],
)
def test_bad_jwks_documents_are_refused(document: bytes, why: str) -> None:
    with pytest.raises(JwksError, match=why):
        parse_jwks(document)


def test_jwks_key_count_is_bounded() -> None:
    entry = ED.as_dict(private=False)
    with pytest.raises(JwksError, match="more than"):
        parse_jwks(orjson.dumps({"keys": [entry] * (MAX_JWKS_KEYS + 1)}))


# -- loading and refreshing from a file ----------------------------------------------------


async def test_start_up_fails_clearly_on_a_missing_or_invalid_file(tmp_path: Path) -> None:
    missing = JwtVerifier(settings(jwks_file=str(tmp_path / "nope.json")))
    with pytest.raises(JwksError, match=r"nope\.json: cannot read"):
        await missing.load()
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'{"keys": []}')
    with pytest.raises(JwksError, match=r"bad\.json: holds no usable signing key"):
        await JwtVerifier(settings(jwks_file=str(bad))).load()
    big = tmp_path / "big.json"
    big.write_bytes(jwks(RSA))
    with pytest.raises(JwksError, match="larger than jwks_max_bytes"):
        await JwtVerifier(settings(jwks_file=str(big), jwks_max_bytes=100)).load()


async def test_a_bad_refresh_keeps_the_old_keys(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    verifier = await loaded(tmp_path, RSA)
    (tmp_path / "jwks.json").write_bytes(b"garbage")
    assert await verifier.refresh() is False
    assert verifier.verify(mint(RSA, "RS256"), NOW).subject == "alice"
    assert any("keeping the keys held" in r.getMessage() for r in caplog.records)
    (tmp_path / "jwks.json").unlink()
    assert await verifier.refresh() is False
    assert verifier.ready


async def test_rotation_in_a_file_is_picked_up_by_an_unknown_kid(tmp_path: Path) -> None:
    verifier = await loaded(tmp_path, RSA)
    old_set = verifier.key_set
    new = ec_key("ec-rotated")
    token = mint(new, "ES256")
    with pytest.raises(UnknownSigningKey):
        verifier.verify(token, NOW)
    (tmp_path / "jwks.json").write_bytes(jwks(RSA, new))
    assert await verifier.refresh_for_unknown_kid() is True
    assert verifier.key_set is not old_set
    assert verifier.verify(token, NOW).subject == "alice"
    assert verifier.fetches == 2


async def test_run_rereads_a_file_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_bytes(jwks(RSA))
    verifier = JwtVerifier(
        settings(jwks_file=str(path), jwks_refresh_interval=3600.0), file_poll=0.01
    )
    await verifier.load()
    new = ed_key("ed-new")
    async with trio.open_nursery() as nursery:
        await nursery.start(verifier.run)
        installed = verifier.installed
        path.write_bytes(jwks(RSA, new))
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        with trio.fail_after(10):
            await installed.wait()
        assert verifier.fetches == 2
        assert verifier.verify(mint(new, "EdDSA"), NOW).subject == "alice"
        nursery.cancel_scope.cancel()


async def test_a_broken_file_is_read_again_only_when_it_changes(tmp_path: Path) -> None:
    """A truncated JWKS file is judged once per version: the poll does not read (and
    log) it again every second; the backoff's refresh and a new version do."""
    path = tmp_path / "jwks.json"
    path.write_bytes(jwks(RSA))
    verifier = JwtVerifier(settings(jwks_file=str(path)), file_poll=0.01)
    await verifier.load()
    path.write_bytes(jwks(RSA)[:-7])
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert await verifier._file_changed()
    with pytest.raises(JwksError):
        await verifier._read_file()
    assert not await verifier._file_changed()
    path.write_bytes(jwks(RSA))
    assert await verifier._file_changed()


# -- rate limiting and sharing the refetch (MockClock) -------------------------------------


class CountingVerifier(JwtVerifier):
    """A URL verifier whose fetch is simulated: it takes ``latency`` seconds of the
    (mock) clock and serves ``document`` (or fails when it is None)."""

    def __init__(self, document: bytes | None, **overrides: Any) -> None:
        super().__init__(settings(jwks_file=None, jwks_url="http://127.0.0.1:9/jwks", **overrides))
        self.document = document
        self.latency = 1.0

    async def _fetch_url(self) -> bytes:
        self.fetches += 1
        await trio.sleep(self.latency)
        if self.document is None:
            raise JwksError("simulated failure")
        return self.document


async def test_a_flood_of_unknown_kids_costs_one_fetch_per_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    verifier = CountingVerifier(jwks(RSA), jwks_min_refetch_interval=10.0)
    await verifier.load()
    assert verifier.fetches == 1
    results: list[bool] = []
    token = mint(rsa_key("bogus"), "RS256")

    async def bogus() -> None:
        with pytest.raises(UnknownSigningKey):
            verifier.verify(token, NOW)
        results.append(await verifier.refresh_for_unknown_kid())

    async with trio.open_nursery() as nursery:
        for _ in range(200):
            nursery.start_soon(bogus)
    # One fetch, shared by all 200 callers (they joined it while it ran).
    assert verifier.fetches == 2 and results == [True] * 200
    # Within the interval: no fetch, an immediate no.
    start = trio.current_time()
    while trio.current_time() - start < 8.0:
        assert await verifier.refresh_for_unknown_kid() is False
        await trio.sleep(0.5)
    assert verifier.fetches == 2
    await trio.sleep(2.0)
    assert await verifier.refresh_for_unknown_kid() is True
    assert verifier.fetches == 3


async def test_concurrent_refreshes_share_one_fetch_even_when_it_fails(
    autojump_clock: trio.testing.MockClock,
) -> None:
    verifier = CountingVerifier(None)
    await verifier.load()  # a URL that fails at start-up: logged, not fatal
    assert not verifier.ready and verifier.fetches == 1
    results: list[bool] = []

    async def ask() -> None:
        results.append(await verifier.refresh())

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(ask)
    assert verifier.fetches == 2 and results == [False] * 20


async def test_a_cancelled_fetch_releases_those_waiting_on_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    verifier = CountingVerifier(jwks(RSA))
    verifier.latency = 100.0
    waited: list[bool] = []
    owner = trio.CancelScope()

    async def own() -> None:
        with owner:
            await verifier.refresh()

    async def wait() -> None:
        waited.append(await verifier.refresh())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(own)
        await trio.sleep(1)
        nursery.start_soon(wait)
        await trio.sleep(1)
        owner.cancel()
    assert waited == [False] and not verifier.ready and verifier.fetches == 1


async def test_run_refetches_on_schedule_and_backs_off_after_failures(
    autojump_clock: trio.testing.MockClock,
) -> None:
    verifier = CountingVerifier(None, jwks_refresh_interval=60.0)
    verifier.latency = 0.0
    await verifier.load()
    async with trio.open_nursery() as nursery:
        await nursery.start(verifier.run)
        # Failing: retries after 1, 2, 4, 8, 16, 32 s (then every 60 s).
        await trio.sleep(1 + 2 + 4 + 8 + 16 + 32 - 0.5)
        assert verifier.fetches == 6
        assert not verifier.ready
        verifier.document = jwks(RSA)
        await trio.sleep(1)
        assert verifier.fetches == 7 and verifier.ready
        # Good: every 60 s from now on.
        await trio.sleep(60 * 3 + 30)
        assert verifier.fetches == 10
        nursery.cancel_scope.cancel()


# -- fetching a URL over loopback -----------------------------------------------------------


async def test_url_fetch_rotation_and_failures_over_loopback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    idp = JwksServer(jwks(RSA))
    async with trio.open_nursery() as nursery:
        url = await nursery.start(idp.serve)
        verifier = JwtVerifier(
            settings(jwks_file=None, jwks_url=url, jwks_min_refetch_interval=0.0, jwks_timeout=0.5)
        )
        await verifier.load()
        assert verifier.ready and idp.requests == 1
        assert verifier.verify(mint(RSA, "RS256"), NOW).subject == "alice"
        # Rotation: the IdP publishes a new key; the first token with it refetches.
        new = ec_key("ec-2")
        idp.document = jwks(RSA, new)
        with pytest.raises(UnknownSigningKey):
            verifier.verify(mint(new, "ES256"), NOW)
        assert await verifier.refresh_for_unknown_kid() is True
        assert idp.requests == 2
        assert verifier.verify(mint(new, "ES256"), NOW).subject == "alice"
        # An error status, an invalid or oversized document, a hang: old keys kept.
        idp.status = 500
        assert await verifier.refresh() is False
        idp.status, idp.document = 200, b'{"keys": "nope"}'
        assert await verifier.refresh() is False
        idp.document = b" " * (verifier.settings.jwks_max_bytes + 1)
        assert await verifier.refresh() is False
        idp.hang = True
        assert await verifier.refresh() is False
        assert verifier.verify(mint(new, "ES256"), NOW).subject == "alice"
        errors = [
            getattr(r, "fields")["error"]  # noqa: B009
            for r in caplog.records
            if r.name == "ostiary.jwt" and r.levelname == "ERROR"
        ]
        assert len(errors) == 4
        assert "HTTP 500" in errors[0] and "jwks_timeout" in errors[3]
        nursery.cancel_scope.cancel()


async def test_url_that_refuses_connections_is_logged_not_fatal() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()  # nobody listens there now
    verifier = JwtVerifier(settings(jwks_file=None, jwks_url=f"http://127.0.0.1:{port}/k"))
    await verifier.load()
    assert not verifier.ready and verifier.fetches == 1


async def test_a_remembered_token_is_still_judged_and_forgotten_with_its_key(
    tmp_path: Path,
) -> None:
    verifier = await loaded(tmp_path, RSA, EC)
    token = mint(RSA, "RS256")
    assert verifier.verify(token, NOW).subject == "alice"
    assert verifier.verify(token, NOW).subject == "alice"  # from memory
    assert "expired" in refused(verifier, token, NOW + 3600)
    (tmp_path / "jwks.json").write_bytes(jwks(EC))  # the RSA key is withdrawn
    assert await verifier.refresh()
    with pytest.raises(UnknownSigningKey):
        verifier.verify(token, NOW)


async def test_remembered_tokens_are_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("ostiary.runtime.jwt._VERIFIED_CACHE", 2)
    verifier = await loaded(tmp_path, ED)
    tokens = [mint(ED, "Ed25519", claims(sub=f"user-{i}")) for i in range(5)]
    for token in tokens:
        verifier.verify(token, NOW)
        assert len(verifier._verified) <= 2
    assert [verifier.verify(t, NOW).subject for t in tokens] == [f"user-{i}" for i in range(5)]


_FUZZED = JwtVerifier(settings())
_FUZZED._keys = parse_jwks(jwks(RSA, EC, ED))
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
_HEADERS = st.fixed_dictionaries(
    {},
    optional={
        "alg": st.sampled_from(["RS256", "ES256", "EdDSA", "Ed25519", "none", "HS256"]) | _JSON,
        "kid": st.sampled_from(["rsa-1", "ec-1", "ed-1", ""]) | _JSON,
        "crit": _JSON,
    },
)


@settings_(max_examples=150, deadline=None)
@given(
    st.text(max_size=200)
    | st.builds(
        forge, _HEADERS, st.dictionaries(st.text(max_size=5), _JSON), st.binary(max_size=80)
    )
)
def test_any_credential_is_either_verified_or_refused_with_a_401(token: str) -> None:
    try:
        _FUZZED.verify(token, NOW)
    except AuthenticationError as error:
        assert error.status == 401 and error.message


async def test_reconfigure_to_an_unreachable_url_changes_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    verifier = await loaded(tmp_path, RSA)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()
    with pytest.raises(JwksError, match="cannot be fetched"):
        await verifier.reconfigure(
            settings(jwks_file=None, jwks_url=f"http://127.0.0.1:{port}/k", issuer="x")
        )
    assert verifier.settings.issuer == ISSUER
    assert verifier.verify(mint(RSA, "RS256"), NOW).subject == "alice"
    # The old keys stay in force: no claim that JWTs are refused now.
    assert "JWTs are refused" not in caplog.text
