"""assign_quant_specs: the recipe and the user's overrides become a decision on every weight layer."""

from __future__ import annotations

import fnmatch
import warnings

from torch import fx

from qcompile.ir.annotations import LayerDecision, decision_of, set_decision
from qcompile.ir.graph import (
    FLOAT_REASON,
    float_layer_nodes,
    linear_nodes,
    linear_weight,
    module_path,
)
from qcompile.passes.base import OnLoad, Pass, PassContext, PassResult, register_pass

LOOKED_FOR = "nn.Linear, GPT-2's Conv1D, Conv1d/Conv2d with groups = 1"
"""What the compiler quantizes (after canonicalization: every ``aten.linear`` with a weight attribute)."""

SHOWN_PATHS = 5
"""Layer paths a warning lists as examples."""


@register_pass("assign_quant_specs")
class AssignQuantSpecs(Pass):
    """Write a ``LayerDecision`` (``qcompile.ir.annotations``) on every linear.

    Rules, per linear, by its module path: the first override whose glob matches decides (a spec,
    or ``None`` to keep it float); else an exclude pattern of the recipe keeps it float (the LM
    head and embeddings by default); else the recipe's weight and activation specs. A decision a
    pass already wrote is kept (a pipeline may decide some layers earlier). Weight layers
    canonicalization could not turn into linears (depthwise convs, ...) get a float decision with
    its reason, so the report lists them. Nothing silent: an override pattern that matches no
    quantizable layer warns (naming it and real layer paths), and so does a graph in which no layer
    ends up quantized. Changes no computation, so it is exact and needs no verification; at load
    the decisions are restored from the artifact.
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
        counts = {"quantized": 0, "kept_float": 0, "already_decided": 0, "not_quantizable": 0}
        for node in linear_nodes(gm):
            path = module_path(node)
            paths.append(path)
            if decision_of(node) is not None:
                counts["already_decided"] += 1
                continue
            decision = recipe.decision_for(path)
            set_decision(node, decision)
            counts["quantized" if decision.quantized else "kept_float"] += 1
        unsupported = {}
        for node in float_layer_nodes(gm):
            unsupported[module_path(node)] = node.meta[FLOAT_REASON]
            if decision_of(node) is None:
                set_decision(node, LayerDecision(None, source="canonicalize", reason=node.meta[FLOAT_REASON]))
                counts["not_quantizable"] += 1
        unmatched = [(pat, spec) for pat, spec in recipe.overrides if not any(fnmatch.fnmatchcase(p, pat) for p in paths)]
        for pat, spec in unmatched:
            warnings.warn(_unmatched_message(pat, spec, paths, unsupported), stacklevel=2)
        if not any(d is not None and d.quantized for d in map(decision_of, linear_nodes(gm))):
            warnings.warn(_nothing_quantized_message(gm, paths, unsupported), stacklevel=2)
        padded = _padded_k(gm)
        notes = [_padding_message(padded)] if padded else []
        repeated = sorted({p for p in paths if paths.count(p) > 1})
        if repeated:
            notes.append(_repeated_message(repeated, paths))
        return PassResult(False, {**counts, "unmatched_overrides": [pat for pat, _ in unmatched],
                                  "padded_k": {path: [k, kp] for path, (_, k, kp) in padded.items()},
                                  "notes": notes})

    def restore(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        saved = ctx.artifact.decisions()
        by_path = {module_path(n): n for n in [*linear_nodes(gm), *float_layer_nodes(gm)]}
        missing = sorted(set(saved) - set(by_path))
        if missing:
            raise ValueError(f"the model has no layers named {missing[:5]} that the artifact decided")
        for path, decision in saved.items():
            set_decision(by_path[path], decision)
        return PassResult(False, {"restored": len(saved)})


def _padded_k(gm: fx.GraphModule) -> dict[str, tuple[str, int, int]]:
    """Quantized linears whose K is not a whole number of weight groups: the formats library pads
    K with zeros (``QuantizedTensor.padded_k``), which costs storage. ``{path: (spec, K, padded K)}``."""
    out = {}
    for node in linear_nodes(gm):
        decision = decision_of(node)
        if decision is None or not decision.quantized or not decision.weight.group_size:
            continue
        k, group = linear_weight(gm, node).shape[-1], decision.weight.group_size
        if k % group:
            out[module_path(node)] = (decision.weight.short(), k, -(-k // group) * group)
    return out


def _padding_message(padded: dict[str, tuple[str, int, int]]) -> str:
    specs = ", ".join(sorted({spec for spec, _, _ in padded.values()}))
    shown = ", ".join(f"{p!r} {k} → {kp}" for p, (_, k, kp) in list(padded.items())[:SHOWN_PATHS])
    more = f", ... ({len(padded)} layers in all)" if len(padded) > SHOWN_PATHS else ""
    worst = max(kp / k for _, k, kp in padded.values())
    return (f"input size K is not a multiple of the weight group size ({specs}), so K is zero-padded to whole "
            f"groups: {shown}{more}; up to {worst:.2f}× the codes and scales. A group size dividing K (an "
            "override such as 'int4-g8', or 'int8') avoids it; a convolution's K is C_in·kh·kw")


def _shown(paths: list[str]) -> str:
    more = f", ... ({len(paths)} in all)" if len(paths) > SHOWN_PATHS else ""
    return ", ".join(repr(p) + " (the root module)" * (p == "") for p in paths[:SHOWN_PATHS]) + more


def _unmatched_message(pattern: str, spec: object, paths: list[str], unsupported: dict[str, str]) -> str:
    hits = [p for p in unsupported if fnmatch.fnmatchcase(p, pattern)]
    if hits:
        if spec is None:
            return f"override {pattern!r} matches only layers that stay float anyway: {_shown(hits)}"
        return (f"override {pattern!r} matches no quantizable layer, only layers that cannot be quantized: "
                + "; ".join(f"{p!r} ({unsupported[p]})" for p in hits[:SHOWN_PATHS]))
    if not paths:
        return f"override {pattern!r} matches nothing: the model has no quantizable layer ({LOOKED_FOR})"
    return f"override {pattern!r} matches no layer; the quantizable layers are {_shown(paths)}"


def _model_name(gm: fx.GraphModule) -> str:
    """The traced model's class, from torch.export's module stack (its first entry is the root)."""
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            return next(iter(stack.values()))[1].rsplit(".", 1)[-1]
    return "the model"


def _nothing_quantized_message(gm: fx.GraphModule, paths: list[str], unsupported: dict[str, str]) -> str:
    name = _model_name(gm)
    if paths:
        what = f"every linear layer is kept float by the recipe's excludes or the overrides ({_shown(paths)})"
    else:
        what = f"it has no quantizable layer (looked for {LOOKED_FOR})"
    if unsupported:
        what += "; left float: " + "; ".join(f"{p!r}: {r}" for p, r in list(unsupported.items())[:SHOWN_PATHS])
    return f"{name}: nothing to quantize, the compiled model is the float model: {what}"


def _repeated_message(repeated: list[str], paths: list[str]) -> str:
    shown = ", ".join(f"{p} ({paths.count(p)} calls)" for p in repeated[:5]) + (", …" if len(repeated) > 5 else "")
    return (f"layers called more than once in forward: {shown}; each call is quantized on its own (its weight is "
            f"stored once per call), and such a compiled model cannot be saved yet")
