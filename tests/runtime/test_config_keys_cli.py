"""Config loading, the SQLite key store, the CLI and log redaction."""

from __future__ import annotations

import io
import json
import logging
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from ostiary.backends.scripted import ScriptedSettings
from ostiary.protocol.auth import KeyTable, parse_key_id
from ostiary.protocol.errors import AuthenticationError
from ostiary.runtime.cli import main
from ostiary.runtime.config import (
    AuthSettings,
    ConfigError,
    default_config,
    load_config,
    parse_config,
)
from ostiary.runtime.keystore import KeyStoreError, SqliteKeyStore
from ostiary.runtime.logs import redact, setup_logging
from ostiary.runtime.server import bootstrap_keys, watch_keys

SCRIPTED = """
[[backends]]
name = "s"
kind = "scripted"
models = ["a", "b"]
"""


def test_full_config() -> None:
    text = (
        """
[server]
host = "0.0.0.0"
port = 9000
header_timeout = 5
max_connections = 10
max_body_chunks = 64
access_log = false
log_format = "text"
[auth]
key_reload_interval = 0.5
[limits]
max_messages = 3
max_body_bytes = 2048
"""
        + SCRIPTED
        + """
chunks = 3
chunk_delay = 0.5
[[backends]]
name = "up"
kind = "openai"
models = ["relay"]
base_url = "http://127.0.0.1:1/v1"
api_key_env = "UPSTREAM_KEY"
max_concurrency = 2
"""
    )
    config = parse_config(text, "f.toml")
    assert config.server.port == 9000
    assert config.server.header_timeout == 5.0
    assert isinstance(config.server.header_timeout, float)
    assert config.server.http().max_connections == 10
    assert config.server.http().max_body_chunks == 64
    assert config.limits.max_messages == 3
    assert config.auth.key_reload_interval == 0.5
    scripted, upstream = config.backends
    assert isinstance(scripted, ScriptedSettings)
    assert scripted.chunks == 3
    assert upstream.kind == "openai"
    assert upstream.max_concurrency == 2
    assert config.keys_db == Path(".ostiary/keys.sqlite3")


def test_decoding_bounds_are_limits_keys() -> None:
    keys = {
        "max_json_containers": 50,
        "max_json_keys": 60,
        "max_content_parts": 7,
        "max_tool_calls": 8,
        "max_logit_bias": 9,
        "max_token_ids": 10,
        "max_schema_nodes": 11,
        "max_schema_depth": 12,
        "max_schema_bytes": 13,
        "max_output_tool_calls": 14,
        "max_output_argument_bytes": 15,
    }
    text = "[limits]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()) + SCRIPTED
    limits = parse_config(text, "f.toml").limits
    assert {k: getattr(limits, k) for k in keys} == keys
    with pytest.raises(ConfigError, match="max_json_depth"):
        parse_config("[limits]\nmax_json_depth = 255\n" + SCRIPTED, "f.toml")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[server]\nprot = 1\n" + SCRIPTED, "unknown key 'server.prot'"),
        ("[sever]\n" + SCRIPTED, "unknown key 'sever'"),
        ("[server]\nport = '80'\n" + SCRIPTED, "invalid value for 'server.port'"),
        ("[server]\nport = 70000\n" + SCRIPTED, "server"),
        ("[server]\naccess_log = 1\n" + SCRIPTED, "invalid value for 'server.access_log'"),
        ("[server]\nlog_level = 'loud'\n" + SCRIPTED, "log_level"),
        ("[limits]\nmax_n = 0\n" + SCRIPTED, "max_n"),
        ("[server]\nmax_body_chunks = 0\n" + SCRIPTED, "max_body_chunks"),
        (SCRIPTED + "chunkz = 1\n", "unknown key 'backends[0] (\"s\").chunkz'"),
        (SCRIPTED + "chunks = 0\n", "chunks"),
        (SCRIPTED.replace("scripted", "magic"), "kind must be one of"),
        (
            '[[backends]]\nname = "u"\nkind = "openai"\nmodels = ["x"]\n',
            "missing required key 'backends[0] (\"u\").base_url'",
        ),
        ("", "no [[backends]]"),
        (SCRIPTED + SCRIPTED, "two backends are named 's'"),
        (SCRIPTED + SCRIPTED.replace('"s"', '"t"'), "model 'a' is served by both"),
        (SCRIPTED.replace('["a", "b"]', "[]"), "lists no models"),
        ("[server\n", "not valid TOML"),
        ("backends = 3", "backends"),
    ],
)
def test_config_errors_name_file_and_key(text: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "my.toml")
    assert str(info.value).startswith("my.toml: ")
    assert words in str(info.value)


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("redis://127.0.0.1:99999/0", "Port out of range"),
        ("redis://127.0.0.1:abc/0", "Port could not be cast"),
        ("redis://[::1/0", "Invalid IPv6 URL"),
        ("rediss://h/0", "not 'rediss://h/0'"),
        ("redis://h:6379/0?db=1", "not 'redis://h:6379/0?db=1'"),
    ],
)
def test_a_redis_url_that_serve_could_not_use_is_refused_clearly(url: str, words: str) -> None:
    """``config check`` used to pass a port out of range (``serve`` then died with a
    traceback), and attrs' validators printed their whole ``Attribute`` repr."""
    with pytest.raises(ConfigError) as info:
        parse_config(f'[redis]\nurl = "{url}"\n' + SCRIPTED, "my.toml")
    message = str(info.value)
    assert message.startswith("my.toml: invalid value for 'redis': url must look like redis://")
    assert words in message and "Attribute(" not in message


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (
            "[server]\nlog_level = 'loud'\n",
            "'log_level' must be in ('debug', 'info', 'warning', 'error') (got 'loud')",
        ),
        (
            "[redis]\nurl = 'redis://h/0'\non_failure = 'x'\n",
            "'on_failure' must be in ('refuse', 'local') (got 'x')",
        ),
    ],
)
def test_a_choice_outside_its_options_reads_as_one_sentence(text: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text + SCRIPTED, "my.toml")
    assert str(info.value).endswith(words)


