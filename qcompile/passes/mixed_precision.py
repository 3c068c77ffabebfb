"""mixed_precision: choose each layer's option under a budget or a quality floor, exactly.

The pass measures every candidate option's sensitivity on every layer (``sensitivity.py``),
its bytes and estimated time (``mixed_precision_cost.py``), and solves the multiple-choice
knapsack exactly (``mixed_precision_math.py``, HiGHS); then it rewrites the layers' decisions.
docs/mixed-precision.md has the formulation, the proxies' measured correlations and the sources
of the cost model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from torch import fx

from qcompile.ir.annotations import decision_of, set_decision
from qcompile.ir.graph import get_attr, linear_nodes, module_path
from qcompile.passes.base import OnLoad, Pass, PassContext, PassResult, register_pass
from qcompile.passes.mixed_precision_cost import PREFILL_TOKENS, option_bytes, option_seconds
from qcompile.passes.mixed_precision_math import (
    InfeasibleBudgetError,
    Solution,
    pareto_front,
    solve,
)
from qcompile.passes.mixed_precision_options import PrecisionOption, candidate_options, parse_option
from qcompile.passes.sensitivity import (
    PROXIES,
    OutputProbe,
    Product,
    measure_sensitivity,
    proxy_correlations,
)

BUDGET_KEYS = {
    "bits": "average stored bits per weight over the layers mixed precision decides (scales and zero points "
            "included, 16 for a 16-bit layer)",
    "bytes": "stored bytes of those layers' weights",
    "latency_ms": "estimated milliseconds of those layers' GEMMs per decode step (1 token), on the target",
    "prefill_latency_ms": "estimated milliseconds of those layers' GEMMs per prefill call (prefill_tokens tokens)",
}
"""Budget keys and what each bounds (several keys: several constraints at once)."""

QUALITY_KEYS = {"cosine": "the model output's cosine to float on the calibration set (first floating output)"}
"""Quality keys and what each sets a floor on."""

MAX_ITERATIONS = 8
"""Solve–verify rounds of a ``quality=`` compile."""
FRONT_POINTS = 12
"""Points of the error–size Pareto front the report plots."""


class MixedPrecisionError(ValueError):
    """A budget or quality floor that cannot be met, or that names something unknown; the message
    gives the number asked and what is feasible."""


def _check_mapping(value: Mapping[str, Any] | None, keys: Mapping[str, str], what: str) -> dict[str, float]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not value:
        raise MixedPrecisionError(f"{what} must be a non-empty dict like {{{next(iter(keys))!r}: ...}}, got {value!r}")
    out = {}
    for k, v in value.items():
        if k not in keys:
            raise MixedPrecisionError(f"unknown {what} key {k!r} (= {v!r}); valid keys: "
                                      + "; ".join(f"{n!r}: {d}" for n, d in keys.items()))
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise MixedPrecisionError(f"{what} {k!r} must be a positive finite number, got {v!r}")
        out[k] = float(v)
    return out


def tie_groups(nodes: Sequence[fx.Node]) -> list[list[int]]:
    """Indices of layers that read the same input node (Q/K/V, gate/up): fusion merges them into
    one GEMM, so they must take one option."""
    by_input: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        if isinstance(n.args[0], fx.Node):
            by_input.setdefault(n.args[0].name, []).append(i)
    return [g for g in by_input.values() if len(g) > 1]


@register_pass("mixed_precision")
class MixedPrecision(Pass):
    """Rewrite the quantized layers' decisions so the model meets ``budget`` with the least
    predicted error, or meets ``quality`` with the fewest bytes.

    Rules:

    - Layers: every linear whose decision is quantized when the pass runs (recipe excludes and
      ``None`` overrides stay float and outside the budget). A layer an override gave a spec keeps
      it: its bytes and time count in the budget, its sensitivity is not measured, and the
      end-to-end checks include its quantization. Layers reading the same input
      (Q/K/V, gate/up) are tied: one option for the group (``tie=False`` unties them).
    - Options: ``candidates`` (spec strings, ``None``/``"16-bit"``, dicts with ``weight``,
      ``activation``, ``method``, ``extras``; ``mixed_precision_options.DEFAULT_WEIGHTS`` by
      default), each with the recipe's activation spec unless it names one; an option's method
      must be the pipeline's quantizer's.
    - Sensitivity: ``proxy`` (``model``, ``layer`` or ``hessian``, ``sensitivity.py``) measured
      with the pipeline's quantizer on the calibration set.
    - Cost: bytes from the formats library, time from the target's roofline with measured kernel
      efficiencies (``mixed_precision_cost.py``); ``budget`` keys are :data:`BUDGET_KEYS`.
    - ``budget``: minimise the summed proxy subject to every budget (exact ILP, HiGHS).
      ``quality={"cosine": c}``: minimise bytes subject to the summed proxy ≤ ``2(1 − c)``
      (and any budget), verify the choice end to end on the calibration set, tighten when the
      proxy was optimistic and loosen when it was pessimistic (bisection between the two), up to
      :data:`MAX_ITERATIONS` rounds; the smallest verified choice wins and the rounds are reported.
    - ``proxy_batches``: the model proxy, the quality rounds, the measured output error and the
      correlations run on the first that many calibration batches (each sensitivity is one forward
      of them); the Hessians and the quantizer still see every batch. Default: all.
    - ``cache``: a dict shared between compiles: a sensitivity table measured for the same
      weights, options, quantizer and calibration batches (a SHA-256 of them) is reused, so
      re-solving for another budget or floor does not re-measure.
    - Errors (:class:`MixedPrecisionError`) name the number and what is feasible: a budget below
      the smallest model, a floor above what the best option per layer (16-bit) reaches, an
      unknown key.
    - Writes: each layer's ``LayerDecision`` gets the option's specs and extras plus
      ``extras["mixed_precision"]`` (option, bits, bytes, predicted error), ``source
      "mixed_precision"``. Runs after the exact rewrites and AWQ's scaling, before clipping and
      the quantizers. Changes no computation itself. At load it is skipped: the decisions (with
      their extras) are restored by ``assign_quant_specs`` and the weights by the quantizer.
    """

    exact = True
    uses_calibration = True
    requires = ("quant_decisions",)
    runs_after = ("assign_quant_specs", "fold_norm_scales", "rotate_residual", "rotate_online", "rotate_heads",
                  "smooth_quant", "os_shift", "awq")
    runs_before = ("awq_clip", "quantize_weights", "gptq", "clip_search", "lower")
    on_load = OnLoad.SKIP

    def __init__(self, budget: Mapping[str, float] | None = None, quality: Mapping[str, float] | None = None,
                 candidates: Sequence[Any] | None = None, proxy: str = "model", tie: bool = True,
                 prefill_tokens: int = PREFILL_TOKENS, quantizer: str | None = None,
                 correlation_assignments: int = 0, max_iterations: int = MAX_ITERATIONS,
                 cache: dict | None = None, proxy_batches: int | None = None):
        self.budget = _check_mapping(budget, BUDGET_KEYS, "budget")
        self.quality = _check_mapping(quality, QUALITY_KEYS, "quality")
        if not self.budget and not self.quality:
            raise MixedPrecisionError("mixed_precision needs a budget= (keys: " + ", ".join(BUDGET_KEYS)
                                      + ") or a quality= (keys: " + ", ".join(QUALITY_KEYS) + ")")
        if "cosine" in self.quality and self.quality["cosine"] > 1.0:
            raise MixedPrecisionError(f"quality cosine {self.quality['cosine']} is above what 16-bit (the float "
                                      "model itself) achieves: 1.0")
        if proxy not in PROXIES:
            raise MixedPrecisionError(f"unknown sensitivity proxy {proxy!r}; valid: {', '.join(PROXIES)}")
        self.candidates = None if candidates is None else [c.to_dict() if isinstance(c, PrecisionOption) else c
                                                           for c in candidates]
        for c in self.candidates or ():
            parse_option(c)  # fail at construction, naming the candidate
        self.proxy, self.tie, self.prefill_tokens = proxy, bool(tie), int(prefill_tokens)
        self.quantizer = quantizer
        self.quantizer_pass: Pass | None = None
        """The pipeline's quantizer instance (``compile`` sets it, so its own options measure the
        sensitivities); else one is made from ``quantizer`` or the recipe's passes."""
        self.correlation_assignments = int(correlation_assignments)
        self.max_iterations = int(max_iterations)
        if cache is not None and not isinstance(cache, dict):
            raise MixedPrecisionError(f"mixed_precision cache must be a dict (shared between compiles), got "
                                      f"{type(cache).__name__}")
        self.cache = cache
        if proxy_batches is not None and (isinstance(proxy_batches, bool) or not isinstance(proxy_batches, int)
                                          or proxy_batches < 1):
            raise MixedPrecisionError(f"mixed_precision proxy_batches must be an int >= 1 (the calibration batches "
                                      f"the model proxy and the quality checks run on), got {proxy_batches!r}")
        self.proxy_batches = proxy_batches

    def options(self) -> dict[str, Any]:
        out: dict[str, Any] = {"proxy": self.proxy, "tie": self.tie, "prefill_tokens": self.prefill_tokens}
        if self.budget:
            out["budget"] = dict(self.budget)
        if self.quality:
            out["quality"] = dict(self.quality)
        if self.candidates is not None:
            out["candidates"] = list(self.candidates)
        if self.quantizer is not None:
            out["quantizer"] = self.quantizer
        if self.proxy_batches is not None:
            out["proxy_batches"] = self.proxy_batches
        return out

    def check_candidates(self, activation: Any, method: str, quantizer: str) -> list[PrecisionOption]:
        """The candidate options with ``activation`` and ``method`` filled in; an option naming another
        method than the pipeline's ``quantizer`` is an error naming it (``compile`` checks before tracing)."""
        options = candidate_options(self.candidates, activation, method)
        wrong = [o.name for o in options if o.weight is not None and o.method != method]
        if wrong:
            raise MixedPrecisionError(f"mixed_precision candidates {wrong} name another method than the pipeline's "
                                      f"quantizer ({quantizer}: {method}); the recipe's passes decide the method")
        return options

    def _quantizer(self, ctx: PassContext) -> tuple[Any, str]:
        """The pipeline's weight quantizer (its per-layer hook measures sensitivities) and the method
        label options carry."""
        from qcompile.passes.base import make_pass
        from qcompile.passes.weight_quantization import WeightQuantizer

        if self.quantizer_pass is not None:
            p = self.quantizer_pass
            return p, "awq" if "awq" in ctx.history and p.method == "rtn" else p.method
        names = [self.quantizer] if self.quantizer else list(ctx.recipe.passes)
        for name in names:
            try:
                p = make_pass(name, **ctx.recipe.pass_options.get(name, {}))
            except ValueError:
                continue
            if isinstance(p, WeightQuantizer):
                method = "awq" if "awq" in ctx.recipe.passes and p.method == "rtn" else p.method
                return p, method
        raise MixedPrecisionError(f"mixed_precision found no weight quantizer among {names}: it measures each "
                                  "option with the pipeline's quantizer (quantize_weights, gptq, clip_search)")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        start = time.perf_counter()
        quantized = [n for n in linear_nodes(gm) if (d := decision_of(n)) is not None and d.quantized]
        fixed = [n for n in quantized if decision_of(n).source.startswith("override")]
        nodes = [n for n in quantized if n not in fixed]
        if not nodes:
            return PassResult(False, {"layers": 0, "notes": ["mixed_precision: no quantized layer to decide"
                                                             + (" (overrides decide them all)" if fixed else "")]})
        quantizer, method = self._quantizer(ctx)
        options = self.check_candidates(decision_of(nodes[0]).activation, method, quantizer.name)
        shapes = [get_attr_shape(n) for n in nodes]
        weights = float(sum(n * k for n, k in shapes) + sum(a * b for a, b in map(get_attr_shape, fixed)))
        groups = tie_groups(nodes) if self.tie else []
        costs = self._costs(options, shapes, ctx, weights)
        missing = [k for k in self.budget if k not in costs]
        if missing:
            raise MixedPrecisionError(f"budget {missing} needs a target with a cost model (none in the pass context)")
        # Layers an override decided keep their spec; their costs are one more row, the same in every column.
        fixed_costs = self._costs_of_decisions(fixed, method, ctx, weights)
        costs_all = {k: _with_row(c, fixed_costs[k]) if fixed else c for k, c in costs.items()}
        # Infeasible budgets fail before anything is measured (the costs are known already).
        self._solve(np.zeros_like(costs_all["bytes"]), {k: costs_all[k] for k in self.budget}, dict(self.budget),
                    groups, len(nodes), weights)
        # The chosen proxy, the layer proxy for the report, and every proxy when correlations are asked.
        proxies = list(PROXIES) if self.correlation_assignments else sorted({self.proxy, "layer"}, key=PROXIES.index)
        need_hessian = quantizer.needs_hessian or "hessian" in proxies
        stats = ctx.activation_stats(gm, [*nodes, *fixed], hessian=need_hessian)
        probe = OutputProbe(gm, ctx.calibration, self.proxy_batches)
        key = _fingerprint(gm, nodes, options, quantizer, ctx, self.proxy_batches) if self.cache is not None else None
        table = self.cache.get(key) if key is not None else None
        cached = table is not None and set(proxies) <= set(table.proxies)
        if not cached:
            if ctx.progress is not None:
                ctx.progress.start_layers(f"mixed precision: sensitivity of {len(options)} options", len(nodes))
            table = measure_sensitivity(gm, nodes, options, stats, probe,
                                        lambda w, d, s: quantizer.quantize_weight(w, d, s), proxies, ctx.progress)
            if key is not None:
                self.cache[key] = table
        sens = table.proxy(self.proxy)
        sens_all = _with_row(sens, 0.0) if fixed else sens
        node_names = [n.name for n in nodes]
        fixed_products = {n.name: Product(quantizer.quantize_weight(
            get_attr(gm, n.args[1].target).detach().float(), decision_of(n), stats.get(n.name)),
            decision_of(n).activation) for n in fixed}

        def products_of(choice: Sequence[int]) -> dict[str, Product]:
            return {**fixed_products, **table.assignment_products(choice[:len(nodes)], node_names)}

        limits = dict(self.budget)
        iterations: list[dict[str, Any]] = []
        if self.quality:
            sol = self._quality_search(sens_all, costs_all, limits, groups, products_of, probe, iterations, weights)
        else:
            sol = self._solve(sens_all, {k: costs_all[k] for k in limits}, limits, groups, len(nodes), weights)
        measured_error, measured_cosine = probe.measure(products_of(sol.choice))
        choice = sol.choice[:len(nodes)]
        self._write(nodes, options, choice, costs, sens, table)
        stats_out = self._stats(nodes, options, sol, costs_all, sens_all, groups, measured_error, measured_cosine,
                                iterations, method, weights)
        if fixed:
            stats_out["fixed_by_overrides"] = {module_path(n): decision_of(n).weight.short() for n in fixed}
            stats_out["notes"].append(f"mixed precision keeps the {len(fixed)} layers an override decided as the "
                                      "override says (their bytes count in the budget; their sensitivities are not "
                                      "measured): " + ", ".join(module_path(n) for n in fixed[:5])
                                      + (", ..." if len(fixed) > 5 else ""))
        if self.correlation_assignments:
            stats_out["correlations"] = [c.to_dict() for c in proxy_correlations(
                table, node_names, probe, self.correlation_assignments)]
        stats_out["seconds"] = {"sensitivity": 0.0 if cached else round(table.seconds, 3),
                                "total": round(time.perf_counter() - start, 3)}
        stats_out["sensitivity_cached"] = cached
        stats_out["forwards"] = probe.runs
        stats_out["proxy_batches"] = len(probe.batches)
        if probe.suffix_runs:
            stats_out["prefix_reused"] = {"forwards": probe.suffix_runs,
                                          "mean_nodes_rerun": round(probe.rerun_fraction / probe.suffix_runs, 4)}
        return PassResult(False, stats_out)

    def _costs(self, options: list[PrecisionOption], shapes: list[tuple[int, int]], ctx: PassContext,
               weights: float) -> dict[str, np.ndarray]:
        """``[layers, options]`` cost matrices by budget key (``bits`` over ``weights`` weights)."""
        nbytes = np.array([[option_bytes(o, n, k) for o in options] for n, k in shapes], dtype=float)
        out = {"bytes": nbytes, "bits": 8.0 * nbytes / weights}
        if ctx.target is not None:
            for key, tokens in (("latency_ms", 1), ("prefill_latency_ms", self.prefill_tokens)):
                out[key] = 1e3 * np.array([[option_seconds(o, n, k, ctx.target, tokens) for o in options]
                                           for n, k in shapes])
        return out

    def _costs_of_decisions(self, nodes: list[fx.Node], method: str, ctx: PassContext,
                            weights: float) -> dict[str, float]:
        """Summed costs of layers whose decisions stay as they are, by budget key."""
        if not nodes:
            return {}
        options = [PrecisionOption(decision_of(n).weight, decision_of(n).activation, method) for n in nodes]
        totals: dict[str, float] = {}
        for option, node in zip(options, nodes):
            for key, m in self._costs([option], [get_attr_shape(node)], ctx, weights).items():
                totals[key] = totals.get(key, 0.0) + float(m[0, 0])
        return totals

    def _solve(self, objective: np.ndarray, costs: dict[str, np.ndarray], limits: dict[str, float],
               groups: list[list[int]], n_layers: int, weights: float) -> Solution:
        try:
            return solve(objective, costs, limits, groups)
        except InfeasibleBudgetError as e:
            raise MixedPrecisionError(
                f"mixed_precision: budget {dict(self.budget)} over {n_layers} layers ({int(weights):,} weights) cannot "
                f"be met: {e}") from None

    def _quality_search(self, sens: np.ndarray, costs: dict[str, np.ndarray], limits: dict[str, float],
                        groups: list[list[int]], products_of: Any, probe: OutputProbe,
                        iterations: list[dict[str, Any]], weights: float) -> Solution:
        floor = self.quality["cosine"]
        budget_costs = {k: costs[k] for k in limits}
        # The least predicted error the options reach (within the budgets, if any): the fallback.
        best = self._solve(sens, budget_costs, limits, groups, sens.shape[0], weights)
        _, best_cos = probe.measure(products_of(best.choice))
        if best_cos < floor:
            within = f" within budget {dict(self.budget)}" if self.budget else ""
            raise MixedPrecisionError(
                f"quality cosine {floor} is above what the best option per layer reaches{within} on the calibration "
                f"set: {best_cos:.6f} (add '16-bit' to the candidates, raise the budget, or lower the floor)")
        allowed = max(2.0 * (1.0 - floor), best.objective)
        ok: tuple[float, Solution] | None = None
        fail: float | None = None
        seen: dict[tuple[int, ...], float] = {}
        for _ in range(self.max_iterations):
            allowed = max(allowed, best.objective)  # never below the least error the options reach
            try:
                sol = solve(costs["bytes"], {**budget_costs, "error": sens},
                            {**limits, "error": max(allowed, 0.0)}, groups)
            except InfeasibleBudgetError as e:
                raise MixedPrecisionError(f"mixed_precision: quality {dict(self.quality)} with budget "
                                          f"{dict(self.budget)} cannot be met: {e}") from None
            if sol.choice in seen:
                cos = seen[sol.choice]
            else:
                cos = probe.measure(products_of(sol.choice))[1]
                seen[sol.choice] = cos
            met = cos >= floor
            iterations.append({"error_bound": allowed, "predicted_error": float(sens[range(len(sol.choice)),
                                                                                   list(sol.choice)].sum()),
                               "bytes": sol.objective, "bits": float(costs["bits"][range(len(sol.choice)),
                                                                                   list(sol.choice)].sum()),
                               "measured_cosine": cos, "meets_floor": met})
            if met and (ok is None or sol.objective < ok[1].objective):
                ok = (allowed, sol)
            if met:
                lower = allowed
                if fail is None:
                    factor = min((1.0 - floor) / max(1.0 - cos, 1e-12), 4.0)
                    if factor < 1.02:
                        break
                    allowed *= factor
                else:
                    if fail / lower < 1.02:
                        break
                    allowed = math.sqrt(lower * fail)
            else:
                fail = allowed if fail is None else min(fail, allowed)
                if ok is None:
                    allowed *= min(max((1.0 - floor) / max(1.0 - cos, 1e-12), 0.05), 0.95)
                else:
                    if fail / ok[0] < 1.02:
                        break
                    allowed = math.sqrt(ok[0] * fail)
        if ok is None:
            iterations.append({"note": f"no solve met the floor in {self.max_iterations} rounds: the best option "
                                       f"per layer is used (cosine {best_cos:.6f})"})
            return best
        return ok[1]

    def _write(self, nodes: list[fx.Node], options: list[PrecisionOption], choice: Sequence[int],
               costs: dict[str, np.ndarray], sens: np.ndarray, table: Any) -> None:
        for i, (node, o) in enumerate(zip(nodes, choice)):
            option = options[o]
            old = decision_of(node)
            n, k = get_attr_shape(node)
            record = {"option": option.name, "bits": round(8.0 * costs["bytes"][i, o] / (n * k), 4),
                      "bytes": int(costs["bytes"][i, o]), "predicted_error": float(sens[i, o]),
                      "predicted_layer_error": float(math.sqrt(table.proxies["layer"][i, o]))
                      if "layer" in table.proxies else None, "proxy": self.proxy}
            extras = {**old.extras, **option.extras, "mixed_precision": record}
            if option.weight is None:
                new = old.replace(weight=None, activation=None, extras=extras, source="mixed_precision",
                                  reason="mixed precision keeps it 16-bit")
            else:
                new = old.replace(weight=option.weight, activation=option.activation, extras=extras,
                                  source="mixed_precision")
            set_decision(node, new)

    def _stats(self, nodes: list[fx.Node], options: list[PrecisionOption], sol: Solution,
               costs: dict[str, np.ndarray], sens: np.ndarray, groups: list[list[int]],
               measured_error: float, measured_cosine: float, iterations: list[dict[str, Any]],
               method: str, weights: float) -> dict[str, Any]:
        """The report's record. ``costs`` and ``sens`` include the fixed layers' row, if any (it has
        the same value in every column, so column sums and totals count it)."""
        idx = np.arange(len(sol.choice)), np.asarray(sol.choice)
        totals = {k: float(c[idx].sum()) for k, c in costs.items()}
        front = [[8.0 * b / weights, e] for b, e in pareto_front(sens, costs["bytes"], groups, FRONT_POINTS)]
        paths = [module_path(n) for n in nodes]
        choice = sol.choice[:len(nodes)]
        out: dict[str, Any] = {
            "mode": "quality" if self.quality else "budget", "budget": dict(self.budget),
            "quality": dict(self.quality), "proxy": self.proxy, "method": method,
            "options": [o.name for o in options], "layers": len(nodes),
            "ties": [[paths[i] for i in g] for g in groups],
            "choice": {paths[i]: options[o].name for i, o in enumerate(choice)},
            "totals": totals, "predicted_error": float(sens[idx].sum()),
            "measured_error": measured_error, "measured_cosine": measured_cosine,
            "front": front, "chosen": [totals["bits"], float(sens[idx].sum())],
            "uniform": {o.name: [float(costs["bits"][:, j].sum()), float(sens[:, j].sum())]
                        for j, o in enumerate(options)},
        }
        if iterations:
            out["iterations"] = iterations
        padded = [f"{paths[i]} ({options[o].name}: K {k} → {-(-k // g) * g})" for i, o in enumerate(choice)
                  if (spec := options[o].weight) is not None and (g := spec.group_size)
                  and (k := get_attr_shape(nodes[i])[1]) % g]
        summary = ", ".join(f"{k} {v:.4g}" for k, v in totals.items())
        out["notes"] = [f"mixed precision ({out['mode']} {self.budget or self.quality}, proxy {self.proxy}): "
                        f"{summary}; predicted output error {out['predicted_error']:.3g}, measured "
                        f"{measured_error:.3g} (cosine {measured_cosine:.5f}) on the calibration set"
                        + (f"; {len(iterations)} solve–verify rounds" if iterations else "")]
        if padded:
            out["notes"].append(f"after mixed precision, {len(padded)} layers have K zero-padded to whole groups (the "
                                f"bytes above count the padding; a note on the recipe's specs may precede this one): "
                                + ", ".join(padded[:5]) + (", ..." if len(padded) > 5 else ""))
        return out


