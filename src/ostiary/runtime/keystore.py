"""API keys at rest: a store holding only SHA-256 digests of the secrets.

The CLI writes it; a running server reads it whole into an in-memory
:class:`~ostiary.protocol.auth.KeyTable` and polls a change counter (one tiny query
per ``key_reload_interval``) to pick up keys created or revoked since. No request
ever waits on the store.

:class:`KeyStore` is the interface the server and the CLI use; :class:`SqliteKeyStore`
is the one implementation today, a file that several processes on one machine (the
replicas of one server, the CLI) share. A store shared across hosts only needs to
implement the same five methods.

The SQLite schema is versioned with ``PRAGMA user_version``: every store, new or
old, runs the same chain of migrations from its version up to :data:`SCHEMA_VERSION`,
in one write transaction, so two processes opening an old file at once migrate it
once. The file is in WAL mode, so readers (every replica's poll) never block the
CLI's writes or each other, and writers wait up to ``busy_timeout`` for one another.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import attrs

from ostiary.protocol.access import LimitSet
from ostiary.protocol.auth import ApiKey, KeyTable, digest_secret, format_secret

__all__ = [
    "NO_OVERRIDES",
    "OVERRIDES",
    "SCHEMA_VERSION",
    "KeyInfo",
    "KeyStore",
    "KeyStoreError",
    "SqliteKeyStore",
    "open_key_store",
    "write_bootstrap_key",
]

#: The limits a key may override, as its record's fields and the store's columns.
OVERRIDES = (
    "requests_per_minute",
    "tokens_per_minute",
    "requests_per_day",
    "tokens_per_day",
    "max_concurrent",
)

#: Version 0 is the first schema (no expiry, no overrides); each later version is
#: the statements that take a store from the one before to it.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE IF NOT EXISTS api_keys (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            role TEXT NOT NULL,
            digest BLOB NOT NULL,
            created_at INTEGER NOT NULL,
            revoked_at INTEGER
        )""",
        """CREATE TABLE IF NOT EXISTS store_meta (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            generation INTEGER NOT NULL
        )""",
        "INSERT OR IGNORE INTO store_meta (id, generation) VALUES (1, 0)",
    ),
    (
        "ALTER TABLE api_keys ADD COLUMN expires_at REAL",
        *(f"ALTER TABLE api_keys ADD COLUMN {name} INTEGER" for name in OVERRIDES),
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)

#: Milliseconds a connection waits for another process's write lock.
BUSY_TIMEOUT_MS = 10_000
#: Characters of a key's name; it must be printable, as ``keys list`` prints it
#: between tabs, one key a line.
MAX_NAME_LENGTH = 200

_INSERT = """INSERT INTO api_keys (id, name, role, digest, created_at, expires_at,
    requests_per_minute, tokens_per_minute, requests_per_day, tokens_per_day, max_concurrent)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"""
_LIST = """SELECT id, name, role, created_at, revoked_at, expires_at,
    requests_per_minute, tokens_per_minute, requests_per_day, tokens_per_day, max_concurrent
    FROM api_keys ORDER BY created_at, id"""
_LOAD = """SELECT id, name, role, digest, revoked_at, expires_at,
    requests_per_minute, tokens_per_minute, requests_per_day, tokens_per_day, max_concurrent
    FROM api_keys"""
#: No override: every limit is the role's.
NO_OVERRIDES = LimitSet()


class KeyStoreError(Exception):
    """The key store cannot be used (unreadable file, unknown key id...)."""


@attrs.frozen
class KeyInfo:
    """A key as ``ostiary keys list`` shows it: never the secret or its digest."""

    id: str
    name: str
    role: str
    created_at: int
    revoked_at: int | None
    expires_at: float | None = None
    overrides: LimitSet = NO_OVERRIDES

    def state(self, wall: float) -> str:
        """``revoked``, ``expired`` (at Unix time ``wall``) or ``active``."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and wall >= self.expires_at:
            return "expired"
        return "active"


class KeyStore(Protocol):
    """Where keys live. Every method may block (the server calls them from a worker
    thread) and raises :class:`KeyStoreError` when the store cannot be used."""

    def create(
        self,
        name: str,
        role: str,
        *,
        expires_at: float | None = None,
        overrides: LimitSet = NO_OVERRIDES,
    ) -> tuple[KeyInfo, str]:
        """Create a key; returns its record and the secret (shown once, never stored)."""
        ...

    def create_first(self, name: str, role: str) -> tuple[KeyInfo, str] | None:
        """Create a key only if the store has never held one, atomically: of several
        replicas starting at once on an empty store, one creates it, the others get
        ``None``."""
        ...

    def revoke(self, key_id: str) -> None:
        """Revoke an active key; an unknown or already revoked id is an error."""
        ...

    def list(self) -> list[KeyInfo]:
        """Every key ever created, revoked ones included, oldest first."""
        ...

    def generation(self) -> int:
        """A counter that changes whenever a key is created or revoked."""
        ...

    def load(self) -> tuple[int, KeyTable, int]:
        """(generation, table of unrevoked keys, number of keys ever created).
        Expired keys stay in the table, so that they are told they expired."""
        ...


def open_key_store(path: Path) -> KeyStore:
    """The store a config's ``keys_db`` names."""
    return SqliteKeyStore(path)


