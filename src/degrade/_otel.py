"""OpenTelemetry instruments of degrade's signals: the bridge behind :mod:`degrade.observe`.

Importing this module imports nothing of OpenTelemetry: ``opentelemetry.metrics``
(the API, extra ``otel``) is imported the first time degrade needs a meter,
and never when it is not installed. Each Prometheus metric of
:mod:`degrade.observe` has an OpenTelemetry instrument here, with the same
meaning and the same labels as attributes (``degrade.dependency``,
``degrade.site``...); the instruments' names, units and descriptions are rows
of the metric registry (:mod:`degrade._metrics`), and ``docs/operations.md``
has the table.

Nothing runs per call on the hot path: the per-site counts are the plain
integers of each :class:`~degrade.Site`, read by observable instruments when the
host's reader collects; only transitions (rare) add to synchronous counters.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal, Protocol

from . import _bounded, _metrics
from ._extras import optional

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation

#: The instrumentation scope: ``get_meter("degrade", degrade.__version__)``.
SCOPE = "degrade"

# Attribute names (the Prometheus label in the comment).
DEPENDENCY = "degrade.dependency"  # dependency
STATE = "degrade.dependency.state"  # to
SITE = "degrade.site"  # site
MODE = "degrade.site.mode"  # fail_soft: degrade_fallback_total; fail_loud: degrade_fail_loud_total
REASON = "degrade.shed.reason"  # reason

Kind = Literal["counter", "up_down_counter", "gauge"]
#: What an observable instrument's callback returns: (value, attributes) pairs.
Readings = Iterable[tuple[float, Mapping[str, str]]]


class SiteCounts(Protocol):
    """The counts of a :class:`degrade.Site` that metrics read (shared with ``observe``)."""

    @property
    def name(self) -> str: ...
    @property
    def dependency_name(self) -> str: ...
    @property
    def mode(self) -> str: ...
    @property
    def degraded_calls(self) -> int: ...
    @property
    def shed_calls(self) -> dict[str, int]: ...


class Source(Protocol):
    """What the bridge reads at collection time (``degrade.observe.metrics``)."""

    @property
    def sites(self) -> list[tuple[Any, float]]: ...
    @property
    def up(self) -> dict[str, int]: ...


class Counter:
    """A counter that adds to an OpenTelemetry ``Counter`` while the bridge is on, else does nothing.

    Made by :func:`degrade.observe.otel_counter`; it follows the bridge when it
    is bound to another meter provider or switched off.
    """

    __slots__ = ("_instrument", "description", "name", "unit")

    def __init__(self, name: str, description: str, unit: str) -> None:
        self.name = name
        self.description = description
        self.unit = unit
        self._instrument: Any = None

    def add(self, amount: float = 1, attributes: Mapping[str, str] | None = None) -> None:
        """Add ``amount`` (>= 0) with ``attributes``; a no-op while OpenTelemetry is off or absent."""
        instrument = self._instrument
        if instrument is not None:
            instrument.add(amount, attributes)

    def __repr__(self) -> str:
        return f"<degrade otel counter {self.name!r} {'on' if self._instrument is not None else 'off'}>"


class Observable:
    """An observable instrument whose ``callback`` returns (value, attributes) pairs at collection time."""

    __slots__ = ("callback", "description", "kind", "name", "unit")

    def __init__(self, name: str, description: str, unit: str, kind: Kind, callback: Callable[[], Readings]):
        self.name = name
        self.description = description
        self.unit = unit
        self.kind = kind
        self.callback = callback


class Bridge:
    """degrade's instruments on one meter; :meth:`close` turns them silent, :meth:`reopen` back on.

    One bridge per meter provider, kept for the process: a meter cannot drop an
    instrument, and creating one again under the same name returns the first
    (its callbacks included), so going back to a provider reuses its bridge.
    """

    def __init__(self, meter: Meter, observation: type[Observation], source: Source) -> None:
        self.meter = meter
        self.live = True
        self._observation = observation
        self._source = source
        #: The instruments of :func:`degrade.observe.otel_counter` counters, by name.
        self._counters: dict[str, Any] = {}
        self._observables: list[Observable] = []
        # Every instrument's name, unit and description come from the registry (degrade._metrics).
        self.transitions = self._counter("degrade.dependency.transitions")
        self.flaps = self._counter("degrade.dependency.flaps")
        self._observable("degrade.dependency.up", self._up)
        self._observable("degrade.site.degraded_calls", self._degraded)
        self._observable("degrade.site.shed", self._shed)
        self._observable("degrade.abandoned.in_flight", self._abandoned_in_flight)
        self._observable("degrade.abandoned.calls", self._abandoned)
        self._observable("degrade.abandoned.refused", self._abandoned_refused)

    def _counter(self, name: str) -> Any:
        spec = _metrics.instrument(name)
        return self.meter.create_counter(spec.name, unit=spec.unit, description=spec.description)

    def _observable(self, name: str, callback: Callable[[CallbackOptions], Iterable[Observation]]) -> None:
        spec = _metrics.instrument(name)
        self._create_observable(spec.kind)(
            spec.name, callbacks=[callback], unit=spec.unit, description=spec.description
        )

    def _create_observable(self, kind: Kind) -> Callable[..., Any]:
        return {
            "counter": self.meter.create_observable_counter,
            "up_down_counter": self.meter.create_observable_up_down_counter,
            "gauge": self.meter.create_observable_gauge,
        }[kind]

    def close(self) -> None:
        """Stop reporting: observable callbacks yield nothing, transitions are not counted."""
        self.live = False

    def reopen(self) -> None:
        """Report again (the provider was chosen again)."""
        self.live = True

    # -- synchronous: transitions are rare ---------------------------------------------

    def transition(self, dependency: str, state: str, flapped: bool) -> None:
        """One transition of ``dependency`` to ``state``; ``flapped`` when it was a quick relapse."""
        if not self.live:
            return
        self.transitions.add(1, {DEPENDENCY: dependency, STATE: state})
        if flapped:
            self.flaps.add(1, {DEPENDENCY: dependency})

    # -- observable: read at collection time ---------------------------------------------

    def observe(self, readings: Readings) -> Iterator[Observation]:
        """``readings`` as Observations, or nothing once closed."""
        if not self.live:
            return
        make = self._observation
        for value, attributes in readings:
            yield make(value, dict(attributes))

    def _up(self, options: CallbackOptions) -> Iterable[Observation]:
        return self.observe((value, {DEPENDENCY: name}) for name, value in list(self._source.up.items()))

    def _degraded(self, options: CallbackOptions) -> Iterable[Observation]:
        # Sites that share attributes (the same function decorated twice) add up, as in Prometheus.
        totals: dict[tuple[str, str, str], int] = {}
        for site, _ in list(self._source.sites):
            key = (site.dependency_name, site.name, site.mode)
            totals[key] = totals.get(key, 0) + site.degraded_calls
        return self.observe(
            (value, {DEPENDENCY: dep, SITE: name, MODE: mode}) for (dep, name, mode), value in totals.items()
        )

    def _shed(self, options: CallbackOptions) -> Iterable[Observation]:
        totals: dict[tuple[str, str, str], int] = {}
        for site, _ in list(self._source.sites):
            for reason, count in list(site.shed_calls.items()):
                key = (site.dependency_name, site.name, reason)
                totals[key] = totals.get(key, 0) + count
        return self.observe(
            (value, {DEPENDENCY: dep, SITE: name, REASON: reason})
            for (dep, name, reason), value in totals.items()
        )

    def _abandoned_in_flight(self, options: CallbackOptions) -> Iterable[Observation]:
        return self.observe([(_bounded.abandoned_in_flight(), {})])

    def _abandoned(self, options: CallbackOptions) -> Iterable[Observation]:
        return self.observe([(_bounded.Abandoned.total, {})])

    def _abandoned_refused(self, options: CallbackOptions) -> Iterable[Observation]:
        return self.observe([(_bounded.Abandoned.refused, {})])

    # -- the instruments other modules registered ----------------------------------------------

    def attach(self, counter: Counter) -> None:
        """Give ``counter`` its instrument on this meter (created once per name)."""
        instrument = self._counters.get(counter.name)
        if instrument is None:
            instrument = self._counters[counter.name] = self.meter.create_counter(
                counter.name, unit=counter.unit, description=counter.description
            )
        counter._instrument = instrument

    def attach_observable(self, spec: Observable) -> None:
        """Create ``spec``'s observable instrument on this meter (once), reading its callback."""
        if any(spec is known for known in self._observables):
            return
        self._observables.append(spec)

        def callback(options: CallbackOptions) -> Iterable[Observation]:
            return self.observe(list(spec.callback()))

        self._create_observable(spec.kind)(
            spec.name, callbacks=[callback], unit=spec.unit, description=spec.description
        )


