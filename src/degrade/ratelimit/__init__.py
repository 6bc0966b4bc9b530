"""Rate limiting shared through Redis, with an in-memory fallback (extra ``redis``).

``RateLimiter`` decides with GCRA, atomically in Redis (one Lua step per
decision, concurrent decisions batched into one ``EVALSHA``); while Redis is
down its outage policy answers: ``"memory"`` (default), ``"deny"`` or
``"allow"`` (fail-open, logged as a security event). ``RateLimitMiddleware``
applies it to a Starlette / FastAPI app with the IETF ``RateLimit`` headers;
``rate_limit`` is the per-route FastAPI dependency (a key from the request
body or the handler, late binding to the app's limiter, headers kept for a
503 in the scope under ``SCOPE_HEADERS``); several limits
(``"5/minute;100/hour"``) must all allow; ``await limiter.reset(key)``
forgets a key's buckets; ``client_ip`` keys requests
by client address behind trusted proxies. See ``docs/ratelimit.md``.

The algorithm itself (rates, decisions, the bounded memory store) lives in
:mod:`degrade._gcra` and needs no Redis; this module does.
"""

from __future__ import annotations

from .._extras import require

require("redis", "redis", feature="degrade.ratelimit")

from .._gcra import Decision, MemoryStore, Rate, Rates, parse_rate, parse_rates  # noqa: E402
from ._client_ip import KeyFunc, client_ip  # noqa: E402
from ._dependency import (  # noqa: E402
    SCOPE_HEADERS,
    RateLimitExceeded,
    RouteLimit,
    rate_limit,
    rate_limited_response,
    ratelimit_exception_handlers,
)
from ._headers import Policy  # noqa: E402
from ._limiter import Fallback, LimiterStats, RateLimiter  # noqa: E402
from ._middleware import RateLimitMiddleware  # noqa: E402

__all__ = [
    "SCOPE_HEADERS",
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
    "Rates",
    "RouteLimit",
    "client_ip",
    "parse_rate",
    "parse_rates",
    "rate_limit",
    "rate_limited_response",
    "ratelimit_exception_handlers",
]
