"""The one config loader: a TOML file into frozen attrs settings.

Tables: ``[server]`` (:class:`ServerSettings`, which includes the HTTP limits),
``[auth]``, ``[limits]`` (:class:`~ostiary.protocol.request_limits.RequestLimits`)
and ``[[backends]]`` (one table per backend; ``kind`` picks its settings class).
An unknown key, a wrong type or a bad value is a :class:`ConfigError` naming the key
and the file. With no file at all, :func:`default_config` gives the zero-config
setup: one embedded backend (SmolLM2 and multilingual-e5-small).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

from ostiary.backends import SETTINGS_BY_KIND, BackendSettings
from ostiary.backends.llama_engine import EmbeddedSettings
from ostiary.protocol.access import AccessPolicy, RateLimitLayer, Role
from ostiary.protocol.live import LiveSettings
from ostiary.protocol.request_limits import RequestLimits
from ostiary.protocol.structuring import first_structure_error
from ostiary.protocol.visibility import parse_networks

from .http import HttpSettings
from .redis_client import RedisAddress

__all__ = [
    "AuthSettings",
    "Config",
    "ConfigError",
    "JwtSettings",
    "RedisSettings",
    "ServerSettings",
    "default_config",
    "load_config",
    "parse_config",
]


class ConfigError(Exception):
    """A config file that cannot be used; the message names the file and the key."""


_LEVELS = ("debug", "info", "warning", "error")


_ORIGIN = re.compile(r"https?://[A-Za-z0-9.\-]+(:[0-9]{1,5})?|\*")


def _check_origins(
    _: object, attribute: attrs.Attribute[tuple[str, ...]], value: tuple[str, ...]
) -> None:
    for origin in value:
        if not _ORIGIN.fullmatch(origin):
            raise ValueError(f'{origin!r} is not an origin (scheme://host[:port], or "*")')


def _check_networks(
    _: object, attribute: attrs.Attribute[tuple[str, ...]], value: tuple[str, ...]
) -> None:
    parse_networks(value)


@attrs.frozen(kw_only=True)
class ServerSettings(HttpSettings):
    host: str = "127.0.0.1"
    port: int = attrs.field(
        default=8000, validator=[attrs.validators.ge(0), attrs.validators.le(65535)]
    )
    #: Where the key store and the bootstrap admin key live.
    state_dir: str = ".ostiary"
    #: Seconds in-flight requests get to finish after SIGINT/SIGTERM.
    drain_timeout: float = attrs.field(default=15.0, validator=attrs.validators.ge(0))
    #: One log record per request.
    access_log: bool = True
    #: Bytes of access-log lines ``ostiary serve`` holds while stderr is slow to take
    #: them; past it, records are dropped (and counted in a warning).
    access_log_buffer: int = attrs.field(default=1024 * 1024, validator=attrs.validators.gt(0))
    log_level: str = attrs.field(default="info", validator=attrs.validators.in_(_LEVELS))
    #: "json" (one object per line) or "text".
    log_format: str = attrs.field(default="json", validator=attrs.validators.in_(("json", "text")))
    #: Origins whose browser pages may call the server ("*": any). Default none: no
    #: CORS headers at all.
    cors_origins: tuple[str, ...] = attrs.field(default=(), validator=_check_origins)
    #: Networks (CIDR) whose socket peers may read ``/metrics`` without a key, so
    #: Prometheus can scrape. Default none: only the admin key.
    metrics_allow: tuple[str, ...] = attrs.field(default=(), validator=_check_networks)
    #: ``/v1/queue/live`` feeds open at once (more get 503 ``too_many_viewers``).
    max_queue_viewers: int = attrs.field(default=16, validator=attrs.validators.ge(0))
    #: Seconds between two live snapshots to one viewer (at least 0.25).
    queue_live_interval: float = attrs.field(default=0.25, validator=attrs.validators.ge(0.25))
    #: Bytes of one message a live viewer may send before its feed is closed.
    queue_live_max_message: int = attrs.field(default=4096, validator=attrs.validators.ge(125))

    def live(self) -> LiveSettings:
        return LiveSettings(
            max_viewers=self.max_queue_viewers,
            interval=self.queue_live_interval,
            max_message_bytes=self.queue_live_max_message,
        )

    def http(self) -> HttpSettings:
        fields = {a.name for a in attrs.fields(HttpSettings)}
        return HttpSettings(**{k: v for k, v in attrs.asdict(self).items() if k in fields})


#: Algorithms a JWT may be signed with: asymmetric only (never ``none``, never an
#: HMAC, whose "secret" would be the public key). ``Ed25519`` is RFC 9864's name
#: for ``EdDSA`` over Ed25519; both are accepted as the same algorithm.
JWT_ALGORITHMS = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
    "ES256", "ES384", "ES512", "EdDSA", "Ed25519",
)  # fmt: skip


def _check_algorithms(
    _: object, attribute: attrs.Attribute[tuple[str, ...]], value: tuple[str, ...]
) -> None:
    if not value:
        raise ValueError("list at least one algorithm")
    for name in value:
        if name not in JWT_ALGORITHMS:
            raise ValueError(
                f"algorithm {name!r} is not allowed (allowed: {', '.join(JWT_ALGORITHMS)})"
            )


def _check_claim_path(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not value.strip():
        raise ValueError(f"{attribute.name} must name a claim (a dotted path), not {value!r}")


@attrs.frozen(kw_only=True)
class JwtSettings:
    """``[auth.jwt]``: bearer JWTs beside API keys (DESIGN §5a)."""

    #: The key set: a JWKS file, or a URL the server fetches (exactly one).
    jwks_file: str | None = None
    jwks_url: str | None = None
    issuer: str
    audience: str
    algorithms: tuple[str, ...] = attrs.field(
        default=("RS256", "ES256", "EdDSA"), validator=_check_algorithms
    )
    #: Seconds of clock skew allowed for ``exp`` and ``nbf``.
    leeway: float = attrs.field(
        default=30.0, validator=[attrs.validators.ge(0), attrs.validators.le(600)]
    )
    #: Dotted claim paths: whom limits count against, and the role names.
    subject_claim: str = attrs.field(default="sub", validator=_check_claim_path)
    roles_claim: str = attrs.field(default="roles", validator=_check_claim_path)
    #: Seconds between scheduled refetches of ``jwks_url`` (key rotation).
    jwks_refresh_interval: float = attrs.field(default=300.0, validator=attrs.validators.ge(1))
    #: Least seconds between refetches caused by tokens naming an unknown ``kid``, so
    #: a flood of bogus kids cannot make the server hammer the identity provider.
    jwks_min_refetch_interval: float = attrs.field(default=10.0, validator=attrs.validators.ge(0))
    #: Seconds one fetch of ``jwks_url`` may take.
    jwks_timeout: float = attrs.field(default=5.0, validator=attrs.validators.gt(0))
    #: Bytes of a JWKS document (file or response); a larger one is refused.
    jwks_max_bytes: int = attrs.field(default=1024 * 1024, validator=attrs.validators.gt(0))

    def __attrs_post_init__(self) -> None:
        if (self.jwks_file is None) == (self.jwks_url is None):
            raise ValueError("set exactly one of jwks_file and jwks_url")
        if self.jwks_url is not None and not self.jwks_url.startswith(("https://", "http://")):
            raise ValueError("jwks_url must be an http(s) URL")


@attrs.frozen(kw_only=True)
class AuthSettings:
    #: SQLite file of API keys (default: ``<state_dir>/keys.sqlite3``).
    keys_db: str | None = None
    #: Seconds between checks of the key store for changes made with the CLI.
    key_reload_interval: float = attrs.field(default=1.0, validator=attrs.validators.gt(0))
    #: Networks (CIDR) of proxies whose ``forwarded`` / ``x-forwarded-for`` is believed.
    trusted_proxies: tuple[str, ...] = attrs.field(default=(), validator=_check_networks)
    #: 401s a client IP may earn per minute before it is refused unheard (0: off).
    failed_auth_per_minute: int = attrs.field(default=60, validator=attrs.validators.ge(0))
    jwt: JwtSettings | None = None


_REDIS_URL = re.compile(
    r"redis://[^/\s]+(/[0-9]{1,2})?|(redis\+)?unix://([^/\s]*@)?/[^?\s]+(\?db=[0-9]{1,2})?"
)


def _check_redis_url(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    """``redis://[[user]:password@]host[:port][/db]`` (its port a number in range) or
    ``unix:///path/redis.sock[?db=N]``, as the client parses it: a URL ``config
    check`` accepts is one ``serve`` can use."""
    message = (
        "url must look like redis://[[user]:password@]host[:port][/db] or "
        f"unix:///path/redis.sock[?db=N], not {value!r}"
    )
    if not _REDIS_URL.fullmatch(value):
        raise ValueError(message)
    try:
        RedisAddress.from_url(value)
    except ValueError as exc:
        raise ValueError(f"{message}: {exc}") from None


@attrs.frozen(kw_only=True)
class RedisSettings:
    """``[redis]``: every limit moves to Redis, shared by the replicas using it."""

    #: ``redis://[[user]:password@]host[:port][/db]``, or a Unix socket on this host:
    #: ``unix://[[user]:password@]/path/to/redis.sock[?db=N]`` (or ``redis+unix://``).
    url: str = attrs.field(validator=_check_redis_url)
    #: When Redis is down or slower than ``timeout``: "refuse" (503
    #: ``rate_limiter_unavailable``) or "local" (count in this process until it is back).
    on_failure: str = attrs.field(
        default="refuse", validator=attrs.validators.in_(("refuse", "local"))
    )
    #: Seconds one admission may wait for Redis.
    timeout: float = attrs.field(
        default=0.05, validator=[attrs.validators.gt(0), attrs.validators.le(10)]
    )
    #: Prefix of every key Ostiary writes.
    prefix: str = "ostiary:"
    #: Seconds a replica's holds (concurrency slots) outlive its last heartbeat.
    lease: float = attrs.field(default=30.0, validator=attrs.validators.ge(1))
    #: Connections to Redis.
    pool_size: int = attrs.field(
        default=4, validator=[attrs.validators.ge(1), attrs.validators.le(64)]
    )
    #: Settlements waiting for Redis (queued, or held while it is down); beyond,
    #: a hold's slots are released by the heartbeat without its token usage.
    max_pending_settlements: int = attrs.field(default=10_000, validator=attrs.validators.ge(1))


@attrs.frozen(kw_only=True)
class Config:
    server: ServerSettings = attrs.field(factory=ServerSettings)
    auth: AuthSettings = attrs.field(factory=AuthSettings)
    limits: RequestLimits = attrs.field(factory=RequestLimits)
    roles: tuple[Role, ...] = ()
    rate_limits: tuple[RateLimitLayer, ...] = ()
    redis: RedisSettings | None = None
    backends: tuple[BackendSettings, ...] = ()
    #: The file it came from ("" for the built-in default).
    source: str = ""
    #: ``[server]`` settings given on the command line (``--host``, ``--port``),
    #: which win over the file's, at start and at every reload (SIGHUP).
    server_overrides: tuple[tuple[str, object], ...] = ()

    def with_server_overrides(self, **changes: object) -> Config:
        """This config with ``changes`` to ``[server]``, remembered as overrides."""
        merged: dict[str, Any] = dict(self.server_overrides)
        merged.update(changes)
        return attrs.evolve(
            self,
            server=attrs.evolve(self.server, **merged),
            server_overrides=tuple(merged.items()),
        )

    @property
    def state_dir(self) -> Path:
        return Path(self.server.state_dir)

    def access_policy(self) -> AccessPolicy:
        """The roles and limit layers as the core takes them."""
        return AccessPolicy(
            self.roles, self.rate_limits, failed_auth_per_minute=self.auth.failed_auth_per_minute
        )

    @property
    def role_names(self) -> tuple[str, ...]:
        """Every role a key may have: the built-in ones and the configured ones."""
        return tuple(sorted(self.access_policy().roles))

    @property
    def keys_db(self) -> Path:
        if self.auth.keys_db:
            return Path(self.auth.keys_db)
        return self.state_dir / "keys.sqlite3"


def _converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)

    def strict(kind: type, label: str) -> Any:
        def hook(value: object, _: object) -> object:
            if type(value) is kind:
                return value
            raise TypeError(f"expected {label}, got {type(value).__name__}")

        return hook

    def number(value: object, _: object) -> float:
        if type(value) is float or type(value) is int:
            return float(value)
        raise TypeError(f"expected a number, got {type(value).__name__}")

    conv.register_structure_hook(str, strict(str, "a string"))
    conv.register_structure_hook(int, strict(int, "an integer"))
    conv.register_structure_hook(float, number)
    conv.register_structure_hook(bool, strict(bool, "a boolean"))

    def backend(value: object, _: object) -> BackendSettings:
        if not isinstance(value, dict):
            raise TypeError("expected a table")
        kind = value.get("kind")
        cls = SETTINGS_BY_KIND.get(kind) if isinstance(kind, str) else None
        if cls is None:
            raise ValueError(
                f"kind must be one of {', '.join(sorted(SETTINGS_BY_KIND))}, got {kind!r}"
            )
        return conv.structure(value, cls)

    conv.register_structure_hook_func(lambda t: t is BackendSettings, backend)
    return conv


_CONVERTER = _converter()


def parse_config(text: str, source: str) -> Config:
    """Parse TOML ``text`` read from ``source`` (named in every error)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    try:
        config = _CONVERTER.structure(data, Config)
    except (ClassValidationError, IterableValidationError) as exc:
        raise ConfigError(_describe(exc, source, data)) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {exc}") from None
    config = attrs.evolve(config, source=source)
    _check(config)
    return config


