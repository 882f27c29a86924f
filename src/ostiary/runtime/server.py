"""Running the server: key store, backends, gateway, driver and HTTP in one nursery.

:func:`run_server` is what ``ostiary serve`` runs. It loads the keys (writing a
bootstrap admin key on first start), enters every backend, serves until SIGINT or
SIGTERM, then drains: no new connections, in-flight requests get ``drain_timeout``
seconds to finish, then everything left is cancelled.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, TypeVar

import attrs
import trio

from ostiary.backends import Backend, create_backend
from ostiary.protocol.auth import KeyTable
from ostiary.protocol.capabilities import ModelKind
from ostiary.protocol.cors import CorsPolicy
from ostiary.protocol.gateway import Gateway, ModelRoute
from ostiary.protocol.tokens import TokenCodec
from ostiary.protocol.visibility import parse_networks

from .access_log import AccessLog
from .config import Config, ConfigError, load_config
from .dashboard import load_dashboard
from .driver import Driver
from .http import HttpServer
from .jwt import JwksError, JwtVerifier
from .keystore import KeyStore, open_key_store, write_bootstrap_key
from .schemas import JsonSchemaChecker
from .shared_limits import SharedLimits
from .tokenizer import load_cl100k

__all__ = [
    "StartupError",
    "bootstrap_keys",
    "load_verifier",
    "open_driver",
    "run_server",
    "watch_keys",
]

log = logging.getLogger("ostiary.server")
T = TypeVar("T")


class StartupError(Exception):
    """The server cannot start as configured (the message says why, in one line)."""


def bootstrap_keys(config: Config) -> KeyStore:
    """Open the key store; on an empty one, create the bootstrap admin key and write
    it to ``<state_dir>/admin.key`` (mode 0600). Logs the path, never the key."""
    store = open_key_store(config.keys_db)
    # Replicas starting together on one empty store: only the one whose insert
    # found it empty writes the file.
    created = store.create_first("bootstrap-admin", "admin")
    if created is not None:
        info, secret = created
        path = config.state_dir / "admin.key"
        try:
            write_bootstrap_key(path, secret)
        except OSError as exc:
            # A key nobody holds must not stay active: revoked, and the operator told
            # how to get one.
            store.revoke(info.id)
            raise StartupError(
                f"cannot write the bootstrap admin key to {path}: {exc.strerror or exc}; "
                "the key was revoked. Fix the path, or create an admin key with "
                "`ostiary keys create --name admin --role admin`"
            ) from exc
        where = str(path.resolve())
        log.warning("created a bootstrap admin key in %s", where, extra={"fields": {"path": where}})
    return store


async def _in_thread(fn: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(fn)


async def watch_keys(
    store: KeyStore,
    replace: Callable[[KeyTable], Awaitable[None]],
    generation: int,
    every: float,
    run_sync: Callable[[Callable[[], Any]], Awaitable[Any]] = _in_thread,
) -> None:
    """Hand a fresh key table to ``replace`` whenever the store's change counter
    moves; the store is read through ``run_sync`` (a worker thread, off the event
    loop)."""
    while True:
        await trio.sleep(every)
        try:
            current = await run_sync(store.generation)
            if current != generation:
                loaded, table, _ = await run_sync(store.load)
                await replace(table)
                generation = loaded  # only once applied: a failure is tried again
        except Exception as exc:
            # Keep serving with the keys we have; say why the reload failed.
            log.error("cannot reload API keys", extra={"fields": {"error": repr(exc)}})


async def load_verifier(config: Config) -> JwtVerifier | None:
    """The JWT verifier ``[auth.jwt]`` asks for, its key set loaded (None without
    the table). A JWKS file that cannot be used stops start-up; a URL that cannot
    be fetched yet is retried by the verifier's ``run``."""
    if config.auth.jwt is None:
        return None
    verifier = JwtVerifier(config.auth.jwt)
    try:
        await verifier.load()
    except JwksError as exc:
        raise StartupError(f"[auth.jwt] JWKS: {exc}") from exc
    return verifier


def _shared_limits(config: Config) -> SharedLimits | None:
    """The Redis limit store of ``[redis]``, if configured (it connects lazily)."""
    redis = config.redis
    if redis is None:
        return None
    return SharedLimits.from_settings(
        redis.url,
        timeout=redis.timeout,
        prefix=redis.prefix,
        lease=redis.lease,
        pool_size=redis.pool_size,
        max_pending=redis.max_pending_settlements,
    )


