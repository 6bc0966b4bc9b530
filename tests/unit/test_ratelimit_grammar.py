"""The rate grammar: limits' notation (slowapi's), our ;burst=B, several limits, and clear errors."""

from __future__ import annotations

import pytest

from degrade import ConfigurationError
from degrade._gcra import MAX_LIMITS, Rate, Rates, parse_rate, parse_rates

DAY = 86400


class TestAcceptedForms:
    @pytest.mark.parametrize(
        ("text", "limit", "period"),
        [
            ("5/minute", 5, 60),
            ("5/min", 5, 60),
            ("5/mins", 5, 60),
            ("5/minutes", 5, 60),
            ("5 per minute", 5, 60),
            ("5 PER Minute", 5, 60),
            ("5per minute", 5, 60),
            ("100/hour", 100, 3600),
            ("100/h", 100, 3600),
            ("100/hr", 100, 3600),
            ("100 per hours", 100, 3600),
            ("1/s", 1, 1),
            ("1/sec", 1, 1),
            ("2 per second", 2, 1),
            ("10/d", 10, DAY),
            ("10/days", 10, DAY),
            ("3/month", 3, 30 * DAY),
            ("3/mo", 3, 30 * DAY),
            ("1/year", 1, 360 * DAY),
            ("1/yr", 1, 360 * DAY),
            ("10/2 minutes", 10, 120),
            ("10/2minutes", 10, 120),
            ("10 per 2 minutes", 10, 120),
            ("500/7days", 500, 7 * DAY),
            ("10/120s", 10, 120),
        ],
    )
    def test_limits_notation(self, text: str, limit: int, period: int) -> None:
        """limits' notation parses: per or '/', an optional multiplier, plurals, abbreviations."""
        rate = parse_rate(text)
        assert (rate.limit, rate.period, rate.burst) == (limit, period, limit)

    def test_burst_binds_to_a_single_limit(self) -> None:
        """';burst=B' after one limit sets its bucket, in either notation."""
        assert parse_rate("5 per minute;burst=2")[:3] == (5, 60, 2)
        assert parse_rate("5/min ; burst = 2")[:3] == (5, 60, 2)

    def test_the_same_limit_has_one_canonical_text(self) -> None:
        """Spellings of one limit give one Rate, so they share one bucket."""
        assert parse_rate("5 per minute") == parse_rate("5/min") == parse_rate("5/minute")
        assert str(parse_rate("5 per minutes")) == "5/minute"
        assert str(parse_rate("3/mo")) == "3/month"
        assert str(parse_rate("1/yr;burst=1")) == "1/year"
        assert str(parse_rate("10/2 minutes")) == "10/120s"

    def test_canonical_text_parses_back(self) -> None:
        """A Rate's text is itself an accepted form meaning the same rate."""
        for text in ("10/2 minutes;burst=3", "500/7days", "1/yr", "7 per 3 hours"):
            rate = parse_rate(text)
            assert parse_rate(rate.text) == rate


class TestSeveralLimits:
    @pytest.mark.parametrize("text", ["5/minute;100/hour", "5/minute,100/hour", "5/minute|100/hour"])
    def test_separators(self, text: str) -> None:
        """';', ',' and '|' separate limits, as in limits."""
        rates = parse_rates(text)
        assert isinstance(rates, Rates)
        assert [(r.limit, r.period) for r in rates] == [(5, 60), (100, 3600)]
        assert rates.text == "5/minute;100/hour"

    def test_burst_binds_to_the_limit_it_follows(self) -> None:
        """'100/minute;burst=20;1000/hour': the burst is the minute limit's, the hour keeps its own."""
        rates = parse_rates("100/minute;burst=20;1000/hour")
        assert isinstance(rates, Rates)
        assert [r[:3] for r in rates] == [(100, 60, 20), (1000, 3600, 1000)]
        assert str(rates) == "100/minute;burst=20;1000/hour"
        last = parse_rates("10/second , 1000 per day;burst=50")
        assert [r[:3] for r in last] == [(10, 1, 10), (1000, DAY, 50)]  # type: ignore[union-attr]

    def test_one_limit_is_a_rate(self) -> None:
        """parse_rates of one limit gives a plain Rate; Rate and Rates objects pass through."""
        rate = parse_rates("5/minute")
        assert isinstance(rate, Rate)
        rates = parse_rates("5/minute;100/hour")
        assert parse_rates(rates) is rates
        assert parse_rates(rate) is rate

    def test_parse_rate_refuses_several(self) -> None:
        """parse_rate (one limit) says where several limits are taken instead."""
        with pytest.raises(ConfigurationError, match=r"holds 2 limits.*parse_rates"):
            parse_rate("5/minute;100/hour")

    def test_limits_are_bounded(self) -> None:
        """At most MAX_LIMITS limits in one string."""
        text = ";".join(f"{n}/hour" for n in range(1, MAX_LIMITS + 2))
        with pytest.raises(ConfigurationError, match=f"{MAX_LIMITS + 1} limits, at most {MAX_LIMITS}"):
            parse_rates(text)


class TestRejectedForms:
    @pytest.mark.parametrize(
        ("text", "problem"),
        [
            ("", "an empty rate"),
            ("  ", "an empty rate"),
            ("5/m", "unit 'm' is ambiguous"),
            ("5/fortnight", "unknown unit 'fortnight'"),
            ("5/minute;;100/hour", "an empty limit"),
            ("5/minute;", "an empty limit"),
            ("burst=2;5/minute", "';burst=B' follows the limit"),
            ("5/minute,burst=2", "';burst=B' follows the limit"),
            ("5/minute;burst=2;burst=3", "a limit takes one burst"),
            ("5/0 minutes", "period multiplier .* must be >= 1"),
            ("0/minute", "rate limit must be an int >= 1"),
            ("5/minute;burst=0", "rate burst must be an int >= 1"),
            ("5/minute;5 per minute", "'5/minute' is listed twice"),
            ("ten/second", "cannot read 'ten/second'"),
            ("1.5/second", "cannot read"),
            ("-1/second", "cannot read"),
            ("100", "cannot read '100'"),
            ("5/minute;bursts=3", "cannot read 'bursts=3'"),
            ("1" * 11 + "/second", "cannot read"),
        ],
    )
    def test_errors_say_what_is_wrong_and_list_the_forms(self, text: str, problem: str) -> None:
        """Every rejected string raises ConfigurationError naming the problem and the accepted forms."""
        with pytest.raises(ConfigurationError, match=problem) as info:
            parse_rates(text)
        message = str(info.value)
        assert message.startswith(f"invalid rate {text[:80]!r}")
        assert "expected 'COUNT/UNIT' or 'COUNT per UNIT'" in message
        assert "';', ',' or '|'" in message

    def test_a_bucket_too_long_is_refused(self) -> None:
        """A one-a-year bucket fits; a burst that holds a client back for decades does not."""
        assert parse_rate("1/year").capacity_us == 360 * DAY * 1_000_000
        with pytest.raises(ConfigurationError, match="holds a client back"):
            parse_rate("1/year;burst=100")

    def test_non_strings_are_refused(self) -> None:
        """Only strings, Rate and Rates are rates."""
        with pytest.raises(ConfigurationError, match="a rate is a string"):
            parse_rates(5)  # type: ignore[arg-type]
