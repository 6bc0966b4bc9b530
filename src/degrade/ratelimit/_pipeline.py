"""Asking Redis: the direct call, auto-pipelined batches, hard deadlines, cutting short.

:class:`Pipeline` is the part of :class:`~degrade.ratelimit.RateLimiter`
that sends decisions to Redis and answers their waiters:

* **direct**: an idle limiter asks at once, from the caller's own task (no
  extra loop iteration), bounded by ``asyncio.timeout``;
* **batched**: decisions arriving while a call is out wait in ``_pending``
  and go out together as one ``EVALSHA`` at the next loop iteration (at most
  ``max_batch`` a call, ``max_in_flight`` calls), each call with a hard
  deadline (``call_later``) that answers its waiters by the outage policy
  whatever the driver does while it unwinds;
* **bounded**: past ``max_pending`` waiting decisions, the next ones are shed
  (local saturation, counted, never a failure of Redis);
* **cut short**: when the dependency goes down (whoever noticed), every
  decision queued or in flight is answered by the outage policy at once
  instead of at its ``timeout``.

A call that fails feeds the dependency (an outage) or is reported (an
unexpected error); a call that found no connection, or whose reply arrived
but was read too late, is shed. The wire itself is
:mod:`degrade.ratelimit._wire`, the answers :mod:`degrade.ratelimit._decisions`.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from .._gcra import Decision, Rate
from ..dependency import Dependency
from ._decisions import US
from ._groups import Groups, group_arg
from ._stats import OVERFLOW
from ._wire import SHED_LOOP_LAG, SHED_MAX_PENDING, Call, Group, Pending, Wire, is_outage, rate_arg

__all__ = ["Pipeline"]


class Pipeline(Groups, Wire):
    """The limiter's Redis path: direct calls, batches, deadlines and cutting short.

    A base of :class:`~degrade.ratelimit.RateLimiter`; the attributes below
    are set by its ``__init__``.
    """

    timeout: float
    max_batch: int
    max_in_flight: int
    max_pending: int
    _pending: list[Pending]
    _flush_scheduled: bool
    #: Direct calls (made from the caller's own task) and batches in flight.
    _direct: set[Call]
    _in_flight: dict[asyncio.Task[None], Call]

    # -- deciding remotely ---------------------------------------------------

    async def _decide_remotely(self, bucket: str, rate: Rate | Group, cost: int = 1) -> Decision:
        """Ask Redis: at once when idle, else batched with the other decisions of this tick.

        ``rate`` is a :class:`Group` for several limits (``bucket`` is then its first key).
        """
        dep = self.dependency
        if dep is None:  # pragma: no cover - callers check _decide_locally first
            return self._memory_any(bucket, rate, cost)
        if not self._direct and not self._in_flight and not self._pending:
            # Idle: go now, from the caller's own task (no extra loop iterations).
            # Hits arriving while this call is out batch up behind it.
            return await self._call_direct(bucket, rate, cost, dep)
        if len(self._pending) >= self.max_pending:
            # Local capacity ran out, Redis did not fail: shed, never a failure.
            self._counts.overflow += 1
            if OVERFLOW is not None:
                OVERFLOW.inc()
            return self._shed_any(bucket, rate, cost, SHED_MAX_PENDING)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Decision] = loop.create_future()
        self._pending.append((bucket, rate, cost, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return await future

    def _succeeded(self, dep: Dependency, started: float) -> None:
        self._counts.batches += 1
        self._unexpected_streak = 0
        if dep.failures or dep.counts_calls:  # a rate rule counts every round trip; SlowCalls times it
            dep.record_success(dep.clock() - started if dep.times_calls else None)
        if self._failing_open and not dep.is_down:
            self._end_fail_open()

    def _failed(self, exc: Exception, dep: Dependency) -> bool:
        """Feed the dependency with ``exc``; True when it is unexpected (not an outage)."""
        if is_outage(exc):
            dep.record_failure(exc)
            return False
        self._report_error(exc)
        return True

    async def _call_direct(self, key: str, rate: Rate | Group, cost: int, dep: Dependency) -> Decision:
        call = Call(None)
        self._direct.add(call)
        now = int(self._clock() * US)
        if type(rate) is Rate:
            text, bulk = rate_arg(rate, cost)
            keys, texts, bulks = [key], [text], [bulk]
        else:
            keys = list(rate.buckets)  # type: ignore[union-attr]
            texts, bulks = group_arg(rate.rates, cost)  # type: ignore[union-attr]
        started = dep.clock() if dep.times_calls else 0.0
        try:
            # redis-py unwinds a cancelled call at once (it drops the connection
            # without waiting), so asyncio.timeout is a hard enough bound here.
            # The dependency going down meanwhile moves its deadline to now.
            async with asyncio.timeout(self.timeout) as call.timeout:
                reply = await self._eval(call, keys, now, texts, bulks)
        except Exception as exc:
            if call.cut:  # Redis went down meanwhile: the outage is already counted
                self._counts.cut_short += 1
                return self._fallback_any(key, rate, cost)
            reason = self._shed_reason(call, exc)
            if reason:
                return self._shed_any(key, rate, cost, reason)
            unexpected = self._failed(exc, dep)
            return self._fallback_any(key, rate, cost, unexpected=unexpected)
        finally:
            self._direct.discard(call)
            if self._pending and not self._flush_scheduled:  # decisions waited for this slot
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)
        self._succeeded(dep, started)
        values = self._values(reply, len(keys))
        if values is None:
            return self._fallback_any(key, rate, cost, unexpected=True)
        if type(rate) is Rate:
            return self._from_redis(key, rate, now, values, 0)
        return self._from_redis_group(rate, now, values, 0)  # type: ignore[arg-type]

    # -- batching ------------------------------------------------------------

    def _flush(self) -> None:
        self._flush_scheduled = False
        dep = self.dependency
        if dep is not None and dep.is_down and not dep.admit():
            # Went down while these waited: no call, the outage policy answers.
            pending, self._pending = self._pending, []
            self._resolve_fallback(pending)
            return
        loop = asyncio.get_running_loop()
        while self._pending and len(self._in_flight) + len(self._direct) < self.max_in_flight:
            batch = self._pending[: self.max_batch]
            del self._pending[: self.max_batch]
            call = Call(batch)
            self._arguments(call, batch)
            self._write_now(call)
            task = call.task = loop.create_task(self._send(call))
            self._in_flight[task] = call
            task.add_done_callback(self._sent)
            # A hard bound: at the deadline the waiters get the outage policy's answer
            # at once, whatever the driver does while it unwinds the cancelled call.
            call.timer = loop.call_later(self.timeout, self._expire, call)
        # The rest waits for a free slot (_sent flushes again), batching up meanwhile.

    def _arguments(self, call: Call, batch: list[Pending]) -> None:
        call.now = int(self._clock() * US)
        keys, texts, bulks = call.keys, call.texts, call.bulks
        for key, rate, cost, _ in batch:
            if type(rate) is Rate:
                keys.append(key)
                text, bulk = rate_arg(rate, cost)
                texts.append(text)
                bulks.append(bulk)
            else:
                call.grouped = True
                keys += rate.buckets  # type: ignore[union-attr]
                group_texts, group_bulks = group_arg(rate.rates, cost)  # type: ignore[union-attr]
                texts += group_texts
                bulks += group_bulks

    def _sent(self, task: asyncio.Task[None]) -> None:
        call = self._in_flight.pop(task, None)
        if call is not None and call.timer is not None:
            call.timer.cancel()
        if call is not None and call.written and call.conn is not None:
            # Cancelled before it ran: the connection holds a command whose reply nobody reads.
            conn, call.conn = call.conn, None
            task.get_loop().create_task(self._discard(conn))
        if self._pending and not self._flush_scheduled:
            self._flush_scheduled = True
            task.get_loop().call_soon(self._flush)

    async def _send(self, call: Call) -> None:
        dep = self.dependency
        batch = call.batch
        if dep is None or batch is None:  # pragma: no cover - hit() only batches when a dependency is set
            self._resolve_fallback(batch or [])
            return
        now = call.now
        started = dep.clock() if dep.times_calls else 0.0
        try:
            reply = await self._eval(call, call.keys, now, call.texts, call.bulks)
        except asyncio.CancelledError:
            self._resolve_fallback(batch)
            raise
        except Exception as exc:
            if call.cut or call.expired:  # the waiters were answered and it was counted then
                return
            reason = self._shed_reason(call, exc)
            if reason:
                self._resolve_shed(batch, reason)
            else:
                self._resolve_fallback(batch, unexpected=self._failed(exc, dep))
            return
        finally:
            if call.timer is not None:
                call.timer.cancel()
        self._succeeded(dep, started)
        values = self._values(reply, len(call.keys))
        if values is None:
            self._resolve_fallback(batch, unexpected=True)
            return
        if call.grouped:
            self._answer_grouped(batch, now, values)
            return
        i = 0
        for key, rate, _cost, future in batch:
            decision = self._from_redis(key, rate, now, values, i)  # type: ignore[arg-type]  # not grouped
            i += 4
            if not future.done():
                future.set_result(decision)

    def _answer_grouped(self, batch: list[Pending], now: int, values: list[Any]) -> None:
        """Answer a batch holding several-limit decisions (4 values per key, several keys per group)."""
        i = 0
        for key, rate, _cost, future in batch:
            if type(rate) is Rate:
                decision = self._from_redis(key, rate, now, values, i)
                i += 4
            else:
                decision = self._from_redis_group(rate, now, values, i)  # type: ignore[arg-type]
                i += 4 * len(rate.rates)  # type: ignore[union-attr]
            if not future.done():
                future.set_result(decision)

    def _resolve_fallback(self, batch: list[Pending], *, unexpected: bool = False) -> None:
        for key, rate, cost, future in batch:
            if not future.done():
                future.set_result(self._fallback_any(key, rate, cost, unexpected=unexpected))

    def _resolve_shed(self, batch: list[Pending], reason: str) -> None:
        for key, rate, cost, future in batch:
            if not future.done():
                future.set_result(self._shed_any(key, rate, cost, reason))

    def _expire(self, call: Call) -> None:
        task = call.task
        if task is None or task.done() or call.cut:
            return
        batch = call.batch or []
        reason = self._shed_reason(call, None)
        call.expired = reason or "timeout"
        if reason:
            self._resolve_shed(batch, reason)
            if reason == SHED_LOOP_LAG:
                return  # Redis answered: let the task read it (and count the success)
        else:
            if self.dependency is not None:
                self.dependency.record_failure(TimeoutError(f"rate limiter gave up after {self.timeout:g}s"))
            self._resolve_fallback(batch)
        task.cancel()

    # -- following the dependency ------------------------------------------------

    def _on_transition(self, dep: Dependency) -> None:
        """Redis went down: answer every decision waiting on it now, by the outage policy.

        Decisions queued for a round trip and those in flight (batched or
        direct) stop waiting for their timeout: a blackholed Redis would hold
        them ``timeout`` seconds each, for nothing. Counted in ``stats().cut_short``.
        """
        if not dep.is_down:
            return
        pending, self._pending = self._pending, []
        self._cut(pending)
        try:
            current = asyncio.current_task()
        except RuntimeError:  # no running loop: nothing of ours is in flight
            current = None
        for task, call in list(self._in_flight.items()):
            if call.cut:
                continue
            call.cut = True
            self._cut(call.batch or [])
            if task is not current and not task.done():
                task.cancel()
        for call in list(self._direct):
            if call.cut or call.timeout is None:
                continue
            call.cut = True
            with contextlib.suppress(RuntimeError):  # already past its deadline or finished
                call.timeout.reschedule(-1.0)  # in the past: it fires on the next loop iteration

    def _cut(self, batch: list[Pending]) -> None:
        for key, rate, cost, future in batch:
            if not future.done():
                self._counts.cut_short += 1
                future.set_result(self._fallback_any(key, rate, cost))
