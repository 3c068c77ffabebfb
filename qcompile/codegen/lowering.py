"""lower: linears with a result → ``qcompile.quantized_linear`` holding packed weights.

Each quantized linear's float weight is replaced by buffers under its module
path (``<path>.qdata``, ``.scale``, ``.zero``, ``.global_scale``), so the lowered
module's state dict is the artifact's tensor list. The op's arguments come from
``op_schema.QuantizedLinearCall``; the decision and result stay on the new node.
"""

from __future__ import annotations

from dataclasses import replace

from torch import fx

from qcompile.codegen.op_schema import QuantizedLinearCall, quantized_linear_overload
from qcompile.ir.annotations import DECISION, RESULT, LayerResult, result_of
from qcompile.ir.graph import add_get_attr, erase_dead_attrs, module_path
from qcompile.passes.base import OnLoad, Pass, PassContext, PassResult, register_pass
from qcompile.passes.outlier_splitting_math import unapplied_split

_ATTR_NAMES = {"data": "qdata"}  # QuantizedTensor tensor name -> attribute suffix


def lower_linear(gm: fx.GraphModule, node: fx.Node, result: LayerResult) -> fx.Node:
    path = module_path(node) or node.name
    qt = result.weight
    tensors = {k: add_get_attr(gm, f"{path}.{_ATTR_NAMES.get(k, k)}", v, before=node) for k, v in qt.tensors().items()}
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    call = QuantizedLinearCall.for_weight(node.args[0], qt, tensors, bias, result.activation)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(quantized_linear_overload(), call.op_args())
    new.meta.update(node.meta)
    new.meta[RESULT] = replace(result, weight=None)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


@register_pass("lower")
class Lower(Pass):
    """Replace every ``aten.linear`` carrying a result by the quantized op; drop dead weights.
    Deterministic given the results, so it re-runs at load. A decision asking for an outlier split
    that no pass applied (``split_outliers`` / ``residual_channels`` missing) is an error."""

    exact = False
    requires = ("quant_results",)
    ensures = ("lowered",)
    on_load = OnLoad.RERUN

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        todo = [n for n in gm.graph.nodes if n.op == "call_function" and result_of(n) is not None
                and result_of(n).weight is not None]
        for node in todo:
            pending = unapplied_split(node.meta.get(DECISION))
            if pending:
                raise ValueError(f"layer {module_path(node)!r}: {pending}")
            lower_linear(gm, node, result_of(node))
        gm.graph.eliminate_dead_code()
        erase_dead_attrs(gm)
        return PassResult(bool(todo), {"lowered": len(todo)})