def _fingerprint(gm: fx.GraphModule, nodes: list[fx.Node], options: list[PrecisionOption], quantizer: Pass,
                 ctx: PassContext, proxy_batches: int | None = None) -> str:
    """What a sensitivity table depends on: the layers' weights, the options, the quantizer and its
    options, the calibration batches and how many of them the model proxy ran on (a cache hit must
    be the same measurement)."""
    import hashlib

    import torch

    h = hashlib.sha256()
    h.update(repr(([module_path(n) for n in nodes], [o.to_dict() for o in options], quantizer.name,
                   quantizer.options(), proxy_batches)).encode())
    for n in nodes:
        h.update(get_attr(gm, n.args[1].target).detach().float().contiguous().numpy().tobytes())
    for args, kwargs in ctx.calibration.batches:
        for leaf in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor):
                h.update(str((leaf.dtype, tuple(leaf.shape))).encode())
                h.update(leaf.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            else:
                h.update(repr(leaf).encode())
    return h.hexdigest()


def _with_row(matrix: np.ndarray, value: float) -> np.ndarray:
    """``matrix`` with one more row holding ``value`` in every column (a constant in every assignment)."""
    return np.vstack([matrix, np.full((1, matrix.shape[1]), value)])


def get_attr_shape(node: fx.Node) -> tuple[int, int]:
    """``(rows, K)`` of a linear node's weight (from its traced value)."""
    val = node.args[1].meta.get("val") if isinstance(node.args[1], fx.Node) else None
    if val is None:
        gm = node.graph.owning_module
        val = get_attr(gm, node.args[1].target)
    return int(val.shape[0]), int(val.shape[1])
