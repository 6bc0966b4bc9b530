"""Hard time bounds.

``asyncio.timeout`` cancels the awaited code and then waits for it to finish
unwinding; a driver that shields its clean-up (SQLAlchemy's graceful close) can
overrun the bound by seconds. :func:`hard_timeout` runs the work in its own task
and stops waiting at the bound: the caller gets ``TimeoutError`` on time while
the cancelled task unwinds in the background. Such abandoned tasks are counted
and capped, so a blackholed service cannot make them pile up.

The wait can also end early: given ``cancel_on`` (a future such as
:meth:`degrade.Dependency.went_down`), the work is abandoned the same way as
soon as that future completes, and :class:`Interrupted` is raised.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

#: Most abandoned (cancelled, still unwinding) tasks kept at once per process.
MAX_ABANDONED = 256

_abandoned: set[asyncio.Task[Any]] = set()


class Interrupted(Exception):
    """:func:`hard_timeout` gave up before its bound because its ``cancel_on`` future completed.

    Not a ``TimeoutError``: the work did not outlive its bound, the caller learnt
    that waiting longer is pointless (its dependency went down meanwhile).
    """

    def __init__(self, cancel_on: asyncio.Future[Any]) -> None:
        super().__init__("gave up: the awaited dependency went down")
        #: The future that ended the wait (callers check it is theirs).
        self.cancel_on = cancel_on


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
    cancel_on: asyncio.Future[Any] | None = None,
) -> T:
    """Await ``coro`` for at most ``timeout`` seconds, then raise ``TimeoutError``.

    The work is cancelled at the bound; its clean-up finishes in the background.
    Cancelling the caller cancels the work too, and the CancelledError propagates.

    ``cancel_on``, when given, ends the wait early: once it completes (and the
    work has not finished first) the work is cancelled and abandoned exactly as
    at the bound (counted in ``Abandoned.total``) and :class:`Interrupted` is
    raised. ``cancel_on`` itself is only watched, never cancelled or awaited
    for its result, so one future can be shared by every caller.
    """
    task = asyncio.ensure_future(coro)
    try:
        if cancel_on is None:
            await asyncio.wait((task,), timeout=timeout)
        else:
            await asyncio.wait((task, cancel_on), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        _abandon(task)
        raise
    if task.done():  # finished, even if cancel_on completed in the same turn: its outcome wins
        return task.result()
    task.cancel()
    _abandon(task)
    if cancel_on is not None and cancel_on.done():
        raise Interrupted(cancel_on)
    raise TimeoutError(f"gave up after {timeout:g}s")


def _abandon(task: asyncio.Task[Any]) -> None:
    if task.done():
        _reap(task)
        return
    Abandoned.total += 1
    _abandoned.add(task)
    task.add_done_callback(_reap)