def test_load_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad)
    good = tmp_path / "good.toml"
    good.write_text(SCRIPTED)
    assert load_config(good).source == str(good)


def test_default_config_is_the_embedded_model() -> None:
    config = default_config()
    (backend,) = config.backends
    assert backend.kind == "embedded"
    assert "smollm2-135m-instruct" in backend.models


def test_key_store_lifecycle(tmp_path: Path) -> None:
    store = SqliteKeyStore(tmp_path / "state" / "keys.sqlite3")
    assert store.load()[2] == 0
    info, secret = store.create("ci", "user")
    assert parse_key_id(secret) == info.id
    assert len(secret) >= 4 + 12 + 1 + 43
    gen, table, total = store.load()
    assert total == 1
    assert table.authenticate(b"Bearer " + secret.encode()).role == "user"
    raw = (tmp_path / "state" / "keys.sqlite3").read_bytes()
    assert secret.encode() not in raw
    assert secret[len("ost_") + 13 :].encode() not in raw  # the random part
    assert stat.S_IMODE((tmp_path / "state" / "keys.sqlite3").stat().st_mode) == 0o600
    store.revoke(info.id)
    assert store.generation() > gen
    assert store.load()[1].keys == {}
    assert store.list()[0].revoked_at is not None
    with pytest.raises(KeyStoreError, match="no active key"):
        store.revoke(info.id)
    with pytest.raises(KeyStoreError, match="non-empty"):
        store.create("", "x")


