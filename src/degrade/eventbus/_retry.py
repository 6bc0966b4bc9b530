"""Which errors mean "the broker is unreachable", and the reconnect backoff (tenacity).

The retry list is positive: only these errors are retried by the reconnect
loop. ``CancelledError`` is a ``BaseException`` and never on it. A channel error
at set-up (the exchange exists with another type, access refused) is a
configuration mistake, not an outage: it is not retried by tenacity; the sender
logs it and tries again after the longest backoff.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import tenacity
from aiormq.exceptions import ChannelInvalidStateError

from ..exceptions import ConfigurationError

__all__ = ["CONNECTION_ERRORS", "wait_jittered"]

#: OSError covers ConnectionError and with it every aiormq AMQPConnectionError
#: (refused, reset, closed by the broker, authentication); TimeoutError is our
#: own bound firing; EOFError is a stream cut mid-frame; ChannelInvalidStateError
#: is a channel or connection that closed under us.
CONNECTION_ERRORS: tuple[type[Exception], ...] = (OSError, TimeoutError, EOFError, ChannelInvalidStateError)


class wait_jittered(tenacity.wait.wait_base):  # tenacity's naming: it composes with theirs
    """Another tenacity wait, shortened by up to ``ratio`` at random (jitter).

    ``wait_jittered(wait_exponential(multiplier=0.2, max=5), 0.2)`` waits
    0.16-0.2 s, 0.32-0.4 s, ... up to 4-5 s: never longer than the base, so
    ``max`` stays a true maximum, and spread so that many publishers that lost
    the same broker do not reconnect in lockstep.
    """

    def __init__(self, base: tenacity.wait.wait_base, ratio: float, rng: Callable[[], float] = random.random):
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0.0 <= ratio < 1.0:
            raise ConfigurationError(f"ratio must be a number in [0, 1); got {ratio!r}")
        self.base = base
        self.ratio = ratio
        self.rng = rng

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        return float(self.base(retry_state)) * (1.0 - self.ratio * self.rng())
