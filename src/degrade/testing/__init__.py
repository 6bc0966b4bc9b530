"""Outage simulation for tests and drills: a fault-injecting TCP proxy and a fake clock.

:class:`FaultProxy` sits in front of any TCP service and refuses, blackholes,
delays, resets or cuts its connections on demand. :class:`FakeClock` is a clock
and a sleep in one object whose time moves only when the test moves it
(``Registry(clock=fake, sleep=fake.sleep)``). The pytest fixtures
``fault_proxy`` and ``simulate_outage`` live in :mod:`degrade.testing.plugin`,
which pytest loads by itself once degrade is installed (entry point ``pytest11``);
this package does not import pytest.
"""

from __future__ import annotations

import warnings

from ._clock import FakeClock
from .proxy import Fault, FaultProxy, ProxyOutage, ProxyStats

__all__ = [
    "FakeClock",
    "Fault",
    "FaultProxy",
    "ProxyOutage",
    "ProxyStats",
]


def __getattr__(name: str) -> object:
    if name == "Outage":
        warnings.warn(
            "degrade.testing.Outage is deprecated; use degrade.testing.ProxyOutage",
            DeprecationWarning,
            stacklevel=2,
        )
        return ProxyOutage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
