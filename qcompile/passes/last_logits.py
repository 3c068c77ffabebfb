"""Last logits: a generation graph that computes the LM head at one position per row.

A prefill needs each row's next-token logits only, but the model computes the LM head at every
position: a ``[B, T, vocabulary]`` tensor (at 2048 tokens and Llama-3's 128256 words, 0.5 GB in
bf16 per row, and its GEMM). :class:`LastLogits` puts a ``qcompile::logit_rows`` op
(``runtime/cached_attention.py``) in front of the LM head, which picks the one position per row
that the binding names. Rules:

- the LM head is the linear (``aten.linear`` or ``qcompile::quantized_linear``) reached from the
  logits output back through single-input ops (casts, soft-capping, scaling, views);
- everything between the last hidden state and the logits is per position, so the picked rows'
  logits equal the full graph's at those positions;
- a graph whose logits do not come from such a linear is left alone, and the pass reports
  ``found: False``.

Not exact in the pass manager's sense (the output shape changes): ``tests/runtime/test_generate.py``
checks the logits against the full graph's.
"""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree
from torch import fx

from qcompile.codegen.op_schema import is_quantized_linear
from qcompile.passes.base import Pass, PassContext, PassResult, register_pass
from qcompile.runtime.cached_attention import LOGIT_ROWS, CacheBinding

_LINEAR = torch.ops.aten.linear.default


def _first_tensor_output(gm: fx.GraphModule) -> fx.Node | None:
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    for leaf in pytree.tree_leaves(out.args[0]):
        if isinstance(leaf, fx.Node) and isinstance(leaf.meta.get("val"), torch.Tensor):
            return leaf
    return None


def lm_head(gm: fx.GraphModule) -> fx.Node | None:
    """The linear node that produces the graph's first tensor output, or ``None``."""
    node = _first_tensor_output(gm)
    while isinstance(node, fx.Node) and node.op == "call_function":
        if node.target == _LINEAR or is_quantized_linear(node):
            return node
        inputs = [a for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]
        if len(inputs) != 1:
            return None
        node = inputs[0]
    return None


@register_pass("last_logits")
class LastLogits(Pass):
    """A ``qcompile::logit_rows`` of ``binding`` in front of the LM head (rules: the module docstring)."""

    exact = False

    def __init__(self, binding: CacheBinding) -> None:
        self.binding = binding

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        head = lm_head(gm)
        if head is None:
            return PassResult(False, {"found": False})
        hidden = head.args[0]
        val = hidden.meta.get("val") if isinstance(hidden, fx.Node) else None
        if not isinstance(val, torch.Tensor) or val.dim() != 3:
            return PassResult(False, {"found": False})
        with gm.graph.inserting_before(head):
            rows = gm.graph.call_function(LOGIT_ROWS, (hidden, self.binding.key))
        rows.meta["val"] = val[:, :1]
        head.replace_input_with(hidden, rows)
        gm.recompile()
        return PassResult(True, {"found": True, "lm_head": head.name})
