"""Several limits of one request (``"5/minute;100/hour"``): decided together, all or nothing.

:class:`Groups` is the part of :class:`~degrade.ratelimit.RateLimiter` that
answers a :class:`~degrade.ratelimit._wire.Group` (one storage key per limit)
the way :class:`~degrade.ratelimit._decisions.Decider` answers one limit:
from memory (``MemoryStore.hit_all``), by the outage policy, when shed, and
from the script's reply. Every limit must allow; none is consumed unless all
do, in Redis (one script group, in the same ``EVALSHA`` as the other decisions
of the tick: one round trip) as in memory.

The answer is one :class:`~degrade._gcra.Decision`: the fields of the most
restrictive limit (:func:`most_restrictive`), and every limit's own answer in
``per_limit`` (the headers list them all). A group is one decision in the
counters (``stats().redis``, ``fallback``, ``shed``), as it is one request.

Why a group rides in the same batch as single limits rather than in a script
of its own: a request with two limits then costs what one with one limit
costs (one round trip, shared with the tick's other decisions), and the
single-limit step in the script is unchanged (one failed pattern match is all
a group adds to it).
"""

from __future__ import annotations

from typing import Any

from .._gcra import Decision, Rate, Rates
from ._decisions import US, Decider, _per_pod
from ._wire import MAX_CACHED_RATES, Group, bulk, rate_arg

__all__ = ["Groups", "combine", "group_arg", "most_restrictive"]

_new = tuple.__new__

#: The script arguments of each group of rates and cost: their texts and RESP bulk strings.
_GROUP_ARGS: dict[tuple[Rates, int], tuple[list[str], list[bytes]]] = {}


def group_arg(rates: Rates, cost: int) -> tuple[list[str], list[bytes]]:
    """The script arguments of a group: ``"n|e c inc"`` for its first limit, ``"e c inc"`` for the others."""
    try:
        return _GROUP_ARGS[rates, cost]
    except KeyError:
        pass
    texts = [rate_arg(rate, cost)[0] for rate in rates]
    texts[0] = f"{len(rates)}|{texts[0]}"
    bulks = [bulk(text.encode()) for text in texts]
    if len(_GROUP_ARGS) < MAX_CACHED_RATES:
        _GROUP_ARGS[rates, cost] = (texts, bulks)
    return texts, bulks


def most_restrictive(decisions: tuple[Decision, ...] | list[Decision]) -> int:
    """Index of the limit that binds: denied with the longest wait, else the fewest remaining.

    Ties go to the longer ``reset_after``, then to the first written.
    """
    best = 0
    for i in range(1, len(decisions)):
        d, b = decisions[i], decisions[best]
        if d.allowed != b.allowed:
            if not d.allowed:
                best = i
        elif not d.allowed:
            if (d.retry_after, d.reset_after) > (b.retry_after, b.reset_after):
                best = i
        elif (-d.remaining, d.reset_after) > (-b.remaining, b.reset_after):
            best = i
    return best


def combine(decisions: list[Decision]) -> Decision:
    """One decision for several limits: allowed when all allow, fields of the most restrictive."""
    each = tuple(decisions)
    binding = each[most_restrictive(each)]
    return _new(Decision, (*binding[:6], each))


class Groups(Decider):
    """The limiter's answers for several limits at once; a base of :class:`~degrade.ratelimit.RateLimiter`."""

    def _memory_group(self, group: Group, cost: int) -> Decision:
        pods = self.pods
        rates = group.rates if pods == 1 else [_per_pod(rate, pods) for rate in group.rates]
        now = int(self._clock() * US)
        answers = self.store.hit_all(
            list(group.buckets), now, [(m.emission_us, m.capacity_us) for m in rates], cost
        )
        return combine(
            [
                _new(Decision, (allowed, m.limit, remaining, reset / US, retry / US, "memory", ()))
                for m, (allowed, remaining, reset, retry) in zip(rates, answers, strict=True)
            ]
        )

    def _fallback_group(self, group: Group, cost: int, *, unexpected: bool = False) -> Decision:
        self._counts.fallback += 1
        if self.site is not None:
            self.site.count()
        policy = self.on_outage
        if policy == "memory" or (unexpected and policy == "allow"):
            return self._memory_group(group, cost)
        if policy == "deny":
            retry = float(self.dependency.retry_after) if self.dependency is not None else 1.0
            return combine([Decision(False, r.limit, 0, retry, retry, "deny") for r in group.rates])
        if not self._failing_open:
            self._start_fail_open()
        return combine([Decision(True, r.limit, r.limit, 0.0, 0.0, "allow") for r in group.rates])

    def _shed_group(self, group: Group, cost: int, reason: str) -> Decision:
        self._counts.shed += 1
        if self.site is not None:
            self.site.shed(reason)
        if self.on_outage == "deny":
            return combine([Decision(False, r.limit, 0, 1.0, 1.0, "deny") for r in group.rates])
        return self._memory_group(group, cost)

    def _from_redis_group(self, group: Group, now: int, values: list[Any], i: int) -> Decision:
        pods, warm, store = self.pods, self.warm, self.store
        decisions = []
        for bucket, rate in zip(group.buckets, group.rates, strict=True):
            allowed, remaining, reset, retry = (int(v) for v in values[i : i + 4])
            i += 4
            if warm:
                m = rate if pods == 1 else _per_pod(rate, pods)
                store.warm(bucket, now, reset * m.capacity_us // rate.capacity_us)
            decisions.append(
                _new(Decision, (allowed == 1, rate.limit, remaining, reset / US, retry / US, "redis", ()))
            )
        self._counts.redis += 1
        return combine(decisions)

    # -- one limit or several: the pipeline's error paths answer either ------------

    def _fallback_any(self, key: str, rate: Rate | Group, cost: int, *, unexpected: bool = False) -> Decision:
        if type(rate) is Rate:
            return self._fallback(key, rate, cost, unexpected=unexpected)
        return self._fallback_group(rate, cost, unexpected=unexpected)  # type: ignore[arg-type]

    def _shed_any(self, key: str, rate: Rate | Group, cost: int, reason: str) -> Decision:
        if type(rate) is Rate:
            return self._shed(key, rate, cost, reason)
        return self._shed_group(rate, cost, reason)  # type: ignore[arg-type]

    def _memory_any(self, key: str, rate: Rate | Group, cost: int) -> Decision:
        if type(rate) is Rate:
            return self._memory(key, rate, cost)
        return self._memory_group(rate, cost)  # type: ignore[arg-type]
