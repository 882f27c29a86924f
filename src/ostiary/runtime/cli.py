"""The ``ostiary`` command line.

``ostiary serve [--config F] [--host H] [--port P]``,
``ostiary keys create --name N --role R [--expires-in 30d] [--requests-per-minute N]
...`` (prints the secret, only that, on stdout), ``ostiary keys list``,
``ostiary keys revoke ID``, ``ostiary config check F``. Every subcommand takes
``--config F``. Errors go to stderr with exit status 1 (2 for bad arguments).
"""

from __future__ import annotations

import argparse
import codecs
import functools
import re
import sys
import time
from collections.abc import Sequence

import trio

from ostiary.protocol.access import LimitSet
from ostiary.protocol.auth import format_utc

from .access_log import AccessLog
from .config import Config, ConfigError, ServerSettings, default_config, load_config
from .keystore import OVERRIDES, KeyInfo, KeyStoreError, open_key_store
from .logs import setup_logging

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ostiary", description="A secure, fair and fast OpenAI-compatible API server."
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="TOML config file")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", parents=[common], help="run the server")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default 8000)")

    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", parents=[common], help="create a key")
    create.add_argument("--name", required=True)
    create.add_argument("--role", required=True, help="a built-in or [[roles]] role")
    create.add_argument(
        "--expires-in",
        type=duration,
        metavar="DURATION",
        help="lifetime: a whole number and a unit, e.g. 30d, 12h, 90m, 3600s (default: never)",
    )
    for name in OVERRIDES:
        create.add_argument(
            "--" + name.replace("_", "-"),
            type=limit,
            metavar="N",
            help=f"this key's own {name} (default: its role's)",
        )
    keys_sub.add_parser("list", parents=[common], help="list keys (never their secrets)")
    revoke = keys_sub.add_parser("revoke", parents=[common], help="revoke a key")
    revoke.add_argument("id")

    config = sub.add_parser("config", help="config files")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser("check", parents=[common], help="validate a config file")
    check.add_argument("file", nargs="?")
    return parser


_UNITS = {"d": 86_400, "h": 3_600, "m": 60, "s": 1}
#: The longest lifetime ``--expires-in`` takes (100 years), and the largest limit.
MAX_LIFETIME = 100 * 365 * 86_400
MAX_LIMIT = 10**15


def duration(text: str) -> int:
    """Seconds in ``30d``, ``12h``, ``90m`` or ``3600s``."""
    match = re.fullmatch(r"([0-9]{1,12})([dhms])", text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration: use a whole number and one of d, h, m, s "
            "(e.g. 30d, 12h, 90m, 3600s)"
        )
    seconds = int(match[1]) * _UNITS[match[2]]
    if not 0 < seconds <= MAX_LIFETIME:
        raise argparse.ArgumentTypeError(
            f"{text!r}: a lifetime must be more than 0s and at most 36500d"
        )
    return seconds


def limit(text: str) -> int:
    """A limit: a whole number from 1 to :data:`MAX_LIMIT`."""
    if not re.fullmatch(r"[0-9]{1,16}", text.strip()) or not 1 <= int(text) <= MAX_LIMIT:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a limit: use a whole number from 1 to {MAX_LIMIT}"
        )
    return int(text)


def _load(path: str | None) -> Config:
    return load_config(path) if path else default_config()


def _stderr_access_log(server: ServerSettings) -> AccessLog | None:
    """The access log's fast path on stderr, writing what the ``logging`` handler
    would: only if the log level lets request records through and stderr takes
    UTF-8 bytes (otherwise ``logging`` carries them, as for every other record)."""
    if not server.access_log or server.log_level not in ("debug", "info"):
        return None
    sink = getattr(sys.stderr, "buffer", None)
    encoding = getattr(sys.stderr, "encoding", None)
    if sink is None or not encoding or codecs.lookup(encoding).name != "utf-8":
        return None
    limit = server.access_log_buffer
    return AccessLog(
        sink, fmt=server.log_format, flush_bytes=min(64 * 1024, limit), max_bytes=limit
    )


def _serve(args: argparse.Namespace) -> int:
    config = _load(args.config)
    overrides = {"host": args.host, "port": args.port}
    config = config.with_server_overrides(**{k: v for k, v in overrides.items() if v is not None})
    server = config.server
    setup_logging(server.log_level, server.log_format)
    from .server import StartupError, run_server

    try:
        trio.run(functools.partial(run_server, config, access_log=_stderr_access_log(server)))
    except StartupError as exc:
        print(f"ostiary: {exc}", file=sys.stderr)
        return 1
    return 0


def _keys(args: argparse.Namespace) -> int:
    config = _load(args.config)
    store = open_key_store(config.keys_db)
    if args.keys_command == "create":
        roles = config.role_names
        if args.role not in roles:
            raise ConfigError(
                f"unknown role {args.role!r}; the configured roles are: {', '.join(roles)}"
            )
        overrides = LimitSet(**{name: getattr(args, name) for name in OVERRIDES})
        expires_at = None if args.expires_in is None else int(time.time()) + args.expires_in
        _, secret = store.create(args.name, args.role, expires_at=expires_at, overrides=overrides)
        print(secret)
    elif args.keys_command == "list":
        now = time.time()
        for key in store.list():
            print(_listing(key, now))
    else:
        store.revoke(args.id)
    return 0


def _listing(key: KeyInfo, now: float) -> str:
    """One tab-separated line of ``keys list``: id, name, role and state (``active``,
    ``expired`` or ``revoked``), then ``expires=<UTC time>`` and ``<limit>=<value>``
    fields for whichever the key has. Never the secret or its digest."""
    fields = [key.id, key.name, key.role, key.state(now)]
    if key.expires_at is not None:
        fields.append(f"expires={format_utc(key.expires_at)}")
    for name in OVERRIDES:
        value = getattr(key.overrides, name)
        if value is not None:
            fields.append(f"{name}={value}")
    return "\t".join(fields)


def _config(args: argparse.Namespace) -> int:
    path = args.file or args.config
    if not path:
        raise ConfigError("config check needs a FILE")
    config = load_config(path)
    models = sum(len(b.models) for b in config.backends)
    print(f"{path}: ok ({len(config.backends)} backends, {models} models)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "keys":
            return _keys(args)
        return _config(args)
    except (ConfigError, KeyStoreError) as exc:
        print(f"ostiary: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        # A port in use, an unreadable model file...: one line, not a traceback.
        print(f"ostiary: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
