"""Which requests the DB gate gates: ``include`` / ``exclude`` entries, optionally by method.

An entry is a path prefix (any method, ``"/api"``) or methods, a space and a
prefix (``"GET /users"``, ``"POST|PUT /api"``; ``GET`` covers ``HEAD``, which
Starlette serves with the GET route). The matcher builds one prefix table per
method an entry names and one for every other method: a request costs a dict
lookup and two ``str.startswith`` calls.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ..exceptions import ConfigurationError

__all__ = ["matcher"]

#: The method tokens an include/exclude entry may name ("GET /users", "POST|PUT /api").
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})

_Entry = tuple[frozenset[str] | None, str]  # (methods, or None for any; path prefix)
_Table = tuple[tuple[str, ...], frozenset[str]]  # (prefixes ending in "/", exact paths)


def _entries(label: str, value: str | Iterable[str]) -> list[_Entry]:
    """Parse ``"/api"`` (any method) and ``"GET|HEAD /api"`` entries; a bad one names itself."""
    items = (value,) if isinstance(value, str) else tuple(value)
    out: list[_Entry] = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigurationError(f"{label} takes path prefixes starting with '/'; got {item!r}")
        if item.startswith("/"):
            out.append((None, item))
            continue
        head, _, prefix = item.partition(" ")
        prefix = prefix.lstrip(" ")
        if not prefix.startswith("/"):
            raise ConfigurationError(
                f"{label} entry {item!r}: a path prefix starting with '/', optionally after "
                "methods and a space ('/api', 'GET /users', 'POST|PUT /api')"
            )
        methods = {token.upper() for token in head.split("|")}
        unknown = sorted(methods - _METHODS)
        if unknown:
            raise ConfigurationError(
                f"{label} entry {item!r}: unknown method {unknown[0]!r}; "
                f"methods are {', '.join(sorted(_METHODS))}, joined with '|'"
            )
        if "GET" in methods:
            methods.add("HEAD")  # Starlette and FastAPI serve HEAD with the GET route
        out.append((frozenset(methods), prefix))
    return out


def _table(entries: list[_Entry], method: str | None) -> _Table:
    """Prefix-match data for ``method`` (None: a method no entry names).

    ``/api`` matches ``/api`` and ``/api/...`` but not ``/apix``.
    """
    prefixes = [p for methods, p in entries if methods is None or (method is not None and method in methods)]
    starts = tuple(p if p.endswith("/") else p + "/" for p in prefixes)
    exact = frozenset(p.rstrip("/") or "/" for p in prefixes)
    return starts, exact


def matcher(include: str | Iterable[str], exclude: str | Iterable[str]) -> Callable[[str, str], bool]:
    """``gated(method, path)``: under an ``include`` entry and under no ``exclude`` entry.

    An entry is a path prefix (any method) or methods, a space and a prefix
    (``"GET /users"``, ``"POST|PUT /api"``; ``GET`` covers ``HEAD`` too).
    """
    inc = _entries("include", include)
    exc = _entries("exclude", exclude)
    if not inc:
        raise ConfigurationError("include needs at least one path prefix, e.g. ('/api/',)")
    # One table per method an entry names, one for every other method: two lookups per request.
    named = {m for methods, _ in inc + exc if methods is not None for m in methods}
    tables = {m: (_table(inc, m), _table(exc, m)) for m in named}
    other = (_table(inc, None), _table(exc, None))

    def gated(method: str, path: str) -> bool:
        (inc_starts, inc_exact), (exc_starts, exc_exact) = tables.get(method, other)
        return (path.startswith(inc_starts) or path in inc_exact) and not (
            path.startswith(exc_starts) or path in exc_exact
        )

    return gated
