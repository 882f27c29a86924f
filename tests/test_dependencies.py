"""Every third-party module the code imports comes from a package pyproject.toml
declares: a fresh ``make .venv/.installed`` must give the tests, benchmarks and fuzz
targets all they import, not only what happens to arrive as someone's dependency."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
#: What each tree may import from: runtime dependencies and these extras.
ALLOWED_EXTRAS = {
    "src": ("embedded", "asgi"),
    "tests": ("embedded", "dev"),
    "bench": ("embedded", "dev"),
    "fuzz": ("embedded", "dev"),
}
#: Scripts the tests import by name from ``bench/`` (put on ``sys.path``).
SCRIPT_DIRS = (ROOT / "bench",)


def canonical(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(extras: tuple[str, ...]) -> set[str]:
    requirements = list(PROJECT["dependencies"])
    for extra in extras:
        requirements += PROJECT["optional-dependencies"][extra]
    return {canonical(re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0]) for r in requirements}


def imported_modules(tree: Path) -> Iterator[tuple[Path, str]]:
    """``(file, top-level module)`` for every absolute import under ``tree``."""
    for path in sorted(tree.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                yield path, name.split(".", 1)[0]


def is_local(path: Path, module: str) -> bool:
    """The project itself, or a script imported by name from beside it or ``bench/``."""
    places = (path.parent, *SCRIPT_DIRS)
    return module in {"ostiary", "tests"} or any((p / f"{module}.py").exists() for p in places)


@pytest.mark.parametrize("tree", sorted(ALLOWED_EXTRAS))
def test_every_import_is_declared(tree: str) -> None:
    allowed = declared(ALLOWED_EXTRAS[tree])
    providers = importlib.metadata.packages_distributions()
    missing = set()
    for path, module in imported_modules(ROOT / tree):
        if module in sys.stdlib_module_names or is_local(path, module):
            continue
        dists = {canonical(d) for d in providers.get(module, [module])}
        if not dists & allowed:
            missing.add(f"{path.relative_to(ROOT)}: {module} ({', '.join(sorted(dists))})")
    assert not missing, "imported but not declared in pyproject.toml:\n  " + "\n  ".join(
        sorted(missing)
    )
