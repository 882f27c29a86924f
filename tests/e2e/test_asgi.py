"""The ASGI door for real: ``hypercorn --worker-class trio`` serving
``ostiary.runtime.asgi:create_app()`` on a loopback port the kernel picks, called
with the official ``openai`` SDK (strict validation, the raw body checked against
the spec)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ostiary.backends.scripted import ScriptedSettings
from tests.e2e.conftest import (
    SCRIPTED_BACKEND,
    START_TIMEOUT,
    Api,
    ServerProcess,
    server_config,
)
from tests.e2e.spec import OpenAPI

#: Hypercorn's line for each bound address (the port is the kernel's pick).
RUNNING = re.compile(r"Running on http://127\.0\.0\.1:(\d+) ")


@pytest.fixture
def hypercorn_server(tmp_path: Path) -> Iterator[ServerProcess]:
    state_dir = tmp_path / "state"
    config_path = tmp_path / "cfg.toml"
    config_path.write_text(server_config(state_dir, SCRIPTED_BACKEND), encoding="utf-8")
    stderr_path = tmp_path / "stderr.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env["OSTIARY_CONFIG"] = str(config_path)
    command = [
        sys.executable,
        "-m",
        "hypercorn",
        "--worker-class",
        "trio",
        "--bind",
        "127.0.0.1:0",
        "ostiary.runtime.asgi:create_app()",
    ]
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            command,
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    server = ServerProcess("hypercorn", process, tmp_path, config_path, state_dir, stderr_path, env)
    try:
        # A bounded poll of the log and the process (never a fixed sleep).
        deadline = time.monotonic() + START_TIMEOUT
        while (found := RUNNING.search(server.log_text())) is None:
            assert time.monotonic() < deadline, f"hypercorn did not start:\n{server.log_text()}"
            server.pause()
        server._port = int(found.group(1))
        server.key = (state_dir / "admin.key").read_text(encoding="ascii").strip()
        yield server
    finally:
        code = server.stop()
    assert code == 0, server.log_text()[-4000:]
    log = server.log_text()
    assert server.key not in log
    assert server.log_records("stopped"), log[-4000:]  # the lifespan's shutdown ran


def test_chat_completion_through_hypercorn(
    hypercorn_server: ServerProcess, openapi: OpenAPI
) -> None:
    api = Api(hypercorn_server, openapi)
    try:
        completion = api.client.chat.completions.create(
            model="scripted", messages=[{"role": "user", "content": "Say hello"}]
        )
        body = api.json("CreateChatCompletionResponse")
        assert api.last.headers["server"].startswith("hypercorn")  # the other door
    finally:
        api.close()
    assert completion.object == "chat.completion"
    assert completion.id == body["id"]
    assert completion.choices[0].message.content == ScriptedSettings().reply
    assert completion.usage is not None
    assert completion.usage.completion_tokens == ScriptedSettings().chunks
    record = hypercorn_server.wait_for_log("request", 1, START_TIMEOUT)
    assert record["status"] == 200 and record["path"] == "/v1/chat/completions"