def test_unusable_key_store(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(KeyStoreError):
        SqliteKeyStore(blocker / "keys.sqlite3").list()
    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(b"not a database" * 100)
    with pytest.raises(KeyStoreError):
        SqliteKeyStore(garbage).list()


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(f'[server]\nstate_dir = "{tmp_path / "st"}"\n' + SCRIPTED)
    return path


def test_bootstrap_key(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    config = load_config(write_config(tmp_path))
    bootstrap_keys(config)
    key_file = tmp_path / "st" / "admin.key"
    secret = key_file.read_text().strip()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert str(key_file) in caplog.text
    assert secret not in caplog.text
    bootstrap_keys(config)  # not empty any more: nothing new
    assert key_file.read_text().strip() == secret
    assert len(SqliteKeyStore(config.keys_db).list()) == 1


def test_a_bootstrap_key_that_cannot_be_written_is_revoked(tmp_path: Path) -> None:
    """If ``admin.key`` cannot be written (here a symlink, refused), start-up stops
    naming the path, and the key it created is not left active with nobody holding
    its secret."""
    from ostiary.runtime.server import StartupError

    config = load_config(write_config(tmp_path))
    (tmp_path / "st").mkdir(mode=0o700)
    (tmp_path / "st" / "admin.key").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StartupError, match=r"admin\.key.*revoked.*keys create"):
        bootstrap_keys(config)
    assert not (tmp_path / "elsewhere").exists()
    (info,) = SqliteKeyStore(config.keys_db).list()
    assert info.revoked_at is not None


def test_replicas_starting_together_create_one_bootstrap_key(tmp_path: Path) -> None:
    """Several processes on one empty store: exactly one insert finds it empty (the
    write lock is taken before the count is read), whatever the interleaving."""
    db = tmp_path / "keys.db"
    SqliteKeyStore(db).list()  # the schema exists; the store is empty
    stores = [SqliteKeyStore(db) for _ in range(8)]
    start = threading.Barrier(len(stores))
    results: list[object] = [None] * len(stores)

    def race(i: int) -> None:
        start.wait()
        results[i] = stores[i].create_first("bootstrap-admin", "admin")

    threads = [threading.Thread(target=race, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r is not None for r in results) == 1
    assert len(SqliteKeyStore(db).list()) == 1
    # A store that has held a key, revoked since, is not empty either.
    (info,) = SqliteKeyStore(db).list()
    SqliteKeyStore(db).revoke(info.id)
    assert SqliteKeyStore(db).create_first("bootstrap-admin", "admin") is None


def test_cli_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(write_config(tmp_path))
    assert main(["keys", "create", "--name", "svc", "--role", "user", "--config", cfg]) == 0
    secret = capsys.readouterr().out
    assert secret.endswith("\n") and secret.count("\n") == 1
    key_id = parse_key_id(secret.strip())
    assert key_id is not None
    assert main(["keys", "list", "--config", cfg]) == 0
    listing = capsys.readouterr().out
    assert f"{key_id}\tsvc\tuser\tactive" in listing
    assert secret.strip() not in listing
    assert main(["keys", "revoke", key_id, "--config", cfg]) == 0
    assert main(["keys", "list", "--config", cfg]) == 0
    assert "revoked" in capsys.readouterr().out
    assert main(["keys", "revoke", key_id, "--config", cfg]) == 1
    assert "no active key" in capsys.readouterr().err


def test_cli_config_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path)
    assert main(["config", "check", str(cfg)]) == 0
    assert "ok (1 backends, 2 models)" in capsys.readouterr().out
    assert main(["config", "check", "--config", str(cfg)]) == 0
    cfg.write_text("[nope]\n" + SCRIPTED)
    assert main(["config", "check", str(cfg)]) == 1
    assert "unknown key 'nope'" in capsys.readouterr().err
    assert main(["config", "check"]) == 1


class Tables:
    """Stands in for the driver: keeps the last key table it was handed."""

    def __init__(self, keys: KeyTable) -> None:
        self.keys = keys

    async def replace(self, keys: KeyTable) -> None:
        self.keys = keys


#: Virtual seconds just before a poll is due.
EARLY = 1 / 64


@pytest.mark.parametrize("offset", [0.0, 0.25, 0.875])
async def test_running_server_picks_up_key_changes_at_the_next_poll(
    tmp_path: Path, mock_clock: trio.testing.MockClock, offset: float
) -> None:
    """A key created or revoked with the CLI works (or stops working) exactly at the
    server's first store poll after the change, never before: with the default
    ``key_reload_interval`` that is within 1 s, inside the README's 2 s. The clock
    is virtual and moved by hand, the store is read inline: no real time passes or
    is measured. ``offset`` is when, after a poll, the change is made."""
    every = AuthSettings().key_reload_interval
    assert every <= 2.0
    store = SqliteKeyStore(tmp_path / "k.sqlite3")
    generation, table, _ = store.load()
    gateway = Tables(table)

    async def inline(fn: Callable[[], Any]) -> Any:
        return fn()

    async def advance(seconds: float) -> None:
        mock_clock.jump(seconds)
        await trio.testing.wait_all_tasks_blocked()

    def works(secret: str) -> bool:
        try:
            gateway.keys.authenticate(f"Bearer {secret}".encode())
        except AuthenticationError:
            return False
        return True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_keys, store, gateway.replace, generation, every, inline)
        await advance(every)  # the first poll: nothing changed yet
        assert gateway.keys is table
        await advance(offset)
        info, secret = store.create("n", "r")
        await advance(every - offset - EARLY)
        assert not works(secret)
        await advance(EARLY)
        assert works(secret)
        assert gateway.keys.authenticate(f"Bearer {secret}".encode()).id == info.id
        await advance(offset)
        store.revoke(info.id)
        await advance(every - offset - EARLY)
        assert works(secret)
        await advance(EARLY)
        assert not works(secret)
        assert not gateway.keys.keys
        nursery.cancel_scope.cancel()


