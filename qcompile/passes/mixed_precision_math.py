"""The mixed-precision choice as an exact multiple-choice knapsack (pure: numpy and scipy, no torch.fx).

Each layer ``l`` takes exactly one option ``o`` (a format, group size, ...). Taking it adds
``objective[l, o]`` (a sensitivity: the error it adds) and ``costs[k][l, o]`` to every budget
``k`` (bytes, bits averaged over the weights, estimated latency). The problem

    minimise    Σ_lo objective[l, o] · x[l, o]
    subject to  Σ_o x[l, o] = 1                       for every layer l
                Σ_lo costs[k][l, o] · x[l, o] ≤ limit[k]   for every budget k
                x[l, o] = x[m, o]                      for layers l, m of one tied group
                x[l, o] ∈ {0, 1}

is solved exactly as an integer program by HiGHS (``scipy.optimize.milp``, relative gap 0). Tied
groups (Q/K/V, gate/up: layers that fusion merges) are collapsed into one variable set whose
objective and costs are the sums over the group, which is the same problem with fewer variables.
An option that a layer cannot take has ``inf`` objective (or cost) there. The same function
minimises bytes under an error bound (swap the roles): ``quality=`` compiles use it that way.

:func:`brute_force` enumerates every assignment (tests check the solver against it).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

FEASIBILITY_RTOL = 1e-7
"""A budget counts as met up to this fraction of its limit (HiGHS' primal feasibility tolerance
on rows scaled to limit 1); :func:`brute_force` uses the same rule."""

OBJECTIVE_SCALE = 1e4
"""The objective is shifted (each group's best option to 0) and scaled so that the widest group
spans this much: HiGHS' absolute MIP gap (1e-6) is then far below any difference that matters."""


class InfeasibleBudgetError(ValueError):
    """No assignment meets the budgets. ``smallest``: for each budget, the smallest limit that is
    feasible with the other budgets as given (``None`` where the others alone are infeasible)."""

    def __init__(self, message: str, smallest: dict[str, float | None]):
        super().__init__(message)
        self.smallest = smallest


@dataclass(frozen=True)
class Solution:
    """One option index per layer (``choice``), the objective it reaches and every budget's total."""

    choice: tuple[int, ...]
    objective: float
    totals: dict[str, float]


def _check(objective: np.ndarray, costs: Mapping[str, np.ndarray], groups: Sequence[Sequence[int]]) -> np.ndarray:
    obj = np.asarray(objective, dtype=float)
    if obj.ndim != 2 or obj.size == 0:
        raise ValueError(f"objective must be a non-empty [layers, options] matrix, got shape {obj.shape}")
    for name, c in costs.items():
        if np.shape(c) != obj.shape:
            raise ValueError(f"budget {name!r}: cost matrix has shape {np.shape(c)}, the objective {obj.shape}")
    if np.isnan(obj).any():
        raise ValueError("objective contains NaN (use inf for an option a layer cannot take)")
    seen: set[int] = set()
    for g in groups:
        for layer in g:
            if not 0 <= layer < obj.shape[0]:
                raise ValueError(f"tied group {list(g)} names layer {layer}, but there are {obj.shape[0]} layers")
            if layer in seen:
                raise ValueError(f"layer {layer} is in more than one tied group")
            seen.add(layer)
    return obj


def _collapse(obj: np.ndarray, costs: Mapping[str, np.ndarray], groups: Sequence[Sequence[int]]
              ) -> tuple[list[list[int]], np.ndarray, dict[str, np.ndarray]]:
    """Tied groups as single rows (sums); untied layers are groups of one."""
    in_group = {layer for g in groups for layer in g}
    units = [list(g) for g in groups if len(g)] + [[layer] for layer in range(obj.shape[0]) if layer not in in_group]
    units.sort(key=min)
    g_obj = np.stack([obj[u].sum(0) for u in units])
    g_costs = {k: np.stack([np.asarray(c, dtype=float)[u].sum(0) for u in units]) for k, c in costs.items()}
    return units, g_obj, g_costs


def _milp(obj: np.ndarray, costs: dict[str, np.ndarray], limits: Mapping[str, float]) -> np.ndarray | None:
    """The exact ILP on collapsed rows: option index per row, or ``None`` when infeasible."""
    try:
        from scipy.optimize import LinearConstraint, milp
        from scipy.sparse import coo_matrix
    except ImportError as e:
        raise ImportError(f"mixed precision solves its knapsack with scipy.optimize.milp (HiGHS), and scipy "
                          f"cannot be imported ({e}): pip install 'scipy>=1.11'") from e

    n, m = obj.shape
    allowed = np.isfinite(obj)
    for c in costs.values():
        allowed &= np.isfinite(c)
    if not allowed.any(axis=1).all():
        return None
    rows, cols = np.nonzero(allowed)
    nvar = len(rows)
    base = np.where(allowed, obj, np.inf).min(axis=1)
    shifted = obj[rows, cols] - base[rows]
    span = shifted.max() if nvar and shifted.max() > 0 else 1.0
    c_vec = shifted * (OBJECTIVE_SCALE / span)
    cons = [LinearConstraint(coo_matrix((np.ones(nvar), (rows, np.arange(nvar))), shape=(n, nvar)).tocsr(), 1, 1)]
    for name, cm in costs.items():
        limit = float(limits[name])
        if limit == math.inf:
            continue
        coef = cm[rows, cols]
        scale = max(abs(limit), float(np.abs(coef).max()) if nvar else 1.0, 1e-300)
        cons.append(LinearConstraint((coef / scale)[None, :], -np.inf, limit / scale))
    res = milp(c_vec, integrality=np.ones(nvar), bounds=(0, 1), constraints=cons,
               options={"mip_rel_gap": 0.0, "presolve": True})
    if res.status == 2:  # infeasible
        return None
    if res.x is None:
        raise RuntimeError(f"HiGHS did not solve the mixed-precision problem: {res.message}")
    picked = res.x > 0.5
    choice = np.full(n, -1)
    choice[rows[picked]] = cols[picked]
    if (choice < 0).any():
        raise RuntimeError("HiGHS returned an assignment that leaves a layer without an option")
    return choice


def _expand(units: list[list[int]], unit_choice: Sequence[int], n_layers: int) -> tuple[int, ...]:
    out = [0] * n_layers
    for u, o in zip(units, unit_choice):
        for layer in u:
            out[layer] = int(o)
    return tuple(out)


def _solution(choice: tuple[int, ...], obj: np.ndarray, costs: Mapping[str, np.ndarray]) -> Solution:
    idx = np.arange(len(choice)), np.asarray(choice)
    return Solution(choice, float(obj[idx].sum()),
                    {k: float(np.asarray(c, dtype=float)[idx].sum()) for k, c in costs.items()})


def cheapest(costs: Mapping[str, np.ndarray], name: str, limits: Mapping[str, float],
             groups: Sequence[Sequence[int]] = ()) -> float | None:
    """The smallest total of budget ``name`` that any assignment meeting the *other* budgets
    reaches (``None``: the other budgets alone are infeasible). This is the number an infeasible
    budget's error states."""
    others = {k: v for k, v in costs.items() if k != name}
    target = np.asarray(costs[name], dtype=float)
    try:
        sol = solve(target, others, {k: limits[k] for k in others}, groups)
    except InfeasibleBudgetError:
        return None
    idx = np.arange(len(sol.choice)), np.asarray(sol.choice)
    return float(target[idx].sum())


def solve(objective: np.ndarray, costs: Mapping[str, np.ndarray] | None = None,
          limits: Mapping[str, float] | None = None, groups: Sequence[Sequence[int]] = ()) -> Solution:
    """The assignment (one option per layer) of least total ``objective`` whose totals meet every
    ``limits[k]`` for ``costs[k]`` (all ``[layers, options]``), tied ``groups`` taking one option
    index together. Exact (HiGHS, gap 0). Raises :class:`InfeasibleBudgetError` naming, for each
    budget, the smallest feasible limit."""
    costs = dict(costs or {})
    limits = dict(limits or {})
    if set(costs) != set(limits):
        raise ValueError(f"budgets with costs {sorted(costs)} but limits {sorted(limits)}")
    obj = _check(objective, costs, groups)
    units, g_obj, g_costs = _collapse(obj, costs, groups)
    unit_choice = _milp(g_obj, g_costs, limits)
    if unit_choice is None:
        if not np.isfinite(g_obj).any(axis=1).all():
            bad = [units[i] for i in np.nonzero(~np.isfinite(g_obj).any(axis=1))[0]]
            raise InfeasibleBudgetError(f"layers {bad[:5]} have no option they can take", {})
        smallest = {k: cheapest(costs, k, limits, groups) for k in costs}
        parts = []
        for k, s in smallest.items():
            if s is None:
                parts.append(f"{k} ≤ {limits[k]:.6g}: infeasible whatever its value, given the other budgets")
            elif s > limits[k] * (1 + FEASIBILITY_RTOL):
                parts.append(f"{k} ≤ {limits[k]:.6g} is below the smallest feasible {k}, {s:.6g}")
            else:
                parts.append(f"{k} ≤ {limits[k]:.6g} is feasible alone (smallest {s:.6g})")
        raise InfeasibleBudgetError("no assignment meets the budgets: " + "; ".join(parts), smallest)
    return _solution(_expand(units, unit_choice, obj.shape[0]), obj, costs)


def brute_force(objective: np.ndarray, costs: Mapping[str, np.ndarray] | None = None,
                limits: Mapping[str, float] | None = None, groups: Sequence[Sequence[int]] = ()) -> Solution | None:
    """Every assignment enumerated (tests only: options ** layers of them); ``None`` when none is
    feasible. Same rules as :func:`solve`."""
    costs = dict(costs or {})
    limits = dict(limits or {})
    obj = _check(objective, costs, groups)
    units, g_obj, g_costs = _collapse(obj, costs, groups)
    best: tuple[float, tuple[int, ...]] | None = None
    for combo in itertools.product(range(obj.shape[1]), repeat=len(units)):
        idx = np.arange(len(units)), np.asarray(combo)
        value = float(g_obj[idx].sum())
        if not math.isfinite(value):
            continue
        totals = {k: float(c[idx].sum()) for k, c in g_costs.items()}
        if any(not math.isfinite(t) or t > limits[k] + FEASIBILITY_RTOL * abs(limits[k]) for k, t in totals.items()):
            continue
        if best is None or value < best[0]:
            best = (value, combo)
    if best is None:
        return None
    return _solution(_expand(units, best[1], obj.shape[0]), obj, costs)


def pareto_front(objective: np.ndarray, cost: np.ndarray, groups: Sequence[Sequence[int]] = (),
                 points: int = 12, name: str = "bytes") -> list[tuple[float, float]]:
    """``(total cost, least objective)`` at ``points`` limits evenly spaced from the cheapest
    assignment to the cost of the least-objective one (beyond it nothing improves): the
    error–size trade-off curve the report plots, each point exact."""
    cost = np.asarray(cost, dtype=float)
    lo = solve(cost, {}, {}, groups).objective
    hi = solve(objective, {name: cost}, {name: math.inf}, groups).totals[name]
    out: list[tuple[float, float]] = []
    for limit in np.linspace(lo, hi, max(points, 2)):
        sol = solve(objective, {name: cost}, {name: float(limit) * (1 + FEASIBILITY_RTOL)}, groups)
        if not out or sol.totals[name] != out[-1][0]:
            out.append((sol.totals[name], sol.objective))
    return out
