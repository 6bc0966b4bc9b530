"""Rates and their text: ``"100/minute"``, ``"5 per minute"``, ``"100/minute;burst=20;1000/hour"``.

The grammar is the one of the ``limits`` library (which slowapi uses), so a
rate string written for slowapi means the same here, plus our ``;burst=B``::

    limits  := limit (SEP limit)*              SEP is ';', ',' or '|'
    limit   := COUNT ('/' | 'per') [N] UNIT [';burst=' B]
    UNIT    := second | minute | hour | day | month | year, plural or abbreviated
               (s, sec, min, h, hr, d, mo, y, yr); a month is 30 days and a
               year 360, as in ``limits``

``"10/2 minutes"`` is 10 per 120 seconds. ``;burst=B`` binds to the limit it
follows. Several limits must *all* allow a request (as in slowapi), and none
is consumed unless all allow.

Rejected: ``m`` as a unit (minute or month? ``limits`` rejects it too), empty
limits (``"5/minute;;"``), the same limit twice (one bucket counted twice), and
more than :data:`MAX_LIMITS` limits. Every error is a
:class:`~degrade.ConfigurationError` that says what is wrong and lists the
accepted forms. Parsing is cached (bounded), so a string costs one dict lookup
after its first use.
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

from . import _validate
from .exceptions import ConfigurationError

__all__ = ["ACCEPTED_FORMS", "MAX_CAPACITY_US", "MAX_LIMITS", "Rate", "Rates", "parse_rate", "parse_rates"]

#: Accepted rate forms, quoted by every parse error.
ACCEPTED_FORMS = (
    "'COUNT/UNIT' or 'COUNT per UNIT', optionally 'COUNT/N UNITs' (e.g. '10/2 minutes'), "
    "UNIT one of second, minute, hour, day, month, year (plural or abbreviated: s, sec, min, "
    "h, hr, d, mo, y, yr), each optionally followed by ';burst=B' (COUNT, N and B whole "
    "numbers >= 1); several limits joined by ';', ',' or '|' must all allow. "
    "E.g. '100/minute', '5 per minute', '100/minute;burst=20;1000/hour'"
)

#: Most limits in one rate string (each is one bucket to read and write per request).
MAX_LIMITS = 8
_US = 1_000_000
#: Largest bucket, in microseconds: keeps ``now + T * burst`` exact in a Lua double (< 2**53).
MAX_CAPACITY_US = 10**15

_DAY = 86400
_UNITS = {
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), 1),
    **dict.fromkeys(("min", "mins", "minute", "minutes"), 60),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), 3600),
    **dict.fromkeys(("d", "day", "days"), _DAY),
    **dict.fromkeys(("mo", "month", "months"), 30 * _DAY),
    **dict.fromkeys(("y", "yr", "yrs", "year", "years"), 360 * _DAY),
}
#: The canonical unit of each period (the text of a Rate, part of its storage keys).
_NAMES = {1: "second", 60: "minute", 3600: "hour", _DAY: "day", 30 * _DAY: "month", 360 * _DAY: "year"}

_LIMIT_RE = re.compile(r"\s*(\d{1,10})\s*(?:/|per)\s*(\d{1,10})?\s*([a-z]+)\s*", re.IGNORECASE)
_BURST_RE = re.compile(r"\s*burst\s*=\s*(\d{1,10})\s*", re.IGNORECASE)
_SEP_RE = re.compile(r"([,;|])")


class Rate(NamedTuple):
    """A parsed rate: ``limit`` requests per ``period`` seconds, bucket of ``burst``.

    Build one with :func:`parse_rate` or :meth:`Rate.of` (or pass the string
    wherever a rate is taken). ``burst`` defaults to ``limit``: a fresh client
    may send ``limit`` requests at once, then one every ``period / limit`` seconds.

    Failure mode: out-of-range numbers raise ``ValueError`` when the rate is
    built, never when it is used.
    """

    limit: int
    period: int
    burst: int
    #: Emission interval ``T`` in microseconds (rounded up, so never faster than the rate).
    emission_us: int
    #: ``T * burst``: how far ahead of now the theoretical arrival time may run.
    capacity_us: int
    #: The canonical text, e.g. ``"100/minute;burst=20"``.
    text: str

    @classmethod
    def of(cls, limit: int, period: int, burst: int | None = None) -> Rate:
        """Build a rate from numbers; raises ``ValueError`` when out of range."""
        for label, value in (("limit", limit), ("period", period), ("burst", burst)):
            if value is None:
                continue
            _validate.count(f"rate {label}", value)
        burst = limit if burst is None else burst
        emission = -(-period * _US // limit)  # ceil
        capacity = emission * burst
        if capacity > MAX_CAPACITY_US:
            raise ConfigurationError(
                f"rate {limit}/{period}s with burst {burst} holds a client back for more than "
                f"{MAX_CAPACITY_US // _US // 86400} days; use a smaller burst or a shorter period"
            )
        unit = _NAMES.get(period)
        base = f"{limit}/{unit}" if unit else f"{limit}/{period}s"
        text = base if burst == limit else f"{base};burst={burst}"
        return cls(limit, period, burst, emission, capacity, text)

    def per_pod(self, pods: int) -> Rate:
        """This rate split across ``pods`` processes (each gets ``limit // pods``, at least 1)."""
        if pods == 1:
            return self
        return Rate.of(max(1, self.limit // pods), self.period, max(1, self.burst // pods))

    def __str__(self) -> str:
        return self.text


class Rates(tuple[Rate, ...]):
    """Several rates that must all allow a request: ``parse_rates("5/minute;100/hour")``.

    A tuple of :class:`Rate` in the order written, at least two of them when it
    stands for a multi-limit string (a single limit is a plain :class:`Rate`).

    Failure mode: none of its own; build it with :func:`parse_rates`, which checks.
    """

    __slots__ = ()

    @property
    def text(self) -> str:
        """The canonical text, e.g. ``"100/minute;burst=20;1000/hour"``."""
        return ";".join(rate.text for rate in self)

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"Rates({self.text!r})"


def _invalid(text: str, problem: str) -> ConfigurationError:
    return ConfigurationError(f"invalid rate {text[:80]!r}: {problem}; expected {ACCEPTED_FORMS}")


def _unit(text: str, piece: str, name: str) -> int:
    period = _UNITS.get(name.lower())
    if period is not None:
        return period
    if name.lower() == "m":
        raise _invalid(text, "unit 'm' is ambiguous (minute or month?): write 'min' or 'month'")
    raise _invalid(text, f"unknown unit {name[:20]!r} in {piece.strip()[:40]!r}")


def _limit(text: str, piece: str) -> tuple[int, int]:
    """``(count, period)`` of one ``COUNT/[N] UNIT`` piece."""
    match = _LIMIT_RE.fullmatch(piece)
    if match is None:
        if not text.strip():
            raise _invalid(text, "an empty rate")
        if not piece.strip():
            raise _invalid(text, "an empty limit (two separators in a row, or one at an end)")
        raise _invalid(text, f"cannot read {piece.strip()[:40]!r} as a limit")
    count, multiple, unit = match.groups()
    period = _unit(text, piece, unit)
    if multiple is not None:
        if int(multiple) < 1:
            raise _invalid(text, f"the period multiplier in {piece.strip()[:40]!r} must be >= 1")
        period *= int(multiple)
    return int(count), period


@functools.lru_cache(maxsize=512)
def _parse(text: str) -> Rate | Rates:
    pieces = _SEP_RE.split(text)
    found: list[list[int | None]] = []  # [count, period, burst]
    for i in range(0, len(pieces), 2):
        piece, sep = pieces[i], pieces[i - 1] if i else ""
        param = _BURST_RE.fullmatch(piece)
        if param is None:
            found.append([*_limit(text, piece), None])
            continue
        if not found or sep != ";":
            raise _invalid(text, "';burst=B' follows the limit it applies to, after a ';'")
        if found[-1][2] is not None:
            raise _invalid(text, "a limit takes one burst")
        found[-1][2] = int(param.group(1))
    if len(found) > MAX_LIMITS:
        raise _invalid(text, f"{len(found)} limits, at most {MAX_LIMITS}")
    rates: list[Rate] = []
    for count, period, burst in found:
        try:
            rate = Rate.of(count, period, burst)  # type: ignore[arg-type]
        except ConfigurationError as exc:
            raise _invalid(text, str(exc)) from None
        if rate in rates:
            raise _invalid(text, f"{rate.text!r} is listed twice")
        rates.append(rate)
    return rates[0] if len(rates) == 1 else Rates(rates)


def _parse_text(rate: object) -> Rate | Rates:
    if isinstance(rate, Rate | Rates):
        return rate
    if not isinstance(rate, str):
        raise ConfigurationError(f"a rate is a string ({ACCEPTED_FORMS}); got {type(rate).__name__}")
    return _parse(rate)


def parse_rate(rate: str | Rate) -> Rate:
    """Parse one limit, ``"100/minute"`` or ``"5 per minute;burst=2"`` (cached); a Rate passes through.

    See the module docstring for the grammar; a string of several limits
    raises here (use :func:`parse_rates`, or pass it where rates are taken:
    ``limiter.hit``, ``RateLimitMiddleware``, ``rate_limit``).

    Raises:
        ValueError: (a :class:`~degrade.ConfigurationError`) saying what is wrong
            and listing the accepted forms.
    """
    parsed = _parse_text(rate)
    if isinstance(parsed, Rates):
        raise ConfigurationError(
            f"rate {str(rate)[:80]!r} holds {len(parsed)} limits where one is expected; "
            "parse it with parse_rates() or pass it to limiter.hit, RateLimitMiddleware or rate_limit"
        )
    return parsed


def parse_rates(rate: str | Rate | Rates) -> Rate | Rates:
    """Parse one limit or several (``"5/minute;100/hour"``, cached): a :class:`Rate` or :class:`Rates`.

    Several limits must all allow a request; ``;burst=B`` binds to the limit
    it follows (``"100/minute;burst=20;1000/hour"``).

    Raises:
        ValueError: (a :class:`~degrade.ConfigurationError`) saying what is wrong
            and listing the accepted forms.
    """
    return _parse_text(rate)