class State:
    """Whether degrade reports to OpenTelemetry, and through which bridge (one per process).

    ``mode`` is ``"auto"`` until the first signal decides: with the API
    installed, a bridge on the global meter provider (a no-op until the host
    configures one, then forwarded to it); without it, ``"absent"`` for good.
    :func:`degrade.observe.use_opentelemetry` sets ``"on"`` or ``"off"``.
    """

    def __init__(self, source: Source) -> None:
        self.source = source
        self.mode: Literal["auto", "on", "off", "absent"] = "auto"
        self.bridge: Bridge | None = None
        self.counters: list[Counter] = []
        self.observables: list[Observable] = []
        self._lock = threading.Lock()
        self._global: Bridge | None = None
        self._bridges: weakref.WeakKeyDictionary[Any, Bridge] = weakref.WeakKeyDictionary()

    def ensure(self) -> Bridge | None:
        """The bridge, bound to the global meter provider on the first call while ``mode`` is auto."""
        if self.mode == "auto":
            with self._lock:
                if self.mode == "auto":
                    api: Any = optional("opentelemetry.metrics")
                    if api is None:
                        self.mode = "absent"
                    else:
                        self._bind(api, None)
                        self.mode = "on"
        return self.bridge

    def bind(self, api: Any, meter_provider: MeterProvider | None) -> None:
        """Report through ``meter_provider`` (None: the global one) from now on."""
        with self._lock:
            self._bind(api, meter_provider)
            self.mode = "on"

    def off(self) -> None:
        """Stop reporting to OpenTelemetry (until :meth:`bind`)."""
        with self._lock:
            self._close()
            self.mode = "off"

    def counter(self, name: str, description: str, unit: str) -> Counter:
        """A :class:`Counter`, attached to the current bridge and to every later one."""
        counter = Counter(name, description, unit)
        bridge = self.ensure()
        with self._lock:
            self.counters.append(counter)
            if bridge is not None and bridge is self.bridge:
                bridge.attach(counter)
        return counter

    def observable(self, spec: Observable) -> None:
        """Register ``spec`` on the current bridge and on every later one."""
        bridge = self.ensure()
        with self._lock:
            self.observables.append(spec)
            if bridge is not None and bridge is self.bridge:
                bridge.attach_observable(spec)

    def _close(self) -> None:
        if self.bridge is not None:
            self.bridge.close()
            self.bridge = None
        for counter in self.counters:
            counter._instrument = None

    def _bind(self, api: Any, meter_provider: MeterProvider | None) -> None:
        self._close()
        if meter_provider is api.get_meter_provider():
            meter_provider = None  # the global one, passed explicitly: the same bridge
        bridge = self._global if meter_provider is None else self._bridges.get(meter_provider)
        if bridge is None:
            meter = api.get_meter(SCOPE, _version(), meter_provider=meter_provider)
            bridge = Bridge(meter, api.Observation, self.source)
            if meter_provider is None:
                self._global = bridge
            else:
                self._bridges[meter_provider] = bridge
        else:
            bridge.reopen()
        for counter in self.counters:
            bridge.attach(counter)
        for spec in self.observables:
            bridge.attach_observable(spec)
        self.bridge = bridge


def _version() -> str:
    """The package's version, also while it is still being imported (a module-level counter)."""
    try:
        from . import __version__
    except ImportError:  # degrade/__init__.py has not reached __version__ yet
        import importlib.metadata

        try:
            return importlib.metadata.version("degrade")
        except importlib.metadata.PackageNotFoundError:
            return ""
    return __version__
