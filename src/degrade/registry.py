"""The registry: every dependency of an app, their probes, managed components and owned resources.

Shutdown runs in the order that keeps each part's resources alive while it
stops: the probes and the managed components (an event publisher flushing its
buffer, a limiter, a lag monitor) first; then, with :meth:`Registry.wrap`, the
host's own teardown; then the clients and engines handed over with
:meth:`Registry.owns`, last, in reverse order of registration. A component
never finds its Redis client closed under it. With :meth:`Registry.wrap` the
host's lifespan is the outer one: it starts first (it may create what the
components use) and ends last.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import random
import time
from collections.abc import AsyncIterator, Callable, Collection, Coroutine, Iterator, Mapping
from typing import Any, Protocol, TypeVar, Unpack, runtime_checkable

from . import _binding, _guard, _looplag
from ._bounded import settle_abandoned
from .dependency import Clock, Dependency, DependencyOptions, Severity, Sleep
from .exceptions import ConfigurationError
from .hatch import OPENING_VALUES, EscapeHatch
from .observe import logger

__all__ = ["Component", "Registry"]

Lifespan = Callable[[Any], contextlib.AbstractAsyncContextManager[Any]]
R = TypeVar("R")

#: How :meth:`Registry.owns` closes a resource: the first of these async methods it has.
CLOSERS = ("aclose", "dispose", "close")


@runtime_checkable
class Component(Protocol):
    """Something the lifespan starts and stops (an event publisher, say).

    ``start()`` must not wait on its backing service: it starts background work
    and returns. ``aclose()`` stops it within its own bound.
    """

    async def start(self) -> None:
        """Start background work and return at once."""

    async def aclose(self) -> None:
        """Stop, within the component's own bound."""