async def test_key_watcher_survives_a_broken_store(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.conftest import key_table

    class Broken(SqliteKeyStore):
        def generation(self) -> int:
            raise PermissionError("store went away")

    async def inline(fn: Callable[[], Any]) -> Any:
        return fn()

    gateway = Tables(key_table())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_keys, Broken(tmp_path / "k"), gateway.replace, 0, 1.0, inline)
        await trio.sleep(3.5)
        nursery.cancel_scope.cancel()
    assert gateway.keys == key_table()
    assert caplog.text.count("cannot reload API keys") == 3


def test_redaction() -> None:
    secret = "ost_0123456789ab_" + "Z" * 43
    text = f"key {secret} and Bearer abc.def and sk-proj-ABCDEFGH12345678 done"
    out = redact(text)
    assert secret not in out and "abc.def" not in out and "ABCDEFGH" not in out
    assert out.endswith("done")


def test_logging_redacts_messages_fields_and_tracebacks() -> None:
    stream = io.StringIO()
    setup_logging("debug", "json", stream)
    try:
        secret = "ost_0123456789ab_" + "Q" * 43
        log = logging.getLogger("ostiary.test")
        log.info(
            "got %s",
            secret,
            extra={
                "fields": {
                    "authorization": "Bearer x",
                    "note": secret,
                    "prompt_tokens": 3,
                    "key_id": "abc",
                }
            },
        )
        try:
            raise ValueError(secret)
        except ValueError:
            log.exception("boom")
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        assert secret not in stream.getvalue()
        assert lines[0]["authorization"] == "[redacted]"
        assert lines[0]["prompt_tokens"] == 3
        assert lines[0]["key_id"] == "abc"
        assert "ValueError" in lines[1]["exc"]
        text_stream = io.StringIO()
        setup_logging("info", "text", text_stream)
        log.info("plain", extra={"fields": {"a": 1}})
        assert "plain a=1" in text_stream.getvalue()
    finally:
        setup_logging("warning", "text")


def test_example_configs_are_valid() -> None:
    examples = sorted((Path(__file__).parents[2] / "examples").glob("*.toml"))
    assert len(examples) >= 6
    for path in examples:
        assert load_config(path).backends, path
        # An embedding model an example names can create embeddings with it.
        for backend in load_config(path).backends:
            for model in backend.models:
                if "embed" in model:
                    assert model in backend.embedding_models, (path, model)


def test_cors_origins_must_be_origins(tmp_path: Path) -> None:
    from ostiary.runtime.config import ConfigError, parse_config

    good = parse_config(
        '[server]\ncors_origins = ["https://app.example:8443", "*"]\n' + SCRIPTED, "t"
    )
    assert good.server.cors_origins == ("https://app.example:8443", "*")
    with pytest.raises(ConfigError, match="is not an origin"):
        parse_config('[server]\ncors_origins = ["https://app.example/path"]\n' + SCRIPTED, "t")


def test_queue_and_metrics_keys(tmp_path: Path) -> None:
    from ostiary.protocol.fair_queue import FairQueue, scheduler_for
    from ostiary.protocol.scheduler import FifoScheduler
    from ostiary.runtime.config import ConfigError, parse_config

    config = parse_config(SCRIPTED, "t")
    policy = config.backends[0].policy()
    assert (policy.scheduler, policy.aging_seconds) == ("fair", 60.0)
    assert isinstance(scheduler_for(policy), FairQueue)
    assert config.server.metrics_allow == ()
    text = (
        '[server]\nmetrics_allow = ["10.0.0.0/8", "::1"]\n'
        + SCRIPTED
        + 'scheduler = "fifo"\naging_seconds = 5\nrate_window = 10\nservice_time = 0.5\n'
    )
    config = parse_config(text, "t")
    assert config.server.metrics_allow == ("10.0.0.0/8", "::1")
    policy = config.backends[0].policy()
    assert (policy.aging_seconds, policy.rate_window, policy.service_time) == (5.0, 10.0, 0.5)
    assert isinstance(scheduler_for(policy), FifoScheduler)
    with pytest.raises(ConfigError, match="scheduler"):
        parse_config(SCRIPTED + 'scheduler = "lifo"\n', "t")
    with pytest.raises(ConfigError, match="aging_seconds"):
        parse_config(SCRIPTED + "aging_seconds = 0\n", "t")
    with pytest.raises(ConfigError, match="not an address or network"):
        parse_config('[server]\nmetrics_allow = ["10.0.0.0/33"]\n' + SCRIPTED, "t")


