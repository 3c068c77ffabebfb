"""quantize_weights: round-to-nearest weight quantization, layer by layer.

The recipe picks a QuantSpec per linear (by module-path patterns); this pass
computes the QuantizedTensor and attaches it to the node as a ``LinearQuant``
annotation. Lowering turns annotations into quantized ops, so another weight
quantizer (GPTQ, AWQ-scaled RTN) only has to produce a different QuantizedTensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from qcompile.formats import QuantizedTensor, QuantSpec, quantization_error, quantize
from qcompile.ir.graph import get_attr, linear_nodes, module_path
from qcompile.ir.interpret import capture_inputs
from qcompile.passes.base import Pass, PassContext, PassResult, register_pass

QUANT = "qcompile.quant"
"""``node.meta`` key of a linear's ``LinearQuant`` annotation."""


@dataclass
class LinearQuant:
    """What lowering needs to replace one linear: its quantized weight, the
    activation spec (None = weight-only) and the method that produced it."""

    weight: QuantizedTensor
    activation: QuantSpec | None
    method: str = "rtn"


@register_pass("quantize_weights")
class QuantizeWeights(Pass):
    exact = False

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        recipe = ctx.recipe
        linears = linear_nodes(gm)
        chosen = [(n, recipe.spec_for(module_path(n))) for n in linears]
        todo = [(n, s) for n, s in chosen if s is not None]
        if ctx.progress is not None:
            ctx.progress.start_layers("quantize weights (RTN)", len(todo))
        inputs = {}
        if todo and ctx.options.get("layer_errors", True):
            inputs = capture_inputs(gm, ctx.example_args, ctx.example_kwargs, [n for n, _ in todo], max_rows=256)
        errors = []
        for node, (w_spec, a_spec) in todo:
            path = module_path(node)
            weight = get_attr(gm, node.args[1].target)
            if weight.dim() != 2:
                raise ValueError(f"linear {path}: expected a 2-D weight, got shape {tuple(weight.shape)}")
            try:
                qt = quantize(weight.detach().float(), w_spec)
            except ValueError as e:
                raise ValueError(f"cannot quantize weight {node.args[1].target!r} ({path}) as {w_spec.short()}: {e}") from e
            node.meta[QUANT] = LinearQuant(qt, a_spec, "rtn")
            err = quantization_error(weight.detach().float(), qt)
            errors.append(err)
            ctx.layer(path).update(
                weight_format=w_spec.short(),
                activation_format=a_spec.short() if a_spec is not None else None,
                bits_per_weight=8.0 * qt.nbytes() / weight.numel(),
                bytes_before=weight.numel() * weight.element_size(),
                bytes_fp16=weight.numel() * 2,
                bytes_after=qt.nbytes(),
                weight_rel_error=err,
                method="rtn",
                output_rel_error=_output_error(inputs.get(node.name), weight, qt, a_spec),
            )
            if ctx.progress is not None:
                ctx.progress.advance_layer()
        for node, spec in chosen:
            if spec is None:
                w = get_attr(gm, node.args[1].target)
                ctx.layer(module_path(node)).update(
                    weight_format=str(w.dtype).removeprefix("torch."), activation_format=None,
                    bits_per_weight=8.0 * w.element_size(), bytes_before=w.numel() * w.element_size(),
                    bytes_fp16=w.numel() * 2, bytes_after=w.numel() * w.element_size(),
                    weight_rel_error=0.0, output_rel_error=0.0, method="kept float",
                )
        stats = {"quantized": len(todo), "kept_float": len(chosen) - len(todo)}
        if errors:
            stats["mean_weight_rel_error"] = float(torch.tensor(errors).mean())
        return PassResult(bool(todo), stats)


def _output_error(x: torch.Tensor | None, weight: torch.Tensor, qt: QuantizedTensor, act: QuantSpec | None) -> float | None:
    """‖x Wᵀ − Q(x) Q(W)ᵀ‖ / ‖x Wᵀ‖ on the layer's real input from the example."""
    if x is None or not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return None
    from qcompile.codegen.quantized_linear import reference_quantized_linear

    x = x.float()
    ref = x @ weight.detach().float().t()
    out = reference_quantized_linear(x, qt, None, act)
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))
