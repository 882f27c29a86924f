"""A short, bounded run of every atheris target (``fuzz/``), as part of the suite.

Each target runs as its own process (libFuzzer owns the process) over a copy of its
seed corpus, with a fixed seed, a bounded number of runs and a time cap, and must
end with exit status 0: no input made it raise anything but the clean error its
contract names (``OpenAIError``, or ``HttpClientError`` for the HTTP client's parsers).
Crash files go to a temporary directory, never the working tree.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FUZZ = ROOT / "fuzz"
RUNS = 3000
MAX_TOTAL_TIME = 60
#: Wall-clock bound for the whole subprocess (start-up and instrumentation included).
TIMEOUT = 180

TARGETS = [("fuzz_decode.py", "decode"), ("fuzz_streams.py", "streams")]


@pytest.mark.parametrize(("target", "corpus"), TARGETS, ids=[t for t, _ in TARGETS])
def test_fuzz_target_short_run(tmp_path: Path, target: str, corpus: str) -> None:
    seeds = FUZZ / "corpus" / corpus
    assert any(seeds.iterdir()), f"{seeds} has no seed inputs"
    work = tmp_path / "corpus"
    shutil.copytree(seeds, work)
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            str(FUZZ / target),
            str(work),
            f"-runs={RUNS}",
            f"-max_total_time={MAX_TOTAL_TIME}",
            "-seed=1",
            "-timeout=30",
            f"-artifact_prefix={artifacts}/",
        ],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    crashes = sorted(p.name for p in artifacts.iterdir())
    lines = [line for line in result.stderr.splitlines() if "INFO: Instrumenting" not in line]
    output = "\n".join(lines)[-6000:]
    assert result.returncode == 0, f"{target} exited {result.returncode}:\n{output}"
    assert not crashes, f"{target} left crash files {crashes}:\n{output}"
    assert "Done" in result.stderr, output
