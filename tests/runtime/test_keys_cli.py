"""``ostiary keys create/list`` with roles, expiry and per-key limits."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pytest

from ostiary.protocol.access import LimitSet
from ostiary.protocol.auth import format_utc, parse_key_id
from ostiary.runtime.cli import MAX_LIFETIME, MAX_LIMIT, duration, limit, main
from ostiary.runtime.keystore import SqliteKeyStore

NOW = 1_796_126_400  # 2026-12-01T12:00:00Z

CONFIG = """
[server]
state_dir = "{state}"

[[roles]]
name = "tenant"
requests_per_minute = 600

[[roles]]
name = "batch"

[[backends]]
name = "s"
kind = "scripted"
models = ["a"]
"""


@pytest.fixture
def cfg(tmp_path: Path) -> str:
    path = tmp_path / "c.toml"
    path.write_text(CONFIG.format(state=tmp_path / "st"))
    return str(path)


def store(tmp_path: Path) -> SqliteKeyStore:
    return SqliteKeyStore(tmp_path / "st" / "keys.sqlite3")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30d", 30 * 86_400), ("12h", 43_200), ("90m", 5_400), ("3600s", 3_600), (" 1d ", 86_400)],
)
def test_durations(text: str, seconds: int) -> None:
    assert duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["30", "d", "1.5h", "-5m", "1w", "1d12h", "", "0s", "0d", "36501d", "9" * 13 + "s"]
)
def test_bad_durations(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        duration(text)


def test_the_longest_lifetime_is_accepted() -> None:
    assert duration(f"{MAX_LIFETIME}s") == MAX_LIFETIME


@pytest.mark.parametrize("text", ["0", "-1", "abc", "1.5", "1e3", "", str(MAX_LIMIT + 1)])
def test_bad_limits(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="not a limit"):
        limit(text)


def test_limits() -> None:
    assert (limit("1"), limit(str(MAX_LIMIT)), limit(" 42 ")) == (1, MAX_LIMIT, 42)


def test_create_with_expiry_and_overrides(
    tmp_path: Path, cfg: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(time, "time", lambda: NOW + 0.75)
    argv = ["keys", "create", "--name", "svc", "--role", "tenant", "--config", cfg]
    argv += ["--expires-in", "30d", "--requests-per-minute", "10", "--tokens-per-minute", "5000"]
    argv += ["--max-concurrent", "2", "--requests-per-day", "100", "--tokens-per-day", "9000"]
    assert main(argv) == 0
    secret = capsys.readouterr().out.strip()
    (info,) = store(tmp_path).list()
    assert info.id == parse_key_id(secret)
    assert (info.name, info.role, info.created_at) == ("svc", "tenant", NOW)
    assert info.expires_at == NOW + 30 * 86_400
    assert info.overrides == LimitSet(
        requests_per_minute=10,
        tokens_per_minute=5000,
        requests_per_day=100,
        tokens_per_day=9000,
        max_concurrent=2,
    )
    _, table, _ = store(tmp_path).load()
    assert table.keys[info.id].overrides == info.overrides

    assert main(["keys", "list", "--config", cfg]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line.split("\t") == [
        info.id,
        "svc",
        "tenant",
        "active",
        "expires=2026-12-31T12:00:00Z",
        "requests_per_minute=10",
        "tokens_per_minute=5000",
        "requests_per_day=100",
        "tokens_per_day=9000",
        "max_concurrent=2",
    ]
    assert secret not in line


def test_list_shows_expired_revoked_and_plain_keys(
    tmp_path: Path, cfg: str, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = store(tmp_path)
    past = time.time() - 3600
    expired, _ = keys.create("old", "user", expires_at=past)
    plain, _ = keys.create("plain", "user")
    revoked, _ = keys.create("gone", "batch", overrides=LimitSet(max_concurrent=1))
    keys.revoke(revoked.id)
    assert main(["keys", "list", "--config", cfg]) == 0
    rows = {r.split("\t")[0]: r.split("\t") for r in capsys.readouterr().out.splitlines()}
    assert rows[expired.id] == [expired.id, "old", "user", "expired", f"expires={format_utc(past)}"]
    assert rows[plain.id] == [plain.id, "plain", "user", "active"]
    assert rows[revoked.id] == [revoked.id, "gone", "batch", "revoked", "max_concurrent=1"]


@pytest.mark.parametrize("role", ["admin", "user", "tenant", "batch"])
def test_every_configured_role_is_accepted(
    tmp_path: Path, cfg: str, role: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "create", "--name", "k", "--role", role, "--config", cfg]) == 0
    assert store(tmp_path).list()[0].role == role


def test_an_unknown_role_is_refused_naming_the_configured_ones(
    tmp_path: Path, cfg: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "create", "--name", "k", "--role", "tenat", "--config", cfg]) == 1
    err = capsys.readouterr().err
    assert "unknown role 'tenat'" in err
    assert "admin, batch, tenant, user" in err
    assert store(tmp_path).list() == []


def test_without_config_the_builtin_roles_are_the_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the default config keeps keys in ./.ostiary
    assert main(["keys", "create", "--name", "k", "--role", "tenant"]) == 1
    assert "configured roles are: admin, user" in capsys.readouterr().err
    assert main(["keys", "create", "--name", "k", "--role", "user"]) == 0
    assert parse_key_id(capsys.readouterr().out.strip()) is not None


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--expires-in", "30"], "argument --expires-in: '30' is not a duration"),
        (["--expires-in", "0s"], "more than 0s"),
        (["--requests-per-minute", "0"], "argument --requests-per-minute: '0' is not a limit"),
        (["--tokens-per-minute", "lots"], "argument --tokens-per-minute"),
        (["--max-concurrent", "-2"], "argument --max-concurrent"),
    ],
)
def test_bad_flags_are_clear_errors(
    tmp_path: Path, cfg: str, capsys: pytest.CaptureFixture[str], flags: list[str], words: str
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["keys", "create", "--name", "k", "--role", "user", "--config", cfg, *flags])
    assert info.value.code == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "st" / "keys.sqlite3").exists()


@pytest.mark.parametrize("name", ["a\tb", "two\nlines", "bell\x07", "del\x7f", "x" * 201])
def test_a_name_that_would_break_the_listing_is_refused(
    tmp_path: Path, cfg: str, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    # `keys list` prints one tab-separated line per key: a tab or a newline in a
    # name would shift its fields or forge a line that looks like another key.
    assert main(["keys", "create", "--name", name, "--role", "user", "--config", cfg]) == 1
    assert "name" in capsys.readouterr().err
    assert store(tmp_path).list() == []


def test_a_printable_name_is_kept_as_given(
    tmp_path: Path, cfg: str, capsys: pytest.CaptureFixture[str]
) -> None:
    name = "équipe data — CI #2"
    assert main(["keys", "create", "--name", name, "--role", "user", "--config", cfg]) == 0
    assert store(tmp_path).list()[0].name == name
