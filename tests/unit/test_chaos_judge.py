"""bench/chaos.py's judge of one matrix cell: the wait bounds of gated routes, on made-up samples.

No services: the judge reads samples only. A gated request's wait in the DB
gate's line (``x-chaos-waited``) is held to the gate's bound, the rest of its
time to the failing dependency's bound plus the route's worst without the fault
(the healthy phase and the healed one once settled).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import pytest

from ..support import load_bench


@pytest.fixture(scope="module")
def chaos() -> ModuleType:
    return load_bench("chaos.py", "chaos_judged")


T_ON, T_OFF = 100.0, 110.0


def _cell(
    chaos: ModuleType, faulted: list[tuple[float, float]], healed: Sequence[tuple[float, float, float]] = ()
) -> list[str]:
    """A RabbitMQ reset cell: 200 healthy POST /tracks (0.1 s in line, up to 0.2 s of work), then ``faulted``.

    ``faulted``: (took, waited) of requests sent while the fault was on;
    ``healed``: (seconds after healing, took, waited) of requests sent after it.
    """
    samples = []
    for i in range(200):
        t0 = 95.0 + i * 0.02
        took, waited = 0.1 + 0.2 * (i % 10) / 9, 0.1
        samples.append(
            chaos.Sample("POST /tracks", t0, t0 + took, 202, took, None, "outbox:1", 1, t0 + took, waited)
        )
    for took, waited in faulted:
        samples.append(
            chaos.Sample("POST /tracks", 105.0, 105.0 + took, 202, took, None, "outbox:2", 1, 106.0, waited)
        )
    for after, took, waited in healed:
        t0 = T_OFF + after
        samples.append(
            chaos.Sample("POST /tracks", t0, t0 + took, 202, took, None, "outbox:3", 1, t0 + took, waited)
        )
    routes = [chaos.Expect("POST /tracks", "POST", "/api/v1/tracks", 202, 202, "{}")]
    durations = chaos.Durations(5.0, 10.0, 10.0, 2.0, 1.0)
    _, violations = chaos.judge_cell("rabbitmq", "reset", routes, samples, T_ON, T_OFF, durations)
    return list(violations)


class TestGatedWaits:
    def test_a_long_line_then_usual_work_is_within_the_bounds(self, chaos: ModuleType) -> None:
        """1.05 s in the gate's line (bound 1 + 0.1 s), then 0.25 s of work (fault-free worst 0.2 + 0.1 s)."""
        assert _cell(chaos, [(1.3, 1.05)]) == []

    def test_a_line_over_the_gates_bound_is_a_violation(self, chaos: ModuleType) -> None:
        violations = _cell(chaos, [(1.35, 1.2)])
        assert len(violations) == 1
        assert "waited in the DB gate's line over its bound (1.0+0.1s)" in violations[0]

    def test_work_over_the_worst_without_the_fault_is_a_violation(self, chaos: ModuleType) -> None:
        """RabbitMQ is not on the path (bound 0): 0.45 s of work is over 0 + 0.1 + 0.2 s."""
        violations = _cell(chaos, [(0.55, 0.1)])
        assert len(violations) == 1
        assert (
            "its work after the DB gate's line over its bound (0.0+0.1+worst without the fault 0.20s)"
            in violations[0]
        )

    def test_the_settled_healed_phase_shows_the_loads_worst_too(self, chaos: ModuleType) -> None:
        """0.45 s of work 5 s after healing, no fault on: the same 0.45 s while faulted is this load's."""
        assert _cell(chaos, [(0.55, 0.1)], healed=[(5.0, 0.55, 0.1)]) == []

    def test_the_healed_phase_before_it_settles_is_no_reference(self, chaos: ModuleType) -> None:
        """1 s after healing the fault's effects may linger: that slow answer does not raise the allowance."""
        violations = _cell(chaos, [(0.55, 0.1)], healed=[(1.0, 0.55, 0.1)])
        assert len(violations) == 1
        assert "worst without the fault 0.20s" in violations[0]
