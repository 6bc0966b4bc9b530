"""bench/bench_e2e.py --smoke: every variant of the end-to-end bench starts, answers and stops."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
#: The smoke run takes about 45 s on a shared 2-CPU host; it must stay under 90 s.
BUDGET = 90.0


def require_wrk() -> None:
    """Skip locally without wrk; fail in CI, with the install hint."""
    if shutil.which("wrk") is not None:
        return
    message = "wrk is not installed: apt-get install wrk"
    if IN_CI:
        pytest.fail(f"{message} (.ci/run must install it)")
    pytest.skip(message)


@pytest.mark.timeout(BUDGET + 60)
def test_every_variant_answers(postgres_dsn: str, redis_url: str, amqp_url: str) -> None:
    """Each variant's server starts, is loaded by wrk, answers as expected and is stopped."""
    require_wrk()
    start = time.monotonic()
    run = subprocess.run(
        [sys.executable, "bench/bench_e2e.py", "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=BUDGET + 30,
        check=False,
    )
    took = time.monotonic() - start
    output = run.stdout[-6000:] + run.stderr[-3000:]
    assert run.returncode == 0, output
    assert "(smoke run: no timing goals judged)" in run.stdout, output
    assert "ERROR" not in run.stdout, output
    assert took < BUDGET, f"the smoke run took {took:.0f} s"
