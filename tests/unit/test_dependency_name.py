"""One vocabulary: ``.dependency_name`` is the name; ``.dependency`` (a name on Site and the 503s) warns."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest

from degrade import DependencyUnavailable, Overloaded, Registry, Severity, Site, fail_soft, site_of

SITE_WARNING = (
    r"Site\.dependency is deprecated; use Site\.dependency_name "
    r"\(in 0\.3 \.dependency becomes the Dependency\)"
)


def _site() -> Site:
    dep = Registry().dependency("cache", severity=Severity.SEV3)

    @fail_soft(dep, fallback=None, reason="a miss")
    def lookup() -> None: ...

    return site_of(lookup)


def _read_old_spelling(obj: object) -> tuple[str, list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = obj.dependency  # type: ignore[attr-defined]
    return value, caught


class TestSite:
    def test_dependency_name_is_the_field(self) -> None:
        """A declared site carries its dependency's name as ``dependency_name``, without a warning."""
        site = _site()
        assert site.dependency_name == "cache"
        assert "dependency_name='cache'" in repr(site)

    def test_construct_with_dependency_name(self) -> None:
        site = Site(name="s", dependency_name="db", mode="fail_loud", reason="r")
        assert site.dependency_name == "db"

    def test_old_spelling_warns_and_returns_the_name(self) -> None:
        """``site.dependency`` still answers the name, with a DeprecationWarning pointing at the caller."""
        site = _site()
        with pytest.warns(DeprecationWarning, match=SITE_WARNING):
            assert site.dependency == "cache"
        value, caught = _read_old_spelling(site)
        assert value == "cache"
        assert [w.filename for w in caught] == [__file__]

    def test_old_spelling_is_read_only(self) -> None:
        site = _site()
        with pytest.raises(AttributeError):
            site.dependency = "other"  # type: ignore[misc]
        with pytest.raises(TypeError):
            Site(name="s", dependency="db", mode="fail_loud", reason="r")  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "exc",
    [
        DependencyUnavailable("db", "writes are off", retry_after=12),
        Overloaded("db", "queue", "the pool is saturated", retry_after=2),
    ],
    ids=["DependencyUnavailable", "Overloaded"],
)
class TestExceptions:
    def test_dependency_name(self, exc: DependencyUnavailable) -> None:
        assert exc.dependency_name == "db"
        assert repr(exc) == f"{type(exc).__name__}('db', {exc.detail!r}, retry_after={exc.retry_after})"

    def test_old_spelling_warns_and_returns_the_name(self, exc: DependencyUnavailable) -> None:
        name = type(exc).__name__
        with pytest.warns(
            DeprecationWarning, match=rf"{name}\.dependency is deprecated; use {name}\.dependency_name"
        ):
            assert exc.dependency == "db"
        value, caught = _read_old_spelling(exc)
        assert value == "db"
        assert [w.filename for w in caught] == [__file__]
        assert "in 0.3 .dependency becomes the Dependency" in str(caught[0].message)

    def test_old_spelling_is_read_only(self, exc: DependencyUnavailable) -> None:
        with pytest.raises(AttributeError):
            exc.dependency = "other"  # type: ignore[misc]

    @pytest.mark.parametrize(
        "clone",
        [lambda e: pickle.loads(pickle.dumps(e)), copy.copy, copy.deepcopy],  # noqa: S301 (our own bytes)
        ids=["pickle", "copy", "deepcopy"],
    )
    def test_pickles_and_copies(self, exc: DependencyUnavailable, clone: object) -> None:
        """Pickling and copying keep dependency_name, detail, retry_after (and Overloaded's reason)."""
        again = clone(exc)  # type: ignore[operator]
        assert type(again) is type(exc)
        assert (again.dependency_name, again.detail, again.retry_after) == (
            exc.dependency_name,
            exc.detail,
            exc.retry_after,
        )
        assert (str(again), repr(again), again.args) == (str(exc), repr(exc), exc.args)
        assert getattr(again, "reason", None) == getattr(exc, "reason", None)


class TestExceptionConstruction:
    def test_the_parameter_keeps_its_keyword(self) -> None:
        """The first parameter is still called ``dependency`` (it is the name), for keyword callers."""
        exc = DependencyUnavailable(dependency="redis", retry_after=3)
        assert (exc.dependency_name, exc.detail) == ("redis", "redis is unavailable")
        shed = Overloaded(dependency="db", reason="queue")
        assert (shed.dependency_name, shed.reason, shed.retry_after) == ("db", "queue", 1)

    def test_a_pickle_of_the_old_attribute_loads(self) -> None:
        """A pickle made when ``dependency`` was a plain attribute loads into ``dependency_name``."""

        class OldPickle:  # what BaseException.__reduce__ produced then: cls(*args), then the instance dict
            def __reduce__(self) -> tuple[object, ...]:
                state = {"dependency": "db", "detail": "down", "retry_after": 7}
                return (DependencyUnavailable, ("dependency 'db' is unavailable: down",), state)

        exc = pickle.loads(pickle.dumps(OldPickle()))  # noqa: S301 (our own bytes)
        assert isinstance(exc, DependencyUnavailable)
        assert (exc.dependency_name, exc.detail, exc.retry_after) == ("db", "down", 7)
        assert "dependency" not in vars(exc)
