"""Key expiry and per-key limit overrides in the core: the record, the table, the
UTC dates of its messages and the gateway's 401."""

from __future__ import annotations

import datetime
from typing import Any

import attrs
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ostiary.protocol.access import AccessPolicy, LimitSet, Role
from ostiary.protocol.actions import Dispatch, Respond
from ostiary.protocol.auth import (
    ApiKey,
    KeyTable,
    digest_secret,
    format_secret,
    format_utc,
    parse_key_id,
)
from ostiary.protocol.errors import AuthenticationError
from ostiary.protocol.events import KeysReplaced, RequestReceived
from ostiary.protocol.gateway import Gateway, ModelRoute
from tests.conftest import ADMIN_SECRET, USER_SECRET, auth_headers, chat_body, key_table

#: 2026-12-01T12:00:00Z.
EXPIRES = 1_796_126_400
LAST_UNIX = 253_402_300_799  # 9999-12-31T23:59:59Z


def by_datetime(unix: float) -> str:
    moment = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC) + datetime.timedelta(
        seconds=unix // 1
    )
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ").rjust(20, "0")


@given(st.integers(min_value=0, max_value=LAST_UNIX))
def test_format_utc_agrees_with_datetime(unix: int) -> None:
    assert format_utc(unix) == by_datetime(unix)


@given(st.floats(min_value=0, max_value=LAST_UNIX, allow_nan=False))
def test_format_utc_drops_fractions(unix: float) -> None:
    assert format_utc(unix) == by_datetime(unix)


@pytest.mark.parametrize(
    "day",
    ["1970-01-01", "1972-02-29", "1999-12-31", "2000-02-29", "2000-03-01", "2100-02-28",
     "2100-03-01", "2400-02-29", "9999-12-31"],
)  # fmt: skip
def test_format_utc_on_leap_and_century_days(day: str) -> None:
    moment = datetime.datetime.fromisoformat(day + "T23:59:59+00:00")
    assert format_utc(moment.timestamp()) == day + "T23:59:59Z"


def key(**fields: Any) -> ApiKey:
    return ApiKey("b" * 12, "user", "user", digest_secret(USER_SECRET), **fields)


def test_old_positional_construction_still_builds() -> None:
    old = ApiKey("b" * 12, "user", "user", digest_secret(USER_SECRET))
    assert old.expires_at is None
    assert old.overrides == LimitSet()
    assert old.overrides.empty
    assert not old.expired(1e12)


def test_overrides_are_a_limit_set() -> None:
    record = key(requests_per_minute=10, tokens_per_minute=500, max_concurrent=2)
    assert record.overrides == LimitSet(
        requests_per_minute=10, tokens_per_minute=500, max_concurrent=2
    )
    assert record.overrides is record.overrides  # built once
    record = key(requests_per_day=7, tokens_per_day=9)
    assert (record.overrides.requests_per_day, record.overrides.tokens_per_day) == (7, 9)
    assert attrs.evolve(record, max_concurrent=3).overrides.max_concurrent == 3


@pytest.mark.parametrize(
    "fields",
    [
        {"expires_at": -1},
        {"expires_at": float("inf")},
        {"expires_at": float("nan")},
        {"expires_at": True},
        {"expires_at": "2026"},
        {"expires_at": LAST_UNIX + 1},
        {"requests_per_minute": 0},
        {"tokens_per_minute": -5},
        {"max_concurrent": True},
        {"requests_per_day": 1.5},
        {"tokens_per_day": "3"},
    ],
)
def test_bad_records_are_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(fields))):
        key(**fields)


def bearer(secret: str) -> bytes:
    return b"Bearer " + secret.encode()


def test_expiry_is_judged_against_wall() -> None:
    table = KeyTable.of([key(expires_at=EXPIRES)])
    assert table.authenticate(bearer(USER_SECRET)).id == "b" * 12  # no wall: not judged
    assert table.authenticate(bearer(USER_SECRET), EXPIRES - 0.001).id == "b" * 12
    for wall in (EXPIRES, EXPIRES + 86_400.5):
        with pytest.raises(AuthenticationError) as info:
            table.authenticate(bearer(USER_SECRET), wall)
        assert info.value.code == "expired_api_key"
        assert info.value.status == 401
        assert str(info.value) == "This API key expired at 2026-12-01T12:00:00Z."
        assert USER_SECRET not in str(info.value)


