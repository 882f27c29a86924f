"""API keys at rest: a SQLite file holding only SHA-256 digests of the secrets.

The CLI writes it; a running server reads it whole into an in-memory
:class:`~ostiary.protocol.auth.KeyTable` and polls a change counter (one tiny query
per ``key_reload_interval``) to pick up keys created or revoked since. No request
ever waits on the database.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs

from ostiary.protocol.auth import ApiKey, KeyTable, digest_secret, format_secret

__all__ = ["KeyInfo", "KeyStore", "KeyStoreError", "write_bootstrap_key"]

_SCHEMA = """
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


class KeyStore:
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
                # Create it readable by its owner only, before anything is in it.
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW, 0o600))
            conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise KeyStoreError(f"cannot open key store {self.path}: {exc}") from None
        try:
            if not self._ready:
                conn.executescript(_SCHEMA)
                self._ready = True
            yield conn
        except sqlite3.Error as exc:
            raise KeyStoreError(f"key store {self.path}: {exc}") from None
        finally:
            conn.close()

    def create(self, name: str, role: str) -> tuple[KeyInfo, str]:
        """Create a key; returns its record and the secret (shown once, never stored)."""
        if not name or not role:
            raise KeyStoreError("a key needs a non-empty name and role")
        key_id = secrets.token_hex(6)
        secret = format_secret(key_id, secrets.token_urlsafe(32))
        now = int(time.time())
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "INSERT INTO api_keys (id, name, role, digest, created_at) VALUES (?, ?, ?, ?, ?)",
                (key_id, name, role, digest_secret(secret), now),
            )
            conn.execute("UPDATE store_meta SET generation = generation + 1")
            conn.execute("COMMIT")
        return KeyInfo(key_id, name, role, now, None), secret

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
            rows = conn.execute(
                "SELECT id, name, role, created_at, revoked_at FROM api_keys"
                " ORDER BY created_at, id"
            ).fetchall()
        return [KeyInfo(*row) for row in rows]

    def generation(self) -> int:
        """A counter that changes whenever a key is created or revoked."""
        with self._connect() as conn:
            (value,) = conn.execute("SELECT generation FROM store_meta").fetchone()
        return int(value)

    def load(self) -> tuple[int, KeyTable, int]:
        """(generation, table of active keys, number of keys ever created)."""
        with self._connect() as conn:
            conn.execute("BEGIN")
            (gen,) = conn.execute("SELECT generation FROM store_meta").fetchone()
            rows = conn.execute(
                "SELECT id, name, role, digest, revoked_at FROM api_keys"
            ).fetchall()
            conn.execute("COMMIT")
        table = KeyTable.of(
            ApiKey(id=r[0], name=r[1], role=r[2], digest=bytes(r[3])) for r in rows if r[4] is None
        )
        return int(gen), table, len(rows)


def write_bootstrap_key(path: Path, secret: str) -> None:
    """Write the bootstrap admin secret to ``path``, readable by its owner only."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, secret.encode("ascii") + b"\n")
    finally:
        os.close(fd)
