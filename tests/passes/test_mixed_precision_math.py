"""The exact knapsack: HiGHS against brute force, ties, several budgets, speed, infeasible budgets."""

from __future__ import annotations

import time

import numpy as np
import pytest

from qcompile.passes.mixed_precision_math import (
    InfeasibleBudgetError,
    brute_force,
    cheapest,
    pareto_front,
    solve,
)


def _instance(rng: np.random.Generator, layers: int, options: int, budgets: int):
    sens = rng.exponential(1.0, (layers, options))
    costs = {f"b{k}": rng.integers(1, 20, (layers, options)).astype(float) for k in range(budgets)}
    limits = {}
    for k, c in costs.items():
        lo, hi = c.min(1).sum(), c.max(1).sum()
        limits[k] = float(lo + rng.uniform(0.1, 0.9) * (hi - lo))
    return sens, costs, limits


def _groups(rng: np.random.Generator, layers: int) -> list[list[int]]:
    perm = [int(i) for i in rng.permutation(layers)]
    return [perm[:3], perm[3:5]] if layers >= 5 else [perm[:2]]


@pytest.mark.parametrize("budgets", [1, 2])
@pytest.mark.parametrize("tied", [False, True])
def test_solver_equals_brute_force(budgets, tied):
    rng = np.random.default_rng(budgets * 10 + tied)
    checked = 0
    for trial in range(40):
        layers, options = int(rng.integers(2, 7)), int(rng.integers(2, 5))
        sens, costs, limits = _instance(rng, layers, options, budgets)
        if trial % 5 == 0:
            sens[rng.integers(layers), rng.integers(options)] = np.inf  # an option a layer cannot take
        groups = _groups(rng, layers) if tied else []
        want = brute_force(sens, costs, limits, groups)
        if want is None:
            with pytest.raises(InfeasibleBudgetError):
                solve(sens, costs, limits, groups)
            continue
        got = solve(sens, costs, limits, groups)
        assert got.objective == pytest.approx(want.objective, rel=1e-9, abs=1e-12)
        for k, limit in limits.items():
            assert got.totals[k] <= limit * (1 + 1e-7)
        for g in groups:
            assert len({got.choice[i] for i in g}) == 1, (g, got.choice)
        checked += 1
    assert checked >= 20


def test_ties_change_the_answer():
    # Alone, layer 0 would take option 1 and layer 1 option 0; tied, they must agree.
    sens = np.array([[5.0, 0.0], [0.0, 5.0], [1.0, 1.0]])
    free = solve(sens)
    tied = solve(sens, groups=[[0, 1]])
    assert free.choice[:2] == (1, 0) and free.objective == 1.0
    assert tied.choice[0] == tied.choice[1] and tied.objective == 6.0


def test_32_layers_7_linears_10_options_under_a_second():
    rng = np.random.default_rng(0)
    layers = 32 * 7
    bits = np.array([16, 8, 4.25, 4.5, 5, 3.5, 3.25, 3, 2.5, 2.25])
    sizes = np.tile([4096 * 4096] * 4 + [4096 * 14336] * 3, 32).astype(float)
    sens = rng.exponential(1.0, (layers, 1)) * 2.0 ** (-bits[None, :]) * rng.uniform(0.5, 2, (layers, 10))
    nbytes = sizes[:, None] * bits[None, :] / 8
    groups = [[7 * b, 7 * b + 1, 7 * b + 2] for b in range(32)] + [[7 * b + 4, 7 * b + 5] for b in range(32)]
    limit = 4.25 * sizes.sum() / 8
    solve(np.ones((2, 2)))  # import scipy.optimize outside the timing (about 0.7 s on its own)
    start = time.perf_counter()
    sol = solve(sens, {"bytes": nbytes}, {"bytes": limit}, groups)
    seconds = time.perf_counter() - start
    print(f"32 x 7 x 10 knapsack (64 tied groups): {seconds * 1000:.0f} ms")
    assert sol.totals["bytes"] <= limit * (1 + 1e-7)
    assert seconds < 1.0


def test_infeasible_budget_names_the_smallest_feasible():
    sens = np.array([[1.0, 0.0], [1.0, 0.0]])
    cost = np.array([[2.0, 8.0], [3.0, 8.0]])
    with pytest.raises(InfeasibleBudgetError, match=r"bytes ≤ 4 is below the smallest feasible bytes, 5") as e:
        solve(sens, {"bytes": cost}, {"bytes": 4.0})
    assert e.value.smallest == {"bytes": 5.0}


def test_two_budgets_jointly_infeasible():
    sens = np.zeros((2, 2))
    a = np.array([[1.0, 10.0], [1.0, 10.0]])
    b = np.array([[10.0, 1.0], [10.0, 1.0]])
    # Each alone is feasible (2); with b ≤ 5 both layers take option 1, so a needs 20 (and vice versa).
    with pytest.raises(InfeasibleBudgetError) as e:
        solve(sens, {"a": a, "b": b}, {"a": 5.0, "b": 5.0})
    assert e.value.smallest == {"a": 20.0, "b": 20.0}
    assert cheapest({"a": a, "b": b}, "a", {"a": 5.0, "b": 5.0}) == 20.0


def test_pareto_front_is_monotone():
    rng = np.random.default_rng(3)
    sens, costs, _ = _instance(rng, 6, 4, 1)
    front = pareto_front(sens, costs["b0"], points=10)
    sizes, errors = zip(*front)
    assert list(sizes) == sorted(sizes) and list(errors) == sorted(errors, reverse=True)
    assert errors[-1] == pytest.approx(sens.min(1).sum())
