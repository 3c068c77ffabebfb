"""fold_norm_scales: move a norm's affine weight (and bias) into the linears it feeds.

``W · (γ ⊙ n(x) + β) + c = (W·diag(γ)) · n(x) + (W·β + c)``, so when every consumer
of a norm is a linear, the norm can lose its affine part. This is exact, and it is
the first step of rotation folding: a rotation can only pass through a norm that
has no per-channel scale.

Exact is not free: before plain quantizers, folding moves the norm weight's outlier channels
into the consumers' weight groups (on SmolLM2, W4A16 RTN perplexity 41.7 folded vs 29.1 not).
So ``when="if_better"`` folds a norm only where its consumers' quantized output error, measured
on calibration rows with their decisions' specs, does not grow; ``when="always"`` (rotation
recipes) folds every norm it can.
"""

from __future__ import annotations

import torch
from torch import fx

from qcompile.formats import quantize
from qcompile.ir.annotations import decision_of, set_decision
from qcompile.ir.graph import add_get_attr, get_attr, is_linear, linear_bias
from qcompile.ir.ops import LAYER_NORM, NORM_OPS, RMS_NORM
from qcompile.passes.base import Pass, PassContext, PassResult, register_pass

WHEN = ("always", "if_better")


@register_pass("fold_norm_scales")
class FoldNormScales(Pass):
    """Fold each norm's affine part into the linears it feeds.

    Rules: a norm folds when every consumer is a linear reached through row-only ops (so not
    post-norm residuals); ``when="if_better"`` additionally requires that folding does not raise
    the consumers' quantized output error on calibration rows (norms whose consumers have no
    quantized decision fold). Each consumer's decision records the comparison under
    ``extras["fold_norm_scales"]``; where decisions already carry it (restored at load or for a
    re-trace) the recorded choice is applied without measuring. Runs after the decisions, before every quantizer.
    """

    exact = True
    requires = ("canonical",)
    ensures = ("norms_folded",)
    runs_after = ("assign_quant_specs",)
    runs_before = ("quantize_weights", "gptq")

    def __init__(self, when: str = "always"):
        if when not in WHEN:
            raise ValueError(f"fold_norm_scales: when must be one of {', '.join(WHEN)}, got {when!r}")
        self.when = when

    def options(self) -> dict:
        return {"when": self.when}

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        folded, kept, skipped = 0, 0, {}
        candidates = []
        for norm in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in NORM_OPS]:
            reason = _why_not(norm)
            if reason:
                skipped[reason] = skipped.get(reason, 0) + 1
            else:
                candidates.append(norm)
        quantized = {n.name: n for norm in candidates for n in _linear_consumers(norm)
                     if decision_of(n) is not None and decision_of(n).quantized}
        recorded = {name for name, n in quantized.items() if self.name in decision_of(n).extras}
        measure = [n for name, n in quantized.items() if name not in recorded] if self.when == "if_better" else []
        stats = ctx.activation_stats(gm, measure) if measure else {}
        for norm in candidates:
            choice = _recorded_choice(norm, self.name) if self.when == "if_better" else None
            if choice is not None:  # restored decisions (load, re-trace) carry the comparison: never re-measure
                if choice:
                    _fold(gm, norm)
                    folded += 1
                else:
                    kept += 1
                continue
            consumers = [n for n in _linear_consumers(norm) if n.name in stats]
            if consumers:
                e_fold, e_keep = _fold_errors(gm, norm, consumers, stats)
                for lin in consumers:
                    d = decision_of(lin)
                    set_decision(lin, d.replace(extras={**d.extras, self.name: {
                        "folded": e_fold <= e_keep, "error_folded": e_fold, "error_kept": e_keep}}))
                if e_fold > e_keep:
                    kept += 1
                    continue
            _fold(gm, norm)
            folded += 1
        return PassResult(folded > 0, {"folded": folded, "kept_for_accuracy": kept, "skipped": skipped})


def _recorded_choice(norm: fx.Node, key: str) -> bool | None:
    """The fold-or-keep choice its consumers' decisions recorded (all agree: one comparison per norm),
    or None when none recorded one. Load and re-trace restore decisions, and their weights may be
    meta tensors, so the choice is read, not measured again."""
    choices = {bool(decision_of(n).extras[key]["folded"]) for n in _linear_consumers(norm)
               if decision_of(n) is not None and key in decision_of(n).extras}
    if len(choices) > 1:
        raise ValueError(f"fold_norm_scales: the consumers of norm {norm.name} recorded different choices")
    return choices.pop() if choices else None