class SqliteKeyStore:
    """One SQLite file of keys. Each call opens its own short connection, so the
    store can be used from worker threads and by several processes at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._ready = False

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            if not self.path.exists():
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                # Create it readable by its owner only, before anything is in it
                # (SQLite gives its -wal and -shm files the same mode).
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW, 0o600))
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise KeyStoreError(f"cannot open key store {self.path}: {exc}") from None
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            if not self._ready:
                self._prepare(conn)
                self._ready = True
            yield conn
        except sqlite3.Error as exc:
            raise KeyStoreError(f"key store {self.path}: {exc}") from None
        finally:
            conn.close()

    @staticmethod
    def _use_wal(conn: sqlite3.Connection) -> str:
        """Switch the file to WAL mode (once: it stays so). The switch takes an
        exclusive lock without SQLite's busy handler, so openers racing on a store
        in the old mode would see "database is locked" at once: try again for up to
        ``busy_timeout``, until one of them has switched it."""
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                (mode,) = conn.execute("PRAGMA journal_mode").fetchone()
                if str(mode).lower() == "wal":
                    return str(mode)
                (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
                return str(mode)
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(0.005)

    def _prepare(self, conn: sqlite3.Connection) -> None:
        """WAL mode (a property of the file, kept once set) and the migrations."""
        mode = self._use_wal(conn)
        if str(mode).lower() != "wal":
            raise KeyStoreError(f"key store {self.path}: cannot use WAL mode (got {mode!r})")
        conn.execute("BEGIN IMMEDIATE")
        try:
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version > SCHEMA_VERSION:
                raise KeyStoreError(
                    f"key store {self.path} has schema version {version}, newer than this "
                    f"Ostiary's {SCHEMA_VERSION}: upgrade Ostiary"
                )
            for statements in _MIGRATIONS[version:]:
                for statement in statements:
                    conn.execute(statement)
            if version != SCHEMA_VERSION:
                # PRAGMA takes no parameters; the value is our own constant.
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def create(
        self,
        name: str,
        role: str,
        *,
        expires_at: float | None = None,
        overrides: LimitSet = NO_OVERRIDES,
    ) -> tuple[KeyInfo, str]:
        created = self._create(name, role, expires_at, overrides, only_if_empty=False)
        assert created is not None
        return created

    def create_first(self, name: str, role: str) -> tuple[KeyInfo, str] | None:
        return self._create(name, role, None, NO_OVERRIDES, only_if_empty=True)

    def _create(
        self,
        name: str,
        role: str,
        expires_at: float | None,
        overrides: LimitSet,
        *,
        only_if_empty: bool,
    ) -> tuple[KeyInfo, str] | None:
        if not name or not role:
            raise KeyStoreError("a key needs a non-empty name and role")
        if len(name) > MAX_NAME_LENGTH or not name.isprintable():
            raise KeyStoreError(
                f"a key's name must be at most {MAX_NAME_LENGTH} printable characters "
                "(no tabs, newlines or other control characters)"
            )
        key_id = secrets.token_hex(6)
        secret = format_secret(key_id, secrets.token_urlsafe(32))
        now = int(time.time())
        limits = tuple(getattr(overrides, field) for field in OVERRIDES)
        with self._connect() as conn:
            # BEGIN IMMEDIATE takes the write lock before the count is read, so two
            # processes cannot both find the store empty.
            conn.execute("BEGIN IMMEDIATE")
            if only_if_empty and conn.execute("SELECT 1 FROM api_keys LIMIT 1").fetchone():
                conn.execute("ROLLBACK")
                return None
            conn.execute(
                _INSERT,
                (key_id, name, role, digest_secret(secret), now, expires_at, *limits),
            )
            conn.execute("UPDATE store_meta SET generation = generation + 1")
            conn.execute("COMMIT")
        return KeyInfo(key_id, name, role, now, None, expires_at, overrides), secret

    def revoke(self, key_id: str) -> None:
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            cur = conn.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (int(time.time()), key_id),
            )
            if cur.rowcount != 1:
                conn.execute("ROLLBACK")
                raise KeyStoreError(f"no active key with id {key_id!r}")
            conn.execute("UPDATE store_meta SET generation = generation + 1")
            conn.execute("COMMIT")

    def list(self) -> list[KeyInfo]:
        with self._connect() as conn:
            rows = conn.execute(_LIST).fetchall()
        return [self._info(row) for row in rows]

    def generation(self) -> int:
        with self._connect() as conn:
            (value,) = conn.execute("SELECT generation FROM store_meta").fetchone()
        return int(value)

    def load(self) -> tuple[int, KeyTable, int]:
        with self._connect() as conn:
            conn.execute("BEGIN")
            (gen,) = conn.execute("SELECT generation FROM store_meta").fetchone()
            rows = conn.execute(_LOAD).fetchall()
            conn.execute("COMMIT")
        keys = []
        for row in rows:
            if row[4] is None:
                try:
                    keys.append(
                        ApiKey(
                            row[0],
                            row[1],
                            row[2],
                            bytes(row[3]),
                            expires_at=row[5],
                            **dict(zip(OVERRIDES, row[6:], strict=True)),
                        )
                    )
                except (TypeError, ValueError) as exc:
                    raise KeyStoreError(f"key store {self.path}: key {row[0]}: {exc}") from None
        return int(gen), KeyTable.of(keys), len(rows)

    def _info(self, row: Any) -> KeyInfo:
        key_id, name, role, created_at, revoked_at, expires_at, *limits = row
        try:
            overrides = LimitSet(**dict(zip(OVERRIDES, limits, strict=True)))
        except (TypeError, ValueError) as exc:
            raise KeyStoreError(f"key store {self.path}: key {key_id}: {exc}") from None
        return KeyInfo(key_id, name, role, created_at, revoked_at, expires_at, overrides)


def write_bootstrap_key(path: Path, secret: str) -> None:
    """Write the bootstrap admin secret to ``path``, readable by its owner only."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, secret.encode("ascii") + b"\n")
    finally:
        os.close(fd)