def _restart_only(old: Config, new: Config) -> list[tuple[str, bool]]:
    """The parts of the config a SIGHUP does not apply, and whether each changed."""
    return [
        ("[server]", new.server != old.server),
        ("[[backends]]", new.backends != old.backends),
        ("[limits]", new.limits != old.limits),
        ("[redis]", new.redis != old.redis),
        (
            "[auth] keys_db / key_reload_interval",
            (new.auth.keys_db, new.auth.key_reload_interval)
            != (old.auth.keys_db, old.auth.key_reload_interval),
        ),
    ]


async def reload_access(config: Config, driver: Driver) -> Config | None:
    """Reload roles, limits and trusted proxies from ``config``'s file (SIGHUP).

    A file that cannot be used is refused with the old config kept, and logged;
    ``[server]``, ``[[backends]]``, ``[limits]``, ``[redis]`` and the key store's
    settings are not reloaded (a change to them is logged as needing a restart, and
    the running values are kept in the config returned). Returns the config now in
    force, or None when it was refused.
    """
    if not config.source or config.source.startswith("("):
        log.warning("SIGHUP: no config file to reload (built-in default)")
        return None
    try:
        new = await trio.to_thread.run_sync(load_config, config.source)
    except ConfigError as exc:
        log.error(
            "config reload refused; the old config stays", extra={"fields": {"error": str(exc)}}
        )
        return None
    new = new.with_server_overrides(**dict(config.server_overrides))
    changed = [name for name, differs in _restart_only(config, new) if differs]
    if changed:
        log.warning(
            "config reload: some changes need a restart; not applied",
            extra={"fields": {"source": config.source, "sections": changed}},
        )
    # What is not reloaded stays as it runs, so that the config returned is the one
    # in force, and a file put back as it was is not taken for a new change.
    new = attrs.evolve(
        new,
        server=config.server,
        backends=config.backends,
        limits=config.limits,
        redis=config.redis,
        auth=attrs.evolve(
            new.auth,
            keys_db=config.auth.keys_db,
            key_reload_interval=config.auth.key_reload_interval,
        ),
    )
    guard = driver.gateway.guard
    access = new.access_policy()
    try:  # first: nothing is applied yet if it fails
        tokens = await counter_for(driver, access.counts_tokens)
    except Exception as exc:
        log.error(
            "config reload refused; the old config stays",
            extra={"fields": {"error": f"cannot load the token counter: {exc!r}"}},
        )
        return None
    verifier = guard.verifier
    if new.auth.jwt != config.auth.jwt:
        try:
            verifier = await _reload_verifier(driver, new)
        except JwksError as exc:
            log.error(
                "config reload refused; the old config stays",
                extra={"fields": {"error": f"[auth.jwt] JWKS: {exc}"}},
            )
            return None
    driver.replace_access(access, verifier, parse_networks(new.auth.trusted_proxies), tokens)
    return new


