"""``gptq``: Hessian-based weight quantization, layer after layer (the math is ``gptq_math``).

A :class:`~qcompile.passes.weight_quantization.WeightQuantizer` whose layers are not independent:
each layer's Hessian is captured with the layers before it already quantized, so GPTQ corrects
the error the earlier layers make as well as its own rounding. The quantized linears are grouped
by their input (Q, K and V share one activation, hence one Hessian; gate and up likewise) and
the groups run in graph order:

1. the group's Hessians ``Σ xᵀx`` are captured on the calibration set (``ctx.activation_stats``),
   with the working graph's earlier weights already replaced by their GPTQ weights;
2. every linear of the group is quantized by ``gptq_quantize`` (its result and metrics written
   like any quantizer's; ``decision.extras["gptq"]`` records damping, dead channels and the
   proxy losses of RTN and GPTQ, so the report and the artifact show them);
3. the group's float weights in the working graph (the compiler's copy, never the user's model)
   become the dequantized GPTQ weights, and ``ctx.graph_version`` is bumped, so that the next
   capture sees them.

Nothing is restored afterwards: lowering replaces those weights with the packed results. A
weight that something other than a quantized linear also reads (a tied embedding) is left as it
is. At load the results are restored from the artifact (inherited), GPTQ does not rerun.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx

from qcompile.formats import QuantizedTensor, dequantize, quantization_error
from qcompile.ir.annotations import (
    LayerDecision,
    LayerResult,
    decision_of,
    set_decision,
    set_result,
)
from qcompile.ir.graph import get_attr, linear_nodes, module_path, set_attr
from qcompile.passes.base import PassContext, PassResult, register_pass
from qcompile.passes.calibration import ActivationStats
from qcompile.passes.gptq_math import GPTQInfo, gptq_quantize
from qcompile.passes.weight_quantization import OUTPUT_ERROR_ROWS, WeightQuantizer, output_error


@register_pass("gptq")
class GPTQ(WeightQuantizer):
    """GPTQ with blocked lazy updates, damping, activation order and static groups.

    Options (recorded in the artifact's manifest): ``block_size`` (columns per lazy-update
    block, 128), ``damp`` (relative damping: ``damp · mean(diag H)`` is added to the diagonal,
    0.01), ``act_order`` (process columns by decreasing ``diag H``, True).
    """

    method = "gptq"
    uses_calibration = True
    needs_hessian = True

    def __init__(self, block_size: int = 128, damp: float = 0.01, act_order: bool = True):
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"gptq: block_size must be an int >= 1, got {block_size!r}")
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not damp >= 0:
            raise ValueError(f"gptq: damp must be a number >= 0, got {damp!r}")
        if not isinstance(act_order, bool):
            raise ValueError(f"gptq: act_order must be True or False, got {act_order!r}")
        self.block_size, self.damp, self.act_order = block_size, float(damp), act_order

    def options(self) -> dict[str, Any]:
        return {"block_size": self.block_size, "damp": self.damp, "act_order": self.act_order}

    def gptq(self, weight: torch.Tensor, decision: LayerDecision,
             stats: ActivationStats | None) -> tuple[QuantizedTensor, GPTQInfo]:
        """One layer: ``gptq_quantize`` with this pass's options."""
        if stats is None or stats.hessian is None:
            raise ValueError("GPTQ needs the input Hessian of the layer (no calibration statistics)")
        return gptq_quantize(weight, stats.hessian.to(weight.device), decision.weight, block_size=self.block_size,
                             damp=self.damp, act_order=self.act_order)

    def quantize_weight(self, weight: torch.Tensor, decision: LayerDecision,
                        stats: ActivationStats | None) -> QuantizedTensor:
        """The base class's per-layer hook (layers independent, one capture): GPTQ's tensor only.
        :meth:`run` does not use it: it quantizes layer after layer and records :class:`GPTQInfo`."""
        return self.gptq(weight, decision, stats)[0]

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        todo = [(n, decision_of(n)) for n in linear_nodes(gm)]
        todo = [(n, d) for n, d in todo if d is not None and d.quantized]
        groups = _groups_by_input(todo)
        writable = _writable_weights(gm, {n for n, _ in todo})
        if ctx.progress is not None:
            ctx.progress.start_layers(f"{self.label} ({self.method.upper()})", len(todo))
        originals: dict[str, torch.Tensor] = {}  # float weights by target, before GPTQ wrote any
        errors, ratios, dead, captures = [], [], 0, 0
        wrote = False
        for group in groups:
            if wrote:
                ctx.graph_version += 1  # earlier weights changed: the statistics cache is stale
                wrote = False
            with _quiet(ctx):  # the calibration bar would take over the layer bar
                stats = ctx.activation_stats(gm, [n for n, _ in group], hessian=True, sample_rows=OUTPUT_ERROR_ROWS)
            captures += 1
            for node, decision in group:
                path, target = module_path(node), node.args[1].target
                weight = originals.setdefault(target, get_attr(gm, target))
                if weight.dim() != 2:
                    raise ValueError(f"linear {path}: expected a 2-D weight, got shape {tuple(weight.shape)}")
                w = weight.detach().float()
                s = stats[node.name]
                try:
                    qt, info = self.gptq(w, decision, s)
                except ValueError as e:
                    raise ValueError(f"cannot quantize weight {target!r} ({path}) as {decision.weight.short()} "
                                     f"with GPTQ: {e}") from e
                decision = decision.replace(extras={**decision.extras, self.name: {
                    "damp": info.damp, "dead_channels": info.dead_channels,
                    "proxy_loss_rtn": info.proxy_loss_rtn, "proxy_loss_gptq": info.proxy_loss_gptq}})
                set_decision(node, decision)
                err = quantization_error(w, qt)
                set_result(node, LayerResult(qt, decision.activation, self.method, float_dtype=str(weight.dtype),
                                             metrics={"weight_rel_error": err,
                                                      "output_rel_error": output_error(s.sample, w, qt,
                                                                                       decision.activation)}))
                if target in writable:
                    set_attr(gm, target, dequantize(qt).to(device=weight.device, dtype=weight.dtype))
                    wrote = True
                errors.append(err)
                ratios.append(info.loss_ratio)
                dead += info.dead_channels
                if ctx.progress is not None:
                    ctx.progress.advance_layer()
        out: dict[str, Any] = {"quantized": len(todo), "groups": len(groups), "captures": captures,
                               "dead_channels": dead}
        if errors:
            out["mean_weight_rel_error"] = float(torch.tensor(errors).mean())
            out["mean_proxy_loss_ratio"] = float(torch.tensor(ratios).mean())
        return PassResult(bool(todo), out)


def _groups_by_input(todo: list[tuple[fx.Node, LayerDecision]]) -> list[list[tuple[fx.Node, LayerDecision]]]:
    """Linears sharing an input node, groups in the graph order of their first linear (a group's
    input never depends on a later group's output)."""
    groups: dict[Any, list[tuple[fx.Node, LayerDecision]]] = {}
    for node, decision in todo:
        src = node.args[0]
        groups.setdefault(src if isinstance(src, fx.Node) else node, []).append((node, decision))
    return list(groups.values())


def _writable_weights(gm: fx.GraphModule, quantized: set[fx.Node]) -> set[str]:
    """Weight targets read only as the weight of linears being quantized (safe to overwrite)."""
    readers: dict[str, list[tuple[fx.Node, fx.Node]]] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            readers.setdefault(n.target, []).extend((n, user) for user in n.users)
    return {t for t, uses in readers.items()
            if uses and all(user in quantized and user.args[1] is attr for attr, user in uses)}


@contextlib.contextmanager
def _quiet(ctx: PassContext) -> Iterator[None]:
    progress, ctx.progress = ctx.progress, None
    try:
        yield
    finally:
        ctx.progress = progress
