"""The core is sans-IO: it imports nothing that does I/O, reads a clock or draws
randomness. Checked on the source (every import statement) and at run time."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import ostiary.protocol

FORBIDDEN = {
    "trio",
    "anyio",
    "asyncio",
    "socket",
    "time",
    "random",
    "secrets",
    "os",
    "uuid",
    "threading",
    "subprocess",
    "httpx",
    "sqlite3",
    "coredis",
    "redis",
    "select",
    "selectors",
    "ssl",
    "datetime",
    "logging",
    "signal",
    "multiprocessing",
    "io",
    "pathlib",
    "shutil",
    "tempfile",
    "urllib",
    "http",
}
CORE = Path(ostiary.protocol.__file__).parent


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_core_sources_import_no_io() -> None:
    files = sorted(CORE.glob("*.py"))
    assert len(files) > 5
    for path in files:
        bad = imported_roots(path) & FORBIDDEN
        assert not bad, f"{path.name} imports {sorted(bad)}"
        assert "ostiary.runtime" not in path.read_text()
        assert "ostiary.backends" not in path.read_text()


def test_importing_the_core_loads_no_io_modules() -> None:
    code = (
        "import sys; import ostiary.protocol, ostiary.protocol.gateway, "
        "ostiary.protocol.sse, ostiary.protocol.ndjson; "
        "print(' '.join(m for m in ('trio', 'socket', 'asyncio', 'sqlite3', 'random', "
        "'selectors', 'secrets') if m in sys.modules))"
    )
    # Without coverage's subprocess hook, which would import plenty of its own.
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == ""
