"""Weight quantizers: each linear's decision becomes a result.

:class:`WeightQuantizer` is the orchestration every quantizer shares (which layers, calibration
statistics, errors for the report, restoring saved results at load); a subclass supplies the pure
math, ``quantize_weight(weight, decision, stats) -> QuantizedTensor``. ``quantize_weights`` is
round-to-nearest; GPTQ and AWQ are the same pass shape with other math.
"""

from __future__ import annotations

import torch
from torch import fx

from qcompile.formats import QuantizedTensor, QuantSpec, quantization_error, quantize
from qcompile.ir.annotations import LayerDecision, LayerResult, decision_of, set_result
from qcompile.ir.graph import get_attr, linear_nodes, module_path
from qcompile.passes.base import OnLoad, Pass, PassContext, PassResult, register_pass
from qcompile.passes.calibration import ActivationStats
from qcompile.passes.outlier_splitting_math import stored_weight_shape

OUTPUT_ERROR_ROWS = 256
"""Calibration rows on which each layer's output error is measured for the report."""


class WeightQuantizer(Pass):
    """Turns every quantized decision into a :class:`LayerResult`.

    Rules: a linear without a decision, or whose decision keeps it float, is left alone; the
    weight must be 2-D and finite; the result's metrics are the weight's relative error and the
    layer's output error on calibration rows (``‖xWᵀ − Q(x)Q(W)ᵀ‖ / ‖xWᵀ‖``). At load, results are
    rebuilt from the artifact's tensors, never recomputed.
    """

    exact = False
    requires = ("quant_decisions",)
    ensures = ("quant_results",)
    on_load = OnLoad.RESTORE
    method = ""
    needs_hessian = False
    label = "quantize weights"

    def quantize_weight(self, weight: torch.Tensor, decision: LayerDecision,
                        stats: ActivationStats | None) -> QuantizedTensor:
        """The pure part: quantize one float ``weight`` ``[N, K]`` as ``decision`` says, given the
        layer's calibration statistics (``None`` when the quantizer needs none)."""
        raise NotImplementedError

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Quantize every decided linear's weight with :meth:`quantize_weight` and record a
        ``LayerResult`` (method, layer output error on calibration rows)."""
        todo = [(n, decision_of(n)) for n in linear_nodes(gm)]
        todo = [(n, d) for n, d in todo if d is not None and d.quantized]
        stats = {}
        if todo and (self.needs_hessian or ctx.options.get("layer_errors", True)):
            stats = ctx.activation_stats(gm, [n for n, _ in todo], hessian=self.needs_hessian,
                                         sample_rows=OUTPUT_ERROR_ROWS)
        if ctx.progress is not None:
            ctx.progress.start_layers(f"{self.label} ({self.method.upper()})", len(todo))
        errors = []
        for node, decision in todo:
            path = module_path(node)
            weight = get_attr(gm, node.args[1].target)
            if weight.dim() != 2:
                raise ValueError(f"linear {path}: expected a 2-D weight, got shape {tuple(weight.shape)}")
            w = weight.detach().float()
            try:
                qt = self.quantize_weight(w, decision, stats.get(node.name))
            except ValueError as e:
                raise ValueError(f"cannot quantize weight {node.args[1].target!r} ({path}) as "
                                 f"{decision.weight.short()}: {e}") from e
            err = quantization_error(w, qt)
            errors.append(err)
            sample = stats[node.name].sample if node.name in stats else None
            set_result(node, LayerResult(qt, decision.activation, self.method, float_dtype=str(weight.dtype),
                                         metrics={"weight_rel_error": err,
                                                  "output_rel_error": output_error(sample, w, qt, decision.activation)}))
            if ctx.progress is not None:
                ctx.progress.advance_layer()
        out = {"quantized": len(todo)}
        if errors:
            out["mean_weight_rel_error"] = float(torch.tensor(errors).mean())
        return PassResult(bool(todo), out)

    def restore(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        restored = 0
        for node in linear_nodes(gm):
            decision = decision_of(node)
            if decision is None or not decision.quantized:
                continue
            weight = get_attr(gm, node.args[1].target)
            shape = stored_weight_shape(decision.extras, tuple(weight.shape))  # residual channels widen K
            result = ctx.artifact.result(module_path(node), decision, shape)
            if result is not None:
                set_result(node, result)
                restored += 1
        return PassResult(bool(restored), {"restored": restored})


@register_pass("quantize_weights")
class QuantizeWeights(WeightQuantizer):
    """Round-to-nearest with the decision's weight spec (the formats library's ``quantize``)."""

    method = "rtn"

    def quantize_weight(self, weight: torch.Tensor, decision: LayerDecision,
                        stats: ActivationStats | None) -> QuantizedTensor:
        return quantize(weight, decision.weight)


def output_error(x: torch.Tensor | None, weight: torch.Tensor, qt: QuantizedTensor, act: QuantSpec | None) -> float | None:
    """‖x Wᵀ − Q(x) Q(W)ᵀ‖ / ‖x Wᵀ‖ on calibration rows ``x``."""
    if x is None:
        return None
    from qcompile.codegen.quantized_linear import reference_quantized_linear

    x = x.float()
    ref = x @ weight.t()
    out = reference_quantized_linear(x, qt, None, act)
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))
