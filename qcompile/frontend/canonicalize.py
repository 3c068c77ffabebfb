"""Canonicalization: raise decomposed ATen patterns to qcompile's small op vocabulary.

- RMSNorm written as pow/mean/add/rsqrt/mul(/cast)/mul(weight) → ``qcompile.rms_norm``
- ``aten.layer_norm`` over the last dimension → ``qcompile.layer_norm``
- ``addmm(bias, x, W)`` with weight attributes (GPT-2's Conv1D) → ``aten.linear(x, Wᵀ, bias)``
- Conv1d/Conv2d with groups = 1 → im2col-style unfold → ``aten.linear`` (``convolution.py``);
  other convolutions stay and say why (``FLOAT_REASON``)
- every node gets its source module path in ``node.meta``

Anything not recognized stays as it is, so the graph always runs.
"""

from __future__ import annotations

import torch
from torch import fx

from qcompile.frontend.convolution import raise_convolutions
from qcompile.ir.graph import (
    MODULE_PATH,
    add_get_attr,
    erase_dead_attrs,
    get_attr,
    module_path,
    weight_module_path,
)
from qcompile.ir.ops import LAYER_NORM, LINEAR, RMS_NORM
from qcompile.ir.pattern import Attr, Cast, Op, Var, find_all, strip_casts
from qcompile.passes.base import Pass, PassContext, PassResult, register_pass

aten = torch.ops.aten

_X, _EPS = Var("x"), Var("eps")
_NORMALIZED = Op(
    aten.mul.Tensor,
    Cast(_X),
    Op(aten.rsqrt.default, Op(aten.add.Tensor, Op(aten.mean.dim, Op(aten.pow.Tensor_Scalar, Cast(_X), 2), [-1], True), _EPS)),
    commutative=True,
)
RMS_NORM_PATTERN = Op(aten.mul.Tensor, Attr("weight"), Cast(_NORMALIZED), commutative=True)
"""``weight * (x * rsqrt(mean(x², -1) + eps)).to(dtype)`` as Llama, Mistral and Qwen2 write it."""

_ASSERTS = (aten._assert_tensor_metadata.default,)


@register_pass("canonicalize")
class Canonicalize(Pass):
    """Raise norms, GPT-2's addmm, convolutions and module paths (module docstring); re-run at load."""

    exact = True
    ensures = ("canonical",)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        stats = {
            "asserts_removed": _remove_dtype_asserts(gm),
            "module_paths": _annotate_paths(gm),
            "rms_norm": _raise_rms_norm(gm),
            "layer_norm": _raise_layer_norm(gm),
            "addmm_to_linear": _raise_addmm(gm),
            **raise_convolutions(gm),
        }
        gm.graph.eliminate_dead_code()
        erase_dead_attrs(gm)
        changed = any(v for k, v in stats.items() if k != "module_paths")
        return PassResult(changed, stats)


def _remove_dtype_asserts(gm: fx.GraphModule) -> int:
    """torch.export's dtype asserts pin float32; passes and float64 verification
    legitimately change dtypes, and the checks guard nothing a user relies on."""
    asserts = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _ASSERTS]
    for n in asserts:
        gm.graph.erase_node(n)
    return len(asserts)


def _annotate_paths(gm: fx.GraphModule) -> int:
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == LINEAR and isinstance(node.args[1], fx.Node) and node.args[1].op == "get_attr":
            path = weight_module_path(node.args[1].target)
        else:
            path = module_path(node)
        if path:
            node.meta[MODULE_PATH] = path
            count += 1
    return count


def _raise_rms_norm(gm: fx.GraphModule) -> int:
    count = 0
    for m in find_all(gm, RMS_NORM_PATTERN):
        if m.root.graph is None:  # consumed by an earlier overlapping match
            continue
        eps = m["eps"]
        if isinstance(eps, fx.Node):
            continue
        x = strip_casts(m["x"])
        with gm.graph.inserting_before(m.root):
            new = gm.graph.call_function(RMS_NORM, (x, m["weight"], float(eps)))
        new.meta.update(m.root.meta)
        new.meta[MODULE_PATH] = module_path(m.root)
        m.root.replace_all_uses_with(new)
        gm.graph.erase_node(m.root)
        count += 1
    return count


def _raise_layer_norm(gm: fx.GraphModule) -> int:
    count = 0
    for node in list(gm.graph.nodes):
        if not (node.op == "call_function" and node.target == aten.layer_norm.default):
            continue
        x, shape, weight, bias, eps = (list(node.args) + [None, None, 1e-5])[:5]
        if len(shape) != 1:
            continue
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(LAYER_NORM, (x, weight, bias, float(eps)))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        count += 1
    return count


def _raise_addmm(gm: fx.GraphModule) -> int:
    count = 0
    for node in list(gm.graph.nodes):
        if not (node.op == "call_function" and node.target == aten.addmm.default and len(node.args) == 3 and not node.kwargs):
            continue
        bias, x, weight = node.args
        if not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in (bias, weight)):
            continue
        w = get_attr(gm, weight.target)
        if w.dim() != 2:
            continue
        w_t = add_get_attr(gm, weight.target + "_t", w.t().contiguous(), before=node)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(LINEAR, (x, w_t, bias))
        new.meta.update(node.meta)
        new.meta[MODULE_PATH] = weight_module_path(weight.target)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        count += 1
    return count
