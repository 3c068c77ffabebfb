"""lower: annotated linears → ``qcompile.quantized_linear`` holding packed weights.

Each quantized linear's float weight is replaced by buffers under its module
path (``<path>.qdata``, ``.scale``, ``.zero``, ``.global_scale``), so the lowered
module's state dict is the artifact's tensor list.
"""

from __future__ import annotations

from torch import fx

from qcompile.codegen.quantized_linear import QUANTIZED_LINEAR
from qcompile.formats import PER_CHANNEL
from qcompile.ir.graph import add_get_attr, erase_dead_attrs, module_path
from qcompile.passes.base import Pass, PassContext, PassResult, register_pass
from qcompile.passes.weight_quantization import QUANT, LinearQuant


def lower_linear(gm: fx.GraphModule, node: fx.Node, q: LinearQuant) -> fx.Node:
    path = module_path(node) or node.name
    qt = q.weight
    tensors = {k: add_get_attr(gm, f"{path}.q{k}" if k == "data" else f"{path}.{k}", v, before=node)
               for k, v in qt.tensors().items()}
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    act = q.activation
    args = (
        node.args[0], tensors["data"], tensors["scale"], tensors.get("zero"), tensors.get("global_scale"), bias,
        qt.spec.format, qt.spec.group_size, qt.spec.symmetric, qt.shape[1],
        act.format if act is not None else "", act.group_size if act is not None else PER_CHANNEL,
    )
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(QUANTIZED_LINEAR, args)
    new.meta.update({k: v for k, v in node.meta.items() if k != QUANT})
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


@register_pass("lower")
class Lower(Pass):
    exact = False

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        todo = [n for n in gm.graph.nodes if QUANT in n.meta]
        for node in todo:
            lower_linear(gm, node, node.meta[QUANT])
        gm.graph.eliminate_dead_code()
        erase_dead_attrs(gm)
        return PassResult(bool(todo), {"lowered": len(todo)})
