"""SIGHUP's reload of roles, limits and trusted proxies (``reload_access``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ostiary.protocol.gateway import Gateway, ModelRoute
from ostiary.runtime.config import load_config
from ostiary.runtime.driver import Driver
from ostiary.runtime.server import reload_access
from tests.conftest import USER_SECRET, auth_headers, key_table

BACKEND = '[[backends]]\nname = "s"\nkind = "scripted"\nmodels = ["m"]\n'


def driver_for(path: Path) -> Driver:
    config = load_config(path)
    gateway = Gateway(
        routes=[ModelRoute("m", "s")], keys=key_table(), access=config.access_policy()
    )
    return Driver(gateway, {}, access_log=False)


async def test_reload_applies_new_roles_and_refuses_a_bad_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "ostiary.toml"
    path.write_text(BACKEND)
    config = load_config(path)
    driver = driver_for(path)
    headers = auth_headers(USER_SECRET)

    def admitted() -> int:
        admission = driver.gateway.admits("POST", "/v1/chat/completions", headers, "10.0.0.1", 0.0)
        return 0 if admission.error is None else admission.error.status

    assert admitted() == 0
    path.write_text('[[roles]]\nname = "user"\nendpoints = ["models"]\n' + BACKEND)
    assert await reload_access(config, driver) is not None
    assert admitted() == 403
    path.write_text('[[roles]]\nname = "user"\nendpoints = ["nope"]\n' + BACKEND)
    assert await reload_access(config, driver) is None
    assert admitted() == 403  # the old (reloaded) config stays
    assert "config reload refused" in caplog.text


async def test_reload_without_a_file_changes_nothing(tmp_path: Path) -> None:
    from ostiary.runtime.config import default_config

    path = tmp_path / "ostiary.toml"
    path.write_text(BACKEND)
    assert await reload_access(default_config(), driver_for(path)) is None


async def test_reload_keeps_the_command_lines_host_and_port(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # `ostiary serve --config F --port P` overrides [server] port; a SIGHUP that
    # changes only roles must not claim that [server] changed (and need a restart).
    path = tmp_path / "ostiary.toml"
    path.write_text(BACKEND)
    config = load_config(path).with_server_overrides(host="127.0.0.2", port=8123)
    driver = driver_for(path)
    path.write_text('[[roles]]\nname = "user"\nendpoints = ["models"]\n' + BACKEND)
    reloaded = await reload_access(config, driver)
    assert reloaded is not None
    assert "need a restart" not in caplog.text
    assert (reloaded.server.host, reloaded.server.port) == ("127.0.0.2", 8123)
    # ...and the next reload compares against what is really served, too.
    path.write_text('[[roles]]\nname = "user"\n' + BACKEND)
    assert await reload_access(reloaded, driver) is not None
    assert "need a restart" not in caplog.text
    # A real [server] change in the file is still reported.
    path.write_text("[server]\nsend_timeout = 5.0\n" + BACKEND)
    assert await reload_access(reloaded, driver) is not None
    assert "need a restart" in caplog.text


async def test_reload_names_every_part_it_does_not_apply_and_keeps_it_running(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """[limits] and [redis] changes used to be dropped without a word, and a
    [[backends]] change was kept in the config returned though not served, so
    putting the file back was reported as a change needing a restart again."""
    path = tmp_path / "ostiary.toml"
    path.write_text(BACKEND)
    config = load_config(path)
    driver = driver_for(path)
    path.write_text(
        "[limits]\nmax_n = 2\n"
        '[redis]\nurl = "redis://127.0.0.1:1/0"\n'
        "[auth]\nkey_reload_interval = 9.0\n" + BACKEND.replace('"s"', '"t"')
    )
    with caplog.at_level("WARNING"):
        reloaded = await reload_access(config, driver)
    assert reloaded is not None
    (record,) = [r for r in caplog.records if "need a restart" in r.getMessage()]
    assert record.fields["sections"] == [  # type: ignore[attr-defined]
        "[[backends]]",
        "[limits]",
        "[redis]",
        "[auth] keys_db / key_reload_interval",
    ]
    # The config in force is still the running one for what was not applied...
    assert (reloaded.limits, reloaded.redis, reloaded.backends) == (
        config.limits,
        None,
        config.backends,
    )
    assert reloaded.auth.key_reload_interval == config.auth.key_reload_interval
    # ...so the file put back as it was is no change at all.
    caplog.clear()
    path.write_text(BACKEND)
    assert await reload_access(reloaded, driver) is not None
    assert "need a restart" not in caplog.text
