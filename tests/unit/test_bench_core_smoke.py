"""bench/bench_core.py's decorator rows run (a few calls each, no services): every wrapper short-circuits."""

from __future__ import annotations

from types import ModuleType

import pytest

from degrade import Registry

from ..support import load_bench


@pytest.fixture(scope="module")
def bench_core() -> ModuleType:
    for library in ("aiobreaker", "circuitbreaker", "pybreaker", "purgatory"):
        pytest.importorskip(library)
    return load_bench("bench_core.py", "bench_core_smoke")  # it puts bench/ on sys.path for its _util


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