def listening_url(host: str, port: int) -> str:
    """The URL of a bound address, an IPv6 one in brackets (RFC 3986)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def counter_for(driver: Driver, needed: bool) -> TokenCodec | None:
    """The token counter, loaded now if a limit has just come to need one (a reloaded
    config's, or a new key's own) and the server runs without; None: not needed, or
    loaded already. Loading takes about a second, in a worker thread, once."""
    if not needed or driver.gateway.guard.tokens is not None:
        return None
    log.info("loading the token counter for token limits")
    return await trio.to_thread.run_sync(load_cl100k)


async def _reload_verifier(driver: Driver, new: Config) -> JwtVerifier | None:
    """The verifier for ``new``'s ``[auth.jwt]``: the running one reconfigured
    (its new key set loaded first), or retired when the table is gone. Adding the
    table to a server started without it needs a restart (logged)."""
    current = driver.verifier if isinstance(driver.verifier, JwtVerifier) else None
    if new.auth.jwt is None:
        if current is not None:
            current.retire()
        driver.verifier = None
        return None
    if current is None:
        log.warning("config reload: adding [auth.jwt] needs a restart; not applied")
        return None
    await current.reconfigure(new.auth.jwt)
    return current


@asynccontextmanager
async def open_driver(
    config: Config, *, access_log: AccessLog | None = None
) -> AsyncIterator[Driver]:
    """The gateway of ``config`` behind a ready :class:`Driver`, for either door (the
    h11 server of :func:`run_server`, or the ASGI app of :mod:`.asgi`): the keys
    loaded (a bootstrap admin key written on first start), every backend entered, and
    the background tasks (timers, key watcher, JWKS, shared limits, access log
    writer) running in a nursery for as long as the block runs; leaving it cancels
    them and closes the backends. With ``access_log`` (and ``[server] access_log``
    on), request records go through it, flushed by a task of the nursery and once
    more at the end; without, through ``logging``."""
    store = await trio.to_thread.run_sync(bootstrap_keys, config)
    generation, table, _ = await trio.to_thread.run_sync(store.load)
    routes = [
        ModelRoute(m, b.name, owned_by=b.name, capabilities=b.capabilities(m))
        for b in config.backends
        for m in b.models
    ]
    tokens = None
    access = config.access_policy()
    if (
        access.counts_tokens
        or table.counts_tokens
        or any(
            r.capabilities.kind is ModelKind.EMBEDDING and not r.capabilities.token_inputs
            for r in routes
        )
    ):
        # Token limits count prompts, and token-id embedding input decodes, as
        # cl100k; loading it takes about a second, once.
        tokens = await trio.to_thread.run_sync(load_cl100k)
    verifier = await load_verifier(config)
    gateway = Gateway(
        tokens=tokens,
        cors=CorsPolicy(frozenset(config.server.cors_origins)),
        routes=routes,
        keys=table,
        backends=[b.policy() for b in config.backends],
        limits=config.limits,
        created=int(time.time()),
        metrics_allow=parse_networks(config.server.metrics_allow),
        access=access,
        verifier=verifier,
        trusted_proxies=parse_networks(config.auth.trusted_proxies),
        live=config.server.live(),
        assets=load_dashboard(),
        schema_checker=JsonSchemaChecker(config.limits),
        shared_limits=config.redis is not None,
        on_limits_failure=config.redis.on_failure if config.redis is not None else "refuse",
    )
    async with AsyncExitStack() as stack:
        backends: dict[str, Backend] = {}
        for settings in config.backends:
            backend = create_backend(settings)
            try:
                backends[settings.name] = await stack.enter_async_context(backend)
            except (OSError, ValueError, RuntimeError) as exc:
                raise StartupError(f"backend {settings.name!r} cannot start: {exc}") from exc
            log.info(
                "backend ready",
                extra={
                    "fields": {
                        "backend": settings.name,
                        "kind": settings.kind,
                        "models": list(settings.models),
                    }
                },
            )
        writer = access_log if config.server.access_log else None
        shared = _shared_limits(config)
        driver = Driver(
            gateway,
            backends,
            access_log=writer if writer is not None else config.server.access_log,
            verifier=verifier,
            shared_limits=shared,
        )
        if writer is not None:
            stack.callback(writer.flush)  # what was logged while the nursery unwound
        async with trio.open_nursery() as nursery:
            if writer is not None:
                await nursery.start(writer.run)
            await nursery.start(driver.run_timers)
            if verifier is not None:
                await nursery.start(verifier.run)
            if shared is not None:
                await nursery.start(shared.run)

            async def replace_keys(table: KeyTable) -> None:
                driver.replace_keys(table, await counter_for(driver, table.counts_tokens))

            nursery.start_soon(
                watch_keys, store, replace_keys, generation, config.auth.key_reload_interval
            )
            yield driver
            nursery.cancel_scope.cancel()


async def run_server(
    config: Config,
    *,
    access_log: AccessLog | None = None,
    handle_signals: bool = True,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``config`` until a signal (or cancellation); ``task_status.started``
    reports the bound listeners (useful with port 0). ``access_log``: see
    :func:`open_driver`."""
    async with open_driver(config, access_log=access_log) as driver:
        gateway = driver.gateway
        server = HttpServer(driver, config.server.http())
        listeners = await trio.open_tcp_listeners(config.server.port, host=config.server.host)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, listeners)
            for listener in listeners:
                host, port = listener.socket.getsockname()[:2]
                log.info("listening", extra={"fields": {"url": listening_url(host, port)}})
            task_status.started(listeners)
            if not handle_signals:
                await trio.sleep_forever()
            current = config  # the config last loaded (SIGHUP)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        current = await reload_access(current, driver) or current
                        continue
                    log.info(
                        "draining",
                        extra={
                            "fields": {
                                "signal": signal.Signals(signum).name,
                                "in_flight": gateway.in_flight,
                                "timeout_s": config.server.drain_timeout,
                            }
                        },
                    )
                    break
            driver.shutdown()
            await server.drain(trio.current_time() + config.server.drain_timeout)
            nursery.cancel_scope.cancel()
    log.info("stopped")