class Registry:
    """All dependencies of one app, and the lifespan that runs their probes.

    Failure mode: start-up never raises or blocks on a dependency; an app starts
    with every dependency down. Shutdown cancels probes, stops managed
    components, then closes owned clients and engines (:meth:`owns`), each
    within ``shutdown_timeout``; one that fails or overruns is logged by class
    name and the others still close.

    Its lifespan also registers it on the app: each request is bound to it
    (sites declared by dependency *name* resolve here) and an uncaught
    :class:`~degrade.DependencyUnavailable` answers 503 even without
    :func:`~degrade.exception_handlers` (see :class:`~degrade.DegradeMiddleware`).

    Args:
        version: The app's version, shown by ``/health/deep``.
        shutdown_timeout: Seconds each managed component gets to stop.
        clock: Monotonic clock injected into every dependency (tests pass a fake).
        sleep: Async sleep used by probes (tests pass a controllable one).
        rng: Source of probe jitter, returning floats in [0, 1).
    """

    def __init__(
        self,
        version: str = "",
        *,
        shutdown_timeout: float = 5.0,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if not shutdown_timeout > 0:
            raise ConfigurationError(f"shutdown_timeout must be > 0 seconds; got {shutdown_timeout!r}")
        self.version = version
        self.shutdown_timeout = shutdown_timeout
        self._clock = clock
        self._sleep = sleep
        self._rng = rng
        self._deps: dict[str, Dependency] = {}
        self._hatches: dict[str, EscapeHatch] = {}
        self._components: list[Component] = []
        self._owned: list[Any] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        #: Sites declared by dependency name, bound to this registry (see degrade._binding).
        self._late: dict[Any, Callable[..., Any]] = {}
        self._started_at = time.monotonic()
        _binding.registered(self)

    # -- dependencies --------------------------------------------------------

    def dependency(
        self, name: str, *, severity: Severity, **options: Unpack[DependencyOptions]
    ) -> Dependency:
        """Declare a backing service and return its :class:`Dependency`.

        Args:
            name: Unique, e.g. ``"db"``, ``"redis"``.
            severity: ``Severity.SEV1`` (worst) to ``SEV3``.
            **options: Those of :class:`Dependency`: ``impact`` (what users see
                while it is down, for the runbook), ``runbook`` (path or URL of
                the sub-runbook), ``check`` (an async callable that raises when
                the service is unhealthy, see :mod:`degrade.checks`),
                ``critical`` (down => ``/health/deep`` 503; defaults to
                ``severity == SEV1``), ``trip`` (how it goes down,
                :class:`~degrade.policies.Consecutive` ``(3)`` by default),
                ``recovery`` (how it comes back,
                :class:`~degrade.policies.Probe` ``(interval=0.5, timeout=0.8)``
                by default), ``retry_after`` (seconds, for its 503s),
                ``watch_interval`` (also run the check this often while ok).
                ``failure_threshold``, ``recovery_interval`` and
                ``check_timeout`` are shorthands for the two policies.

        Raises:
            ConfigurationError: empty or duplicate name, or a bad option.
        """
        if isinstance(name, str) and name in self._deps:
            raise ConfigurationError(f"a dependency named {name!r} is already registered")
        dep = Dependency(
            name,
            severity=severity,
            spawn=self._spawn,
            clock=self._clock,
            sleep=self._sleep,
            rng=self._rng,
            **options,
        )
        self._deps[name] = dep
        _binding.adopt(self, dep)
        return dep

    def escape_hatch(
        self,
        name: str,
        *,
        dependency: Dependency,
        reason: str,
        fallback: Any,
        env: str | None = None,
        env_opens: Collection[str] = OPENING_VALUES,
        log_interval: float = 10.0,
    ) -> EscapeHatch:
        """Declare an operator switch that may soften ``dependency``'s fail-loud sites.

        Give it to a site with ``@fail_loud(dep, hatch=hatch, ...)``. See
        :class:`~degrade.hatch.EscapeHatch` for the arguments.

        Raises:
            ValueError: duplicate name, or a dependency of another registry.
        """
        if name in self._hatches:
            raise ConfigurationError(f"an escape hatch named {name!r} is already registered")
        if self._deps.get(getattr(dependency, "name", None)) is not dependency:  # type: ignore[arg-type]
            raise ConfigurationError(f"{dependency!r} is not a dependency of this registry")
        hatch = EscapeHatch(
            name,
            dependency=dependency,
            reason=reason,
            fallback=fallback,
            env=env,
            env_opens=env_opens,
            log_interval=log_interval,
            clock=self._clock,
        )
        self._hatches[name] = hatch
        return hatch

    def hatches_for(self, dependency: Dependency) -> tuple[EscapeHatch, ...]:
        """The escape hatches that may soften ``dependency``'s fail-loud sites."""
        return tuple(hatch for hatch in self._hatches.values() if hatch.dependency is dependency)

    @property
    def hatches(self) -> Mapping[str, EscapeHatch]:
        """The escape hatches by name (read-only view)."""
        return self._hatches.copy()

    @property
    def dependencies(self) -> Mapping[str, Dependency]:
        """The dependencies by name, in registration order (read-only view)."""
        return self._deps.copy()

    def __getitem__(self, name: str) -> Dependency:
        return self._deps[name]

    def __iter__(self) -> Iterator[Dependency]:
        return iter(list(self._deps.values()))

    def __len__(self) -> int:
        return len(self._deps)

    @property
    def uptime(self) -> float:
        """Seconds since the registry was created."""
        return time.monotonic() - self._started_at

    # -- components and tasks ------------------------------------------------

    def manage(self, component: Component) -> Component:
        """Have the lifespan start and stop ``component``; returns it."""
        if not isinstance(component, Component):
            raise ConfigurationError(
                f"{component!r} cannot be managed: it needs async start() and aclose() methods"
            )
        self._components.append(component)
        return component

    def owns(self, resource: R) -> R:
        """Have shutdown close ``resource`` (a client, an engine) after the components that use it.

        ``redis = registry.owns(degrade.redis.client(url))``,
        ``engine = registry.owns(create_async_engine(url))``. Closed by the first
        async method it has of ``aclose()`` (redis, httpx), ``dispose()``
        (SQLAlchemy's ``AsyncEngine``) and ``close()`` (aio-pika), in reverse
        order of registration, after every managed component stopped and after
        the host's teardown when the lifespan is :meth:`wrap`'s. Returns ``resource``.

        Failure mode: a close that raises or outlives ``shutdown_timeout`` is
        logged (``resource.close_failed``, class names only) and the others
        still close.

        Raises:
            ConfigurationError: ``resource`` has no async ``aclose``, ``dispose`` or ``close``
                (a sync engine, say: use ``create_async_engine``).
        """
        if _closer(resource) is None:
            raise ConfigurationError(
                f"registry.owns() takes an async client or engine; {type(resource).__name__} has no "
                "async aclose(), dispose() or close() (a sync engine? use create_async_engine)"
            )
        if not any(r is resource for r in self._owned):
            self._owned.append(resource)
        return resource

    @contextlib.contextmanager
    def bind(self) -> Iterator[Registry]:
        """Run a block against this registry: sites declared by dependency name resolve here.

        ``with registry.bind(): await load_session(token)``, in a script, a
        worker or a test; tasks created in the block inherit it. Requests of an
        app whose lifespan is this registry's are bound already.
        """
        token = _binding.current.set(self)
        try:
            yield self
        finally:
            _reset(token)

    def _track(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run a dependency's background work (its probe) as a task this registry stops at shutdown."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._track(task)
        return task

    def _all_components(self) -> list[Component]:
        found = list(self._components)
        for dep in self._deps.values():
            found.extend(c for c in dep.components if c not in found)
        return found

    async def aclose(self) -> None:
        """Stop every probe and managed component, then close owned resources (idempotent)."""
        await self._stop_running()
        await self._close_owned()

    async def _close_owned(self) -> None:
        for resource in reversed(self._owned):
            close = _closer(resource)
            try:
                async with asyncio.timeout(self.shutdown_timeout):
                    await close()  # type: ignore[misc]
            except Exception as exc:  # one client's failure must not keep the others open
                logger.error(
                    "resource.close_failed", resource=type(resource).__name__, error=type(exc).__name__
                )

    async def _stop_running(self, *, components: bool = True) -> None:
        """Stop every probe and (``components``) managed component; owned resources stay open."""
        _binding.started(self, False)
        for dep in self._deps.values():
            await dep.stop_probe()
        for component in reversed(self._all_components() if components else []):
            await self._stop(component)
        tasks = [t for t in self._tasks if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=self.shutdown_timeout)
        # Checks cut off by a cancelled probe unwind in the background; wait for
        # them so the loop is left with no pending task (bounded, and reported).
        unwinding = await settle_abandoned(self.shutdown_timeout)
        if unwinding:
            logger.warning("shutdown.tasks_still_unwinding", count=unwinding)

    async def _stop(self, component: Component) -> None:
        try:
            async with asyncio.timeout(self.shutdown_timeout):
                await component.aclose()
        except Exception as exc:  # one component's failure must not block the others
            logger.error(
                "component.stop_failed", component=type(component).__name__, error=type(exc).__name__
            )

    async def start(self) -> None:
        """Start managed components and the probes of dependencies already down.

        Never raises on a dependency's account: a component whose ``start()``
        fails is logged and left stopped. Starts the event loop's lateness
        monitor too (``degrade._looplag``: 20 timer callbacks a second), which
        keeps timeouts on an overloaded worker from marking services down.
        """
        _looplag.monitor()
        _binding.started(self, True)
        for component in self._all_components():
            try:
                async with asyncio.timeout(self.shutdown_timeout):
                    await component.start()
            except Exception as exc:
                logger.error(
                    "component.start_failed", component=type(component).__name__, error=type(exc).__name__
                )
        for dep in self._deps.values():
            dep.resume_probe()
            if dep.watch_interval is not None:
                self._track(
                    asyncio.get_running_loop().create_task(dep.watch(), name=f"degrade.watch[{dep.name}]")
                )

    def _enter(self, app: object) -> contextvars.Token[Any]:
        """Register on the app (the request guard) and bind the lifespan's own code to us."""
        _guard.install(app, self)
        return _binding.current.set(self)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[None]:
        """A Starlette lifespan: ``Starlette(lifespan=registry.lifespan)`` (FastAPI: the same).

        At start-up it registers the registry on the app: each request is bound
        to it (late binding) and answered 503 on an uncaught
        :class:`~degrade.DependencyUnavailable` (see
        :class:`~degrade.DegradeMiddleware`); then it starts probes and
        components. At shutdown it stops them, then closes what it
        :meth:`owns`. To combine it with a lifespan of your own, use :meth:`wrap`.
        """
        token = self._enter(app)
        try:
            await self.start()
            yield
        finally:
            try:
                await self.aclose()
            finally:
                _reset(token)

    def wrap(self, host_lifespan: Lifespan) -> Lifespan:
        """Compose with the host's lifespan: the host's is the outer one.

        ``Starlette(lifespan=registry.wrap(my_lifespan))``; the state that
        ``my_lifespan`` yields is passed through to Starlette. Order:

        1. the registry registers on the app (requests bound, 503 guard) and
           binds the host's lifespan code to itself;
        2. the host's start-up (it may create the clients the components use);
        3. probes and managed components start;
        4. ... the app serves ...
        5. probes and managed components stop (a publisher flushes through a
           client that is still open);
        6. the host's teardown (it may close its clients);
        7. what the registry :meth:`owns` is closed, last.

        If the host's start-up raises, the registry still stops whatever ran.
        """

        @contextlib.asynccontextmanager
        async def lifespan(app: Any) -> AsyncIterator[Any]:
            token = self._enter(app)
            stopped = False
            try:
                async with host_lifespan(app) as state:
                    await self.start()
                    try:
                        yield state
                    finally:
                        await self._stop_running()
                        stopped = True
            finally:
                try:
                    # Again for probes the host's teardown may have woken (not the components
                    # twice), or for everything when the host's start-up raised.
                    await self._stop_running(components=not stopped)
                    await self._close_owned()
                finally:
                    _reset(token)

        return lifespan

    def __repr__(self) -> str:
        states = ", ".join(f"{d.name}={d.state}" for d in self._deps.values())
        return f"<Registry version={self.version!r} {states}>"


def _closer(resource: object) -> Callable[[], Any] | None:
    """The async method that closes ``resource`` (see :data:`CLOSERS`), or None."""
    for name in CLOSERS:
        method = getattr(resource, name, None)
        if method is not None and inspect.iscoroutinefunction(method):
            return method  # type: ignore[no-any-return]
    return None


def _reset(token: contextvars.Token[Any]) -> None:
    # A lifespan entered in one task and left in another (some test fixtures do)
    # cannot reset its token there; that context ends with its task anyway.
    with contextlib.suppress(ValueError):
        _binding.current.reset(token)
