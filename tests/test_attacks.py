"""benchmarks/attacks.py in the test run: every attack on every optimizer raises and changes nothing, on the
reference and C++ backends for the first case of each optimizer, and through the Triton interpreter for an
elementwise and a two-pass rule (the whole matrix: ``python -m benchmarks.attacks``)."""

from __future__ import annotations

import pytest
from cases import FIRST_CASES, case_named

from benchmarks import attacks


@pytest.mark.parametrize(("backends", "cases"), [
    pytest.param(("reference", "cpu"), FIRST_CASES, id="reference-cpu"),
    pytest.param(("triton",), [case_named("adabelief"), case_named("lamb")], id="triton"),
])
def test_every_attack_raises_and_changes_nothing(backends, cases):
    outcomes = attacks.run(cases, backends)
    assert len(outcomes) >= len(cases) * len(backends) * (len(attacks.ATTACKS) - 3)  # a few need a state buffer
    bad = [(o.attack, o.case, o.backend, o.raised, o.changed[:3], o.error) for o in outcomes
           if o.changed or not o.raised]
    assert not bad, "\n" + attacks.table(outcomes) + "\n" + "\n".join(map(str, bad))
