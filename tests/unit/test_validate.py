"""The shared argument checks: one rule per kind of value, infinity and NaN rejected everywhere."""

from __future__ import annotations

import math

import pytest

from degrade import ConfigurationError, _validate


class TestSeconds:
    @pytest.mark.parametrize("value", [0.1, 1, 30.0])
    def test_accepts_positive_finite(self, value: float) -> None:
        """Positive finite numbers come back as floats."""
        assert _validate.seconds("timeout", value) == float(value)

    @pytest.mark.parametrize("value", [0, -1, math.inf, -math.inf, math.nan, True, "1", None])
    def test_rejects(self, value: object) -> None:
        """Zero, negatives, infinity, NaN, booleans and non-numbers are refused, naming the argument."""
        with pytest.raises(ConfigurationError, match=r"timeout must be a finite number of seconds > 0"):
            _validate.seconds("timeout", value)

    def test_allow_zero(self) -> None:
        """allow_zero admits 0 but not negatives."""
        assert _validate.seconds("sticky", 0, allow_zero=True) == 0.0
        with pytest.raises(ConfigurationError, match=">= 0"):
            _validate.seconds("sticky", -0.5, allow_zero=True)

    def test_optional(self) -> None:
        """None passes through optional_seconds."""
        assert _validate.optional_seconds("max_lag", None) is None
        assert _validate.optional_seconds("max_lag", 2) == 2.0


class TestCounts:
    def test_count(self) -> None:
        """Counts are ints >= minimum; booleans and floats are refused."""
        assert _validate.count("n", 3) == 3
        assert _validate.count("n", 0, minimum=0) == 0
        for bad in (0, 1.0, True, "2"):
            with pytest.raises(ConfigurationError, match="n must be an int >= 1"):
                _validate.count("n", bad)

    def test_whole_seconds(self) -> None:
        """Retry-After is a whole number of seconds >= 0."""
        assert _validate.whole_seconds("retry_after", 0) == 0
        for bad in (-1, 1.5, True):
            with pytest.raises(ConfigurationError, match="whole number of seconds"):
                _validate.whole_seconds("retry_after", bad)

    def test_fraction(self) -> None:
        """Rates are in (0, 1]."""
        assert _validate.fraction("threshold", 0.5) == 0.5
        assert _validate.fraction("threshold", 1) == 1.0
        for bad in (0, 1.5, math.nan, True):
            with pytest.raises(ConfigurationError, match=r"threshold must be a number in \(0, 1\]"):
                _validate.fraction("threshold", bad)


class TestIntRange:
    def test_accepts_both_ends(self) -> None:
        """Both bounds are included and the int comes back unchanged."""
        assert _validate.int_range("port", 1, minimum=1, maximum=65535) == 1
        assert _validate.int_range("port", 65535, minimum=1, maximum=65535) == 65535

    @pytest.mark.parametrize("value", [0, 65536, -1, 80.0, math.inf, math.nan, True, "80", None])
    def test_rejects(self, value: object) -> None:
        """Out of range, floats (infinity and NaN too), booleans and non-numbers are refused."""
        with pytest.raises(ConfigurationError, match=r"^port must be an int in 1\.\.65535; got "):
            _validate.int_range("port", value, minimum=1, maximum=65535)


class TestNotFinite:
    @pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
    def test_every_rule_refuses_infinity_and_nan(self, value: float) -> None:
        """No rule accepts infinity or NaN, whatever its range."""
        checks = [
            lambda: _validate.seconds("a", value),
            lambda: _validate.seconds("a", value, allow_zero=True),
            lambda: _validate.optional_seconds("a", value),
            lambda: _validate.whole_seconds("a", value),
            lambda: _validate.count("a", value, minimum=0),
            lambda: _validate.int_range("a", value, minimum=0, maximum=10),
            lambda: _validate.fraction("a", value),
        ]
        for check in checks:
            with pytest.raises(ConfigurationError, match=rf"^a must be .+; got {value!r}$"):
                check()
