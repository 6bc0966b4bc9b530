"""Rate limiting shared through Redis, with an in-memory fallback (extra ``redis``).

``RateLimiter`` decides with GCRA, atomically in Redis (one Lua step per
decision, concurrent decisions batched into one ``EVALSHA``); while Redis is
down its outage policy answers: ``"memory"`` (default), ``"deny"`` or
``"allow"`` (fail-open, logged as a security event). ``RateLimitMiddleware``
applies it to a Starlette / FastAPI app with the IETF ``RateLimit`` headers;
``rate_limit`` is the per-route FastAPI dependency; ``client_ip`` keys requests
by client address behind trusted proxies. See ``docs/ratelimit.md``.

The algorithm itself (rates, decisions, the bounded memory store) lives in
:mod:`degrade._gcra` and needs no Redis; this module does.
"""

from __future__ import annotations

from .._extras import require

require("redis", "redis", feature="degrade.ratelimit")

from .._gcra import Decision, MemoryStore, Rate, parse_rate  # noqa: E402
from ._client_ip import KeyFunc, client_ip  # noqa: E402
from ._limiter import Fallback, LimiterStats, RateLimiter  # noqa: E402
from ._middleware import (  # noqa: E402
    Policy,
    RateLimitExceeded,
    RateLimitMiddleware,
    rate_limit,
    rate_limited_response,
    ratelimit_exception_handlers,
)

__all__ = [
    "Decision",
    "Fallback",
    "KeyFunc",
    "LimiterStats",
    "MemoryStore",
    "Policy",
    "Rate",
    "RateLimitExceeded",
    "RateLimitMiddleware",
    "RateLimiter",
    "client_ip",
    "parse_rate",
    "rate_limit",
    "rate_limited_response",
    "ratelimit_exception_handlers",
]
