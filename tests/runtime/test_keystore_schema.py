"""The key store's schema migration, its WAL mode and sharing by several processes,
and the new key fields reaching the gateway's table."""

from __future__ import annotations

import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path

import orjson
import pytest
import trio
import trio.testing

from ostiary.backends.scripted import ScriptedBackend, ScriptedSettings
from ostiary.protocol.access import LimitSet
from ostiary.protocol.auth import digest_secret, format_secret
from ostiary.protocol.errors import AuthenticationError
from ostiary.protocol.exchange import BackendPolicy
from ostiary.protocol.gateway import Gateway, ModelRoute
from ostiary.runtime.driver import Driver
from ostiary.runtime.keystore import (
    SCHEMA_VERSION,
    KeyStore,
    KeyStoreError,
    SqliteKeyStore,
    open_key_store,
)
from tests.runtime.inprocess import in_memory

LAST_UNIX = 253_402_300_799

#: The schema of every store written before versioning (commit 2e48775 to f794845),
#: verbatim: such stores must keep working.
OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    digest BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE TABLE IF NOT EXISTS store_meta (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    generation INTEGER NOT NULL
);
INSERT OR IGNORE INTO store_meta (id, generation) VALUES (1, 0);
"""

LIVE = format_secret("0123456789ab", "L" * 43)
GONE = format_secret("ba9876543210", "G" * 43)


def old_store(path: Path) -> None:
    """A store as the previous version left it: one live key, one revoked."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(OLD_SCHEMA)
    conn.execute(
        "INSERT INTO api_keys (id, name, role, digest, created_at) VALUES (?, ?, ?, ?, ?)",
        ("0123456789ab", "live", "user", digest_secret(LIVE), 1_700_000_000),
    )
    conn.execute(
        "INSERT INTO api_keys (id, name, role, digest, created_at, revoked_at)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        ("ba9876543210", "gone", "admin", digest_secret(GONE), 1_700_000_001, 1_700_000_002),
    )
    conn.execute("UPDATE store_meta SET generation = 2")
    conn.close()


def pragma(path: Path, name: str) -> object:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"PRAGMA {name}").fetchone()[0]
    finally:
        conn.close()


def test_an_old_store_is_migrated_and_keeps_its_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys.sqlite3"
    old_store(path)
    assert pragma(path, "user_version") == 0
    store = SqliteKeyStore(path)
    generation, table, total = store.load()
    assert (generation, total) == (2, 2)
    record = table.authenticate(b"Bearer " + LIVE.encode(), 2e9)
    assert (record.id, record.name, record.role) == ("0123456789ab", "live", "user")
    assert record.expires_at is None and record.overrides.empty
    with pytest.raises(AuthenticationError, match="Incorrect API key"):
        table.authenticate(b"Bearer " + GONE.encode())
    assert pragma(path, "user_version") == SCHEMA_VERSION
    assert str(pragma(path, "journal_mode")).lower() == "wal"
    live, gone = store.list()
    assert (live.state(2e9), gone.state(2e9)) == ("active", "revoked")
    # New keys with the new fields live beside the old ones.
    info, _ = store.create("new", "user", expires_at=2e9, overrides=LimitSet(requests_per_minute=3))
    _, table, total = store.load()
    assert total == 3
    assert table.keys[info.id].overrides.requests_per_minute == 3
    assert table.authenticate(b"Bearer " + LIVE.encode()).id == "0123456789ab"
    # Opening it again (another process, a later start) migrates nothing twice.
    assert SqliteKeyStore(path).load()[2] == 3


def test_the_old_code_path_still_reads_a_migrated_store(tmp_path: Path) -> None:
    """A replica still running the previous version reads and writes the columns it
    knows: the migration only added nullable columns."""
    path = tmp_path / "keys.sqlite3"
    old_store(path)
    SqliteKeyStore(path).load()
    conn = sqlite3.connect(path, isolation_level=None)
    rows = conn.execute("SELECT id, name, role, digest, revoked_at FROM api_keys").fetchall()
    conn.execute(
        "INSERT INTO api_keys (id, name, role, digest, created_at) VALUES (?, ?, ?, ?, ?)",
        ("00000000000f", "by-old", "user", b"\x01" * 32, 1_700_000_005),
    )
    conn.close()
    assert len(rows) == 2
    assert "00000000000f" in SqliteKeyStore(path).load()[1].keys


def test_openers_racing_on_an_old_store_migrate_it_once(tmp_path: Path) -> None:
    """Eight openers at once on a store in the old journal mode, many times over: the
    switch to WAL takes its lock without SQLite's busy handler, so some would see
    "database is locked" unless they try again."""
    for round_ in range(25):
        path = tmp_path / f"keys{round_}.sqlite3"
        old_store(path)
        start = threading.Barrier(8)
        errors: list[BaseException] = []

        def open_it(
            path: Path = path,
            start: threading.Barrier = start,
            errors: list[BaseException] = errors,
        ) -> None:
            start.wait()
            try:
                SqliteKeyStore(path).load()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=open_it) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert pragma(path, "user_version") == SCHEMA_VERSION
        assert pragma(path, "journal_mode") == "wal"


