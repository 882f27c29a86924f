"""The Trio runtime: sockets and HTTP/1.1 (h11), timers, the key store, config and
the CLI. It owns every clock, socket, file and thread, and carries out what the core
(:mod:`ostiary.protocol`) decides.
"""

from .config import Config, ConfigError, default_config, load_config, parse_config
from .driver import Driver
from .http import ClientDisconnected, HttpRequest, HttpServer, HttpSettings, Responder
from .keystore import KeyInfo, KeyStore, KeyStoreError, SqliteKeyStore, open_key_store
from .server import StartupError, run_server
from .tokenizer import Cl100kCodec, load_cl100k

__all__ = [
    "Cl100kCodec",
    "ClientDisconnected",
    "Config",
    "ConfigError",
    "Driver",
    "HttpRequest",
    "HttpServer",
    "HttpSettings",
    "KeyInfo",
    "KeyStore",
    "KeyStoreError",
    "Responder",
    "SqliteKeyStore",
    "StartupError",
    "default_config",
    "load_cl100k",
    "load_config",
    "open_key_store",
    "parse_config",
    "run_server",
]
