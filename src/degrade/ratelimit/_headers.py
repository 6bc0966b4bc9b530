"""The rate-limit headers: one named policy (one limit or several) and its precomputed values.

Headers follow draft-ietf-httpapi-ratelimit-headers-11 (May 2026; the field
syntax is unchanged since -08): ``RateLimit-Policy: "default";q=100;w=60`` names
the policy, its quota ``q`` and window ``w`` in seconds; ``RateLimit:
"default";r=42;t=12`` gives the quota remaining ``r`` and the seconds ``t``
until it is fully restored. Parameters of our own carry the vendor prefix the
draft asks for: ``degrade-burst`` (the bucket, when it differs from ``q``) and
``degrade-fallback`` (the outage policy that answered while Redis is down).

Several limits (``"5/minute;100/hour"``): both fields are Lists in the draft,
so ``RateLimit-Policy`` lists every limit, each named ``"<name>#<n>"`` in the
order written (``"default#1";q=5;w=60, "default#2";q=100;w=3600``), and
``RateLimit`` reports the most restrictive one only (the one a client must
pace itself by; the draft lets a server choose which limits it reports), as
do the ``X-RateLimit-*`` headers.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from .._gcra import Decision, Rate, Rates, parse_rates
from ..exceptions import ConfigurationError
from ._groups import most_restrictive

__all__ = ["DENY_DETAIL", "Headers", "Policy", "rate_limited_body", "retry_seconds"]

Headers = list[tuple[bytes, bytes]]

_NAME_RE = re.compile(r"[\x20-\x7e]{1,100}")
DENY_DETAIL = "rate limiting is unavailable while its store is down"
_MAX_CACHED_HEADERS = 4096


def _sf_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def retry_seconds(decision: Decision) -> int:
    """Whole seconds to wait (>= 1)."""
    return max(1, math.ceil(decision.retry_after))


def rate_limited_body(retry_after: int) -> bytes:
    """The 429 body, encoded."""
    return json.dumps({"error": "rate_limited", "retry_after": retry_after}, separators=(",", ":")).encode()


class Policy:
    """One named rate (one limit, or several that must all allow) and its precomputed header values.

    ``Policy("login", "5/minute")``; ``Policy("api", "5/second;100/hour")``
    builds the several-limit kind (its ``group`` is True, ``rates`` its limits).

    Failure mode: a bad name or rate raises ``ValueError`` at construction;
    building headers never raises.
    """

    __slots__ = ("_cache", "_policy", "_quoted", "bucket_prefix", "name", "prefix", "rate")

    #: Several limits (a :class:`_GroupPolicy`)?
    group = False

    def __new__(cls, name: str, rate: str | Rate | Rates) -> Policy:
        several = cls is Policy and isinstance(parse_rates(rate), Rates)
        return object.__new__(_GroupPolicy if several else cls)

    def __init__(self, name: str, rate: str | Rate | Rates) -> None:
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise ConfigurationError(
                f"a policy name is 1..100 printable ASCII characters (it goes into a header); got {name!r}"
            )
        self._setup(name, parse_rates(rate))  # type: ignore[arg-type]

    def _setup(self, name: str, rate: Rate) -> None:
        self.name = name
        self.rate = rate
        #: Prepended to the client key: each policy counts in its own buckets.
        self.prefix = f"{name}|"
        #: The limiter's storage-key prefix of this policy (set by the middleware).
        self.bucket_prefix = ""
        self._quoted = _sf_string(name)
        self._policy = self._policy_value(self.rate.limit, self.rate.burst)
        # Header lists repeat (remaining and reset take few values): build each once.
        self._cache: dict[Any, Headers] = {}

    def _policy_value(self, limit: int, burst: int) -> bytes:
        value = f"{self._quoted};q={limit};w={self.rate.period}"
        if burst != limit:
            value += f";degrade-burst={burst}"
        return value.encode()

    def _policy_for(self, limit: int) -> bytes:
        """The ``RateLimit-Policy`` item of this limit (the per-pod share while Redis is down)."""
        if limit == self.rate.limit:
            return self._policy
        return self._policy_value(limit, max(1, self.rate.burst * limit // self.rate.limit))

    def headers(self, decision: Decision, *, fallback: bool, legacy: bool) -> Headers:
        """The rate-limit headers of one decision (a shared list: copy it before changing it)."""
        reset = math.ceil(decision.reset_after)
        cache_key = (decision.limit, decision.remaining, reset, decision.source, fallback, legacy)
        cached = self._cache.get(cache_key)
        if cached is not None:
            return cached
        if len(self._cache) >= _MAX_CACHED_HEADERS:
            self._cache.clear()
        headers = self._build(decision, reset, fallback=fallback, legacy=legacy)
        self._cache[cache_key] = headers
        return headers

    def _build(self, decision: Decision, reset: int, *, fallback: bool, legacy: bool) -> Headers:
        value = f"{self._quoted};r={decision.remaining};t={reset}"
        if fallback:
            value += f";degrade-fallback={decision.source}"
        headers = [(b"ratelimit-policy", self._policy_for(decision.limit)), (b"ratelimit", value.encode())]
        if legacy:
            headers += [
                (b"x-ratelimit-limit", str(decision.limit).encode()),
                (b"x-ratelimit-remaining", str(decision.remaining).encode()),
                (b"x-ratelimit-reset", str(reset).encode()),
            ]
        return headers


class _GroupPolicy(Policy):
    """A policy of several limits: every limit in ``RateLimit-Policy``, the binding one in ``RateLimit``."""

    __slots__ = ("members", "rates")

    group = True

    def _setup(self, name: str, rate: Rate) -> None:
        rates: Rates = rate  # type: ignore[assignment]  # Policy.__new__ sent a Rates here
        super()._setup(name, rates[0])
        self.rates = rates
        #: One single-limit policy per limit, named ``"<name>#<n>"`` (built without the name check:
        #: the base name was checked, the suffix is ours).
        self.members = tuple(_member(f"{name}#{i}", r) for i, r in enumerate(rates, 1))

    def headers(self, decision: Decision, *, fallback: bool, legacy: bool) -> Headers:
        each = decision.per_limit
        if len(each) != len(self.members):  # an answer of no limit (a key function's None)
            each = tuple(decision for _ in self.members)
        index = most_restrictive(each)
        binding = each[index]
        reset = math.ceil(binding.reset_after)
        limits = tuple(d.limit for d in each)
        cache_key = (index, limits, binding.remaining, reset, binding.source, fallback, legacy)
        cached = self._cache.get(cache_key)
        if cached is not None:
            return cached
        if len(self._cache) >= _MAX_CACHED_HEADERS:
            self._cache.clear()
        headers = list(self.members[index]._build(binding, reset, fallback=fallback, legacy=legacy))
        listed = b", ".join(m._policy_for(limit) for m, limit in zip(self.members, limits, strict=True))
        headers[0] = (b"ratelimit-policy", listed)
        self._cache[cache_key] = headers
        return headers


def _member(name: str, rate: Rate) -> Policy:
    policy = object.__new__(Policy)
    policy._setup(name, rate)
    return policy