def _describe(exc: BaseException, source: str, data: dict[str, Any]) -> str:
    leaf, path = first_structure_error(exc)
    path = _backend_path(path, data)
    if isinstance(leaf, ForbiddenExtraKeysError):
        key = sorted(leaf.extra_fields)[0]
        where = f"{path}.{key}" if path else key
        return f"{source}: unknown key '{where}'"
    if isinstance(leaf, KeyError):
        return f"{source}: missing required key '{path}'"
    if isinstance(leaf, ValueError) and len(leaf.args) > 1 and isinstance(leaf.args[0], str):
        # attrs' own validators (in_, matches_re) add the attribute and the options
        # to the exception's args; the first one is the message.
        return f"{source}: invalid value for '{path}': {leaf.args[0]}"
    return f"{source}: invalid value for '{path}': {leaf}"


def _backend_path(path: str, data: dict[str, Any]) -> str:
    """``backends[1]`` reads better as ``backends[1] (name "x")``."""
    if not path.startswith("backends["):
        return path
    index = int(path[len("backends[") : path.index("]")])
    backends = data.get("backends")
    if isinstance(backends, list) and index < len(backends):
        name = backends[index].get("name") if isinstance(backends[index], dict) else None
        if isinstance(name, str):
            return path.replace(f"backends[{index}]", f'backends[{index}] ("{name}")', 1)
    return path


def _check(config: Config) -> None:
    source = config.source
    roles = [r.name for r in config.roles]
    for name in roles:
        if roles.count(name) > 1:
            raise ConfigError(f"{source}: two [[roles]] are named '{name}'")
    known = set(config.role_names)
    for i, layer in enumerate(config.rate_limits):
        for name in layer.roles or ():
            if name not in known:
                raise ConfigError(f"{source}: rate_limits[{i}].roles names unknown role '{name}'")
    if not config.backends:
        raise ConfigError(f"{source}: no [[backends]] configured")
    names: set[str] = set()
    models: dict[str, str] = {}
    for b in config.backends:
        if b.name in names:
            raise ConfigError(f"{source}: two backends are named '{b.name}'")
        names.add(b.name)
        if not b.models:
            raise ConfigError(f"{source}: backend '{b.name}' lists no models")
        for model in b.models:
            if model in models:
                raise ConfigError(
                    f"{source}: model '{model}' is served by both '{models[model]}' and '{b.name}'"
                )
            models[model] = b.name


def load_config(path: str | Path) -> Config:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None
    return parse_config(text, str(p))


def default_config() -> Config:
    """The zero-config setup: the embedded local model."""
    return Config(backends=(EmbeddedSettings(),), source="(built-in default)")