def test_a_wrong_secret_for_an_expired_key_is_just_wrong() -> None:
    """Expiry is told only to whoever holds the secret."""
    table = KeyTable.of([key(expires_at=EXPIRES)])
    wrong = USER_SECRET[:-1] + ("A" if USER_SECRET[-1] != "A" else "B")
    with pytest.raises(AuthenticationError) as info:
        table.authenticate(bearer(wrong), EXPIRES + 1)
    assert info.value.code == "invalid_api_key"
    assert "expired" not in str(info.value)


def test_overrides_replace_the_role_limits_dimension_by_dimension() -> None:
    role = Role(name="tenant", requests_per_minute=600, tokens_per_minute=1000, max_concurrent=8)
    policy = AccessPolicy([role])
    record = key(requests_per_minute=5, max_concurrent=1)
    principal = policy.principal(f"key:{record.id}", role, record.overrides)
    assert principal.limits == LimitSet(
        requests_per_minute=5, tokens_per_minute=1000, max_concurrent=1
    )


# -- through the gateway -----------------------------------------------------------


def gateway(keys: KeyTable) -> Gateway:
    return Gateway(routes=[ModelRoute("m", "b1")], keys=keys, created=1_700_000_000)


def expiring_table() -> KeyTable:
    admin, user = key_table().keys.values()
    return KeyTable.of([admin, attrs.evolve(user, expires_at=EXPIRES)])


def received(gw: Gateway, rid: str, admit_wall: float, wall: float) -> RequestReceived:
    headers = auth_headers(USER_SECRET)
    admission = gw.admits("POST", "/v1/chat/completions", headers, "127.0.0.1", admit_wall)
    return RequestReceived(
        rid, admission, "POST", "/v1/chat/completions", headers, chat_body(), 10.0, wall
    )


def answer(actions: list[Any]) -> tuple[int, dict[str, Any], dict[bytes, bytes]]:
    (respond,) = [a for a in actions if isinstance(a, Respond)]
    return respond.status, orjson.loads(respond.body), dict(respond.headers)


def test_gateway_admits_refuses_an_expired_key_with_401() -> None:
    gw = gateway(expiring_table())
    headers = auth_headers(USER_SECRET)
    admission = gw.admits("POST", "/v1/chat/completions", headers, "127.0.0.1", EXPIRES)
    assert admission.error is not None
    assert admission.error.code == "expired_api_key"
    status, body, hdrs = answer(gw.handle(received(gw, "r1", EXPIRES, EXPIRES)))
    assert status == 401
    assert body["error"] == {
        "message": "This API key expired at 2026-12-01T12:00:00Z.",
        "type": "invalid_request_error",
        "param": None,
        "code": "expired_api_key",
    }
    assert hdrs[b"www-authenticate"].startswith(b"Bearer")
    # The other key, with no expiry, is untouched; the expiring one worked before.
    admin = gw.admits("POST", "/v1/chat/completions", auth_headers(ADMIN_SECRET), "", 4e9)
    assert admin.error is None
    assert isinstance(gw.handle(received(gw, "r2", EXPIRES - 1, EXPIRES - 1))[0], Dispatch)


def test_a_request_judged_again_after_a_key_change_is_judged_at_its_wall() -> None:
    """Admitted by an older key table, the request is authenticated once more when it
    arrives, with the wall time it arrived at: a key that expired meanwhile fails."""
    gw = gateway(key_table())
    event = received(gw, "r1", EXPIRES - 10, EXPIRES + 10)
    assert event.admission.error is None
    gw.handle(KeysReplaced(expiring_table(), 10.0))
    status, body, _ = answer(gw.handle(event))
    assert (status, body["error"]["code"]) == (401, "expired_api_key")


@pytest.mark.parametrize(
    ("key_id", "token", "words"),
    [("ABCDEF012345", "x" * 43, "12 lower-case hex"), ("abc", "x" * 43, "12 lower-case hex"),
     ("0123456789ab", "x" * 42, "32 random bytes")],
)  # fmt: skip
def test_format_secret_refuses_weak_parts(key_id: str, token: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        format_secret(key_id, token)


@pytest.mark.parametrize(
    "secret", ["ost_0123456789abX" + "x" * 43, "ost_0123456789AB_" + "x" * 43, "ost_short"]
)
def test_malformed_secrets_name_no_key(secret: str) -> None:
    assert parse_key_id(secret) is None
    assert parse_key_id(format_secret("0123456789ab", "x" * 43)) == "0123456789ab"
