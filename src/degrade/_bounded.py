"""Hard time bounds.

``asyncio.timeout`` cancels the awaited code and then waits for it to finish
unwinding; a driver that shields its clean-up (SQLAlchemy's graceful close) can
overrun the bound by seconds. :func:`hard_timeout` runs the work in its own task
and stops waiting at the bound: the caller gets ``TimeoutError`` on time while
the cancelled task unwinds in the background. Such abandoned tasks are counted
and capped, so a blackholed service cannot make them pile up.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")

#: Most abandoned (cancelled, still unwinding) tasks kept at once per process.
MAX_ABANDONED = 256

_abandoned: set[asyncio.Task[Any]] = set()


class Abandoned:
    """Counters of work abandoned at a bound."""

    total = 0
    refused = 0


def abandoned_in_flight() -> int:
    """How many abandoned tasks are still unwinding."""
    return len(_abandoned)


async def settle_abandoned(timeout: float) -> int:  # noqa: ASYNC109 - this is the bound
    """Wait up to ``timeout`` seconds for this loop's abandoned tasks to finish unwinding.

    Used at shutdown so no task is left pending. Returns how many still unwind.
    """
    loop = asyncio.get_running_loop()
    tasks = [t for t in _abandoned if t.get_loop() is loop]
    if not tasks:
        return 0
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    return len(pending)


def _reap(task: asyncio.Task[Any]) -> None:
    _abandoned.discard(task)
    if not task.cancelled():
        task.exception()  # retrieve it, so asyncio does not log "never retrieved"


def can_abandon() -> bool:
    """False when the cap of unwinding abandoned tasks is reached."""
    return len(_abandoned) < MAX_ABANDONED


async def hard_timeout(
    coro: Coroutine[Any, Any, T],
    timeout: float,  # noqa: ASYNC109 - this is the bound
    *,
    eager: bool = False,
) -> T:
    """Await ``coro`` for at most ``timeout`` seconds, then raise ``TimeoutError``.

    The work is cancelled at the bound; its clean-up finishes in the background.
    Cancelling the caller cancels the work too, and the CancelledError propagates.

    With ``eager=True`` the work starts at once, as its own task (Python 3.12's
    eager tasks, emulated on 3.11): work that finishes without suspending (a
    pool checkout that finds an idle connection) returns without a scheduling
    round trip, which is what keeps a hard bound affordable on a hot path.
    """
    task: asyncio.Future[T]
    if eager:
        started, done_now, result = _start_eager(coro)
        if done_now:
            return result
        task = started
    else:
        task = asyncio.ensure_future(coro)
    try:
        done, _ = await asyncio.wait((task,), timeout=timeout)
    except asyncio.CancelledError:
        task.cancel()
        _abandon(task)
        raise
    if done:
        return task.result()
    task.cancel()
    _abandon(task)
    raise TimeoutError(f"gave up after {timeout:g}s")


def _abandon(task: asyncio.Task[Any]) -> None:
    if task.done():
        _reap(task)
        return
    Abandoned.total += 1
    _abandoned.add(task)
    task.add_done_callback(_reap)


# -- eager start -------------------------------------------------------------
#
# Why not just step the coroutine in the caller's task: code that suspends in
# its first step may have bound itself to ``asyncio.current_task()`` already
# (``asyncio.timeout()`` does, and asyncpg's connect uses it); after a hand-off
# to another task, its timer would cancel the *caller*. So the first step runs
# while the new task is the current one, as 3.12's eager tasks do.

_UNSET: Any = object()


def _start_eager(coro: Coroutine[Any, Any, T]) -> tuple[asyncio.Task[Any], bool, T]:
    """Start ``coro`` as a task and run its first step now.

    Returns ``(task, finished, result)``: when ``finished`` the coroutine
    returned ``result`` without suspending (and ``task`` completes with None on
    its own); an exception raised before the first suspension propagates.
    """
    loop = asyncio.get_running_loop()
    if sys.version_info >= (3, 12):
        task: asyncio.Task[Any] = asyncio.eager_task_factory(loop, coro)
        if task.done():
            return task, True, task.result()
        return task, False, _UNSET
    return _start_eager_311(loop, coro)


class _Continue(Coroutine[Any, Any, Any]):
    """Drives a coroutine whose first step already ran; what the task runs (3.11)."""

    __slots__ = ("_coro", "_finished", "_first")

    def __init__(self, coro: Coroutine[Any, Any, Any]) -> None:
        self._coro = coro
        self._first: Any = _UNSET
        self._finished = False

    def send(self, value: Any) -> Any:
        if self._finished:
            raise StopIteration(None)  # the caller took the result already
        first = self._first
        if first is not _UNSET:
            self._first = _UNSET
            return first  # hand the task what the first step yielded (a future, or None)
        return self._coro.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        self._first = _UNSET
        if self._finished:
            raise typ if val is None else val
        return self._coro.throw(typ) if val is None and tb is None else self._coro.throw(typ, val, tb)

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, None, Any]:  # pragma: no cover - only a Task drives it
        raise TypeError("_Continue is driven by its task; it cannot be awaited")


def _start_eager_311(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]
) -> tuple[asyncio.Task[Any], bool, T]:
    from asyncio.tasks import _enter_task, _leave_task

    ctx = contextvars.copy_context()
    cont = _Continue(coro)
    task: asyncio.Task[Any] = loop.create_task(cont, context=ctx)
    caller = asyncio.current_task(loop)
    if caller is not None:
        _leave_task(loop, caller)
    _enter_task(loop, task)
    try:
        cont._first = ctx.run(coro.send, None)
    except StopIteration as stop:
        cont._finished = True
        return task, True, stop.value
    except BaseException:
        cont._finished = True
        raise
    finally:
        _leave_task(loop, task)
        if caller is not None:
            _enter_task(loop, caller)
    return task, False, _UNSET