def _fold_errors(gm: fx.GraphModule, norm: fx.Node, consumers: list[fx.Node], stats: dict) -> tuple[float, float]:
    """Relative quantized output error of ``consumers``, folded and unfolded, on calibration rows."""
    from qcompile.codegen.quantized_linear import reference_quantized_linear

    weight, bias = _affine(norm)
    gamma = get_attr(gm, weight.target).float() if weight is not None else None
    beta = get_attr(gm, bias.target).float() if bias is not None else None
    if gamma is not None and bool((gamma.abs() < 1e-8).any()):
        return 0.0, 0.0  # n(x) cannot be recovered from the consumers' inputs: fold, as always
    err = {"fold": 0.0, "keep": 0.0}
    total = 0.0
    for lin in consumers:
        spec, act = decision_of(lin).weight, decision_of(lin).activation
        x = stats[lin.name].sample.float()
        w = get_attr(gm, lin.args[1].target).float()
        n = x - beta if beta is not None else x
        n = n / gamma if gamma is not None else n
        ref = x @ w.t()
        keep = reference_quantized_linear(x, quantize(w, spec), None, act)
        w_fold = w * gamma if gamma is not None else w
        fold = reference_quantized_linear(n, quantize(w_fold, spec), None, act)
        fold = fold + (w @ beta if beta is not None else 0.0)
        err["keep"] += float((keep - ref).pow(2).sum())
        err["fold"] += float((fold - ref).pow(2).sum())
        total += float(ref.pow(2).sum())
    total = max(total, 1e-30)
    return (err["fold"] / total) ** 0.5, (err["keep"] / total) ** 0.5


def _affine(norm: fx.Node) -> tuple[fx.Node | None, fx.Node | None]:
    if norm.target == RMS_NORM:
        return norm.args[1], None
    return norm.args[1], norm.args[2]


def _why_not(norm: fx.Node) -> str | None:
    weight, bias = _affine(norm)
    if weight is None and bias is None:
        return "no affine parameters"
    if any(not (isinstance(p, fx.Node) and p.op == "get_attr") for p in (weight, bias) if p is not None):
        return "affine parameters computed in the graph"
    if _linear_consumers(norm) is None:
        return "a consumer is not a linear (e.g. a residual)"
    return None


_ROW_OPS = {
    torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default,
    torch.ops.aten.slice.Tensor, torch.ops.aten.select.int, torch.ops.aten.unsqueeze.default,
    torch.ops.aten.clone.default, torch.ops.aten.contiguous.default, torch.ops.aten.alias.default,
}
"""Ops that move or pick whole rows and keep the channel (last) dimension: a
per-channel scale commutes with them (GPT-2 flattens to 2-D, Llama slices the
positions whose logits it keeps)."""


def _keeps_channels(node: fx.Node, channels: int) -> bool:
    if node.op != "call_function" or node.target not in _ROW_OPS:
        return False
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() == 0 or val.shape[-1] != channels:
        return False
    if node.target in (torch.ops.aten.slice.Tensor, torch.ops.aten.select.int):
        src = node.args[0].meta.get("val")
        dim = node.args[1] if len(node.args) > 1 else 0
        return isinstance(src, torch.Tensor) and dim % src.dim() != src.dim() - 1
    return True


def _linear_consumers(norm: fx.Node) -> list[fx.Node] | None:
    """The linears fed by ``norm`` through row-only ops, or None if anything else
    consumes it."""
    val = norm.meta.get("val")
    channels = val.shape[-1] if isinstance(val, torch.Tensor) else None
    linears, frontier = [], [norm]
    while frontier:
        node = frontier.pop()
        if not node.users:
            return None
        for user in node.users:
            if is_linear(user) and user.args[0] is node and user.args[1] is not node:
                linears.append(user)
            elif channels is not None and _keeps_channels(user, channels):
                frontier.append(user)
            else:
                return None
    return linears


def _fold(gm: fx.GraphModule, norm: fx.Node) -> None:
    weight, bias = _affine(norm)
    gamma = get_attr(gm, weight.target).double() if weight is not None else None
    beta = get_attr(gm, bias.target).double() if bias is not None else None
    for lin in _linear_consumers(norm):
        w_node = lin.args[1]
        w = get_attr(gm, w_node.target)
        w64 = w.double()
        new_w = w64 * gamma[None, :] if gamma is not None else w64
        lin.update_arg(1, add_get_attr(gm, w_node.target + "_folded", new_w.to(w.dtype), before=lin))
        if beta is not None:
            c = linear_bias(gm, lin)
            new_c = w64 @ beta + (c.double() if c is not None else 0.0)
            name = w_node.target.rsplit(".", 1)[0] + ".bias_folded"
            new_c_node = add_get_attr(gm, name, new_c.to(w.dtype), before=lin)
            lin.args = (lin.args[0], lin.args[1], new_c_node)
    if norm.target == RMS_NORM:
        norm.update_arg(1, None)
    elif norm.target == LAYER_NORM:
        norm.args = (norm.args[0], None, None, norm.args[3])
    for p in (weight, bias):
        if p is not None and not p.users:
            gm.graph.erase_node(p)