JWT_TABLE = '[auth.jwt]\njwks_file = "j.json"\nissuer = "https://idp"\naudience = "o"\n'


@pytest.mark.parametrize("line", ['subject_claim = ""', 'roles_claim = ""', 'roles_claim = " "'])
def test_an_empty_jwt_claim_path_is_refused(line: str) -> None:
    # An empty path finds no claim in any token: every JWT
    # would be refused (no subject) or forbidden (no role) with a config that loads.
    with pytest.raises(ConfigError) as info:
        parse_config(JWT_TABLE + line + "\n" + SCRIPTED, "my.toml")
    assert "auth.jwt" in str(info.value) and line.partition(" ")[0] in str(info.value)


def test_dotted_and_namespaced_jwt_claim_paths_load() -> None:
    text = JWT_TABLE + 'roles_claim = "https://app.example/roles"\nsubject_claim = "a.b"\n'
    jwt = parse_config(text + SCRIPTED, "t").auth.jwt
    assert jwt is not None and jwt.subject_claim == "a.b"


def test_the_listening_url_brackets_an_ipv6_host() -> None:
    from urllib.parse import urlsplit

    from ostiary.runtime.server import listening_url

    assert listening_url("127.0.0.1", 8000) == "http://127.0.0.1:8000"
    v6 = urlsplit(listening_url("::1", 8001))
    assert (v6.hostname, v6.port) == ("::1", 8001)


async def test_the_token_counter_is_loaded_once_a_limit_needs_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A key with a token limit of its own, created while the server runs with no
    token limit in its config, gets its prompts counted with cl100k: the counter is
    loaded then (once), and handed over with the keys."""
    from types import SimpleNamespace

    from ostiary.runtime import server as server_module

    loads: list[int] = []
    codec = object()

    def load() -> object:
        loads.append(1)
        return codec

    monkeypatch.setattr(server_module, "load_cl100k", load)
    guard = SimpleNamespace(tokens=None)
    driver: Any = SimpleNamespace(gateway=SimpleNamespace(guard=guard))
    assert await server_module.counter_for(driver, needed=False) is None
    assert await server_module.counter_for(driver, needed=True) is codec
    guard.tokens = codec  # the gateway took it
    assert await server_module.counter_for(driver, needed=True) is None
    assert loads == [1]


def test_a_key_table_counts_tokens_when_a_key_has_a_token_limit() -> None:
    from tests.conftest import key_table

    table = key_table()
    assert not table.counts_tokens
    (admin, user) = table.keys.values()
    assert KeyTable.of([admin, attrs.evolve(user, tokens_per_day=500)]).counts_tokens
    assert not KeyTable.of([admin, attrs.evolve(user, requests_per_minute=5)]).counts_tokens


def test_python_warnings_are_log_records_in_the_log_s_format() -> None:
    """A library's warning (joserfc's SecurityWarning for a short RSA key) goes
    through the same handler and format as every other record, not to stderr raw."""
    import warnings

    stream = io.StringIO()
    # An earlier test's setup_logging left capture on, but pytest has since put its
    # own showwarning back: start from capture off, as a fresh process does.
    logging.captureWarnings(False)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        setup_logging("info", "json", stream)
        try:
            warnings.warn("Key size should be >= 2048 bits", UserWarning, stacklevel=1)
        finally:
            logging.captureWarnings(False)
            setup_logging("warning", "text")
    (line,) = [json.loads(text) for text in stream.getvalue().splitlines()]
    assert "Key size should be >= 2048 bits" in line["msg"]
    assert line["level"] == "warning"


async def test_a_key_table_that_failed_to_apply_is_tried_again(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """``replace`` may fail (loading the token counter, say): the store's change is
    then applied at the next poll, not skipped until the store changes again."""
    store = SqliteKeyStore(tmp_path / "k.sqlite3")
    generation = store.load()[0]
    applied: list[KeyTable] = []
    failures = [RuntimeError("counter")]

    async def replace(keys: KeyTable) -> None:
        if failures:
            raise failures.pop()
        applied.append(keys)

    async def inline(fn: Callable[[], Any]) -> Any:
        return fn()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_keys, store, replace, generation, 1.0, inline)
        await trio.testing.wait_all_tasks_blocked()  # it sleeps till its first poll
        store.create("n", "user")
        for _ in range(2):
            mock_clock.jump(1.0)
            await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert not failures and len(applied) == 1 and len(applied[0].keys) == 1
