"""bench/bench_core.py's decorator rows run (a few calls each, no services): every wrapper short-circuits."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from degrade import Registry

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def bench_core() -> ModuleType:
    for library in ("aiobreaker", "circuitbreaker", "pybreaker", "purgatory"):
        pytest.importorskip(library)
    path = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location("bench_core_smoke", BENCH / "bench_core.py")
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # puts bench/ on sys.path for its _util
    finally:
        sys.path[:] = path
    return module


# aiobreaker (an anchor the bench compares against) calls datetime.utcnow(), deprecated
# since Python 3.12; its warning is not ours to fix.
@pytest.mark.filterwarnings("ignore:datetime.datetime.utcnow:DeprecationWarning")
async def test_decorator_rows(bench_core: ModuleType) -> None:
    """Up and down rows of every wrapper, FailureRate and purgatory included, measure what they say."""
    registry = Registry(version="smoke")
    try:
        result = await bench_core.bench_decorators(registry, 1000, 1)  # its check needs 1,000 short-circuits
    finally:
        await registry.aclose()
    assert {"fail_soft_rate", "purgatory"} <= set(result["up"])
    assert {"fail_soft_rate", "purgatory_soft", "purgatory"} <= set(result["down"])
    assert result["rate_trip_calls"] >= 20  # FailureRate's min_calls: real failing traffic tripped it
    assert registry["bench_async_rate"].is_down
