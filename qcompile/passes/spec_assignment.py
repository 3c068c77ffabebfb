"""assign_quant_specs: the recipe and the user's overrides become a decision on every linear."""

from __future__ import annotations

import fnmatch
import warnings

from torch import fx

from qcompile.ir.annotations import decision_of, set_decision
from qcompile.ir.graph import linear_nodes, module_path
from qcompile.passes.base import OnLoad, Pass, PassContext, PassResult, register_pass


@register_pass("assign_quant_specs")
class AssignQuantSpecs(Pass):
    """Write a ``LayerDecision`` (``qcompile.ir.annotations``) on every linear.

    Rules, per linear, by its module path: the first override whose glob matches decides (a spec,
    or ``None`` to keep it float); else an exclude pattern of the recipe keeps it float (the LM
    head and embeddings by default); else the recipe's weight and activation specs. A decision a
    pass already wrote is kept (a pipeline may decide some layers earlier). An override pattern
    that matches no linear is a warning naming it. Changes no computation, so it is exact and
    needs no verification; at load the decisions are restored from the artifact.
    """

    exact = True
    requires = ("canonical",)
    ensures = ("quant_decisions",)
    fills_in = True
    on_load = OnLoad.RESTORE

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        recipe = ctx.recipe
        if recipe is None:
            raise ValueError("assign_quant_specs needs a recipe in the pass context")
        paths = []
        counts = {"quantized": 0, "kept_float": 0, "already_decided": 0}
        for node in linear_nodes(gm):
            path = module_path(node)
            paths.append(path)
            if decision_of(node) is not None:
                counts["already_decided"] += 1
                continue
            decision = recipe.decision_for(path)
            set_decision(node, decision)
            counts["quantized" if decision.quantized else "kept_float"] += 1
        unmatched = [pat for pat, _ in recipe.overrides if not any(fnmatch.fnmatchcase(p, pat) for p in paths)]
        for pat in unmatched:
            warnings.warn(f"override {pat!r} matches no linear layer (module paths look like "
                          f"{paths[0] if paths else '<no linears>'!r})", stacklevel=2)
        return PassResult(False, {**counts, "unmatched_overrides": unmatched})

    def restore(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        saved = ctx.artifact.decisions()
        by_path = {module_path(n): n for n in linear_nodes(gm)}
        missing = sorted(set(saved) - set(by_path))
        if missing:
            raise ValueError(f"the model has no linear layers named {missing[:5]} that the artifact decided")
        for path, decision in saved.items():
            set_decision(by_path[path], decision)
        return PassResult(False, {"restored": len(saved)})