def test_a_store_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "keys.sqlite3"
    SqliteKeyStore(path).load()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(KeyStoreError, match="newer than this Ostiary"):
        SqliteKeyStore(path).list()


def test_a_hand_edited_bad_row_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "keys.sqlite3"
    store = SqliteKeyStore(path)
    info, _ = store.create("k", "user")
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("UPDATE api_keys SET max_concurrent = 0")
    conn.close()
    with pytest.raises(KeyStoreError, match=f"key {info.id}: max_concurrent"):
        store.load()
    with pytest.raises(KeyStoreError, match=f"key {info.id}: max_concurrent"):
        store.list()


def test_the_wal_file_is_private_too(tmp_path: Path) -> None:
    path = tmp_path / "keys.sqlite3"
    store = SqliteKeyStore(path)
    store.load()
    reader = sqlite3.connect(path)  # holds the WAL open while the CLI writes
    try:
        reader.execute("SELECT count(*) FROM api_keys").fetchone()
        store.create("k", "user")
        wal = path.with_name(path.name + "-wal")
        assert wal.exists()
        assert stat.S_IMODE(wal.stat().st_mode) == 0o600
        assert reader.execute("SELECT count(*) FROM api_keys").fetchone()[0] == 1
    finally:
        reader.close()


WRITER = """
import sys
from pathlib import Path
from ostiary.runtime.keystore import SqliteKeyStore
store = SqliteKeyStore(Path(sys.argv[1]))
for i in range(int(sys.argv[2])):
    store.create(f"p{sys.argv[3]}-{i}", "user")
    store.load()
"""


def test_processes_sharing_one_store_lose_no_write(tmp_path: Path) -> None:
    """Replicas and the CLI share one file: concurrent creators (each also polling,
    as a server does) all succeed, and every key and generation bump is kept."""
    path = tmp_path / "keys.sqlite3"
    old_store(path)  # and they race to migrate it, too
    per, procs = 15, 4
    children = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(per), str(n)],
            stderr=subprocess.PIPE,
        )
        for n in range(procs)
    ]
    for child in children:
        _, err = child.communicate(timeout=60)
        assert child.returncode == 0, err.decode()
    generation, table, total = SqliteKeyStore(path).load()
    assert total == 2 + per * procs
    assert len(table.keys) == 1 + per * procs
    assert generation == 2 + per * procs


def test_new_fields_round_trip_to_the_gateway_table(tmp_path: Path) -> None:
    store: KeyStore = open_key_store(tmp_path / "keys.sqlite3")
    overrides = LimitSet(
        requests_per_minute=10,
        tokens_per_minute=2000,
        requests_per_day=100,
        tokens_per_day=50_000,
        max_concurrent=2,
    )
    info, secret = store.create("svc", "user", expires_at=1_796_126_400.0, overrides=overrides)
    assert (info.expires_at, info.overrides) == (1_796_126_400.0, overrides)
    (listed,) = store.list()
    assert listed == info
    _, table, _ = store.load()
    record = table.keys[info.id]
    assert record.expires_at == 1_796_126_400.0
    assert record.overrides == overrides
    assert listed.state(1_796_126_399.9) == "active"
    assert listed.state(1_796_126_400.0) == "expired"
    with pytest.raises(AuthenticationError, match="expired at 2026-12-01T12:00:00Z"):
        table.authenticate(f"Bearer {secret}".encode(), 1_796_126_400.0)


async def test_an_expired_key_gets_401_over_http(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The driver passes the real wall time: a key that expired is told so, a key
    expiring in the future still works, both read from the store as a server does."""
    keys = SqliteKeyStore(tmp_path / "keys.sqlite3")
    _, expired = keys.create("old", "user", expires_at=1_000_000_000)
    _, fresh = keys.create("new", "user", expires_at=LAST_UNIX)
    _, table, _ = keys.load()
    gateway = Gateway(
        routes=[ModelRoute("s", "scripted")],
        keys=table,
        backends=[BackendPolicy(name="scripted", max_concurrency=2, max_queue=4)],
    )
    backend = ScriptedBackend(ScriptedSettings(models=("s",), chunks=2))
    async with in_memory(Driver(gateway, {"scripted": backend})) as connect:
        client = await connect()
        await client.request("GET", "/v1/models", b"", authorization=f"Bearer {expired}")
        status, headers, body = await client.response()
        error = orjson.loads(body)["error"]
        assert (status, error["code"]) == (401, "expired_api_key")
        assert error["message"] == "This API key expired at 2001-09-09T01:46:40Z."
        assert headers[b"www-authenticate"].startswith(b"Bearer")
        await client.request("GET", "/v1/models", b"", authorization=f"Bearer {fresh}")
        status, _, _ = await client.response()
        assert status == 200
