"""Fusion for execution graphs: sibling projections become one GEMM, and the ops after a GEMM
become its epilogue.

:class:`FuseSiblingLinears` (exact) merges Q/K/V (and gate/up, and any other siblings) of a lowered
graph. Rules:

- siblings: ``qcompile::quantized_linear`` calls on the same input node with the same weight spec,
  activation spec and ``in_features``; NVFP4-style per-tensor global scales must be equal (else the
  group is left alone and the pass says why);
- the merged call's packed tensors are the members' concatenated along the output dimension (the
  canonical layout is row-major ``[N, ...]`` for codes, scales and zero points: a row's codes and
  scales do not depend on other rows, so the concatenation is the same quantized weight, never a
  re-quantization); a missing bias among biased members becomes zeros;
- each member's output becomes a ``slice`` of the merged output, in graph order.

:class:`FuseEpilogues` (exact) then moves work into the GEMM's epilogue (``op_schema.EPILOGUES``):

- ``silu(y[..., :h]) * y[..., h:]`` over the two halves of one quantized linear's output (a merged
  gate/up, rows gate then up: Llama-family MLPs) → that linear with ``epilogue="silu_mul"``;
- ``y + r`` or ``r + y`` where ``y`` is a quantized linear's output (or an eval-mode dropout of it)
  read by nothing else and ``r`` has its shape and dtype (the residual add after ``o_proj`` /
  ``down_proj``) → that linear with ``residual=r``. A reshape in between (GPT-2's ``Conv1D``
  views) is not crossed.

The bias is already the kernels' epilogue. The Triton kernels compute both epilogues in
registers; the reference and CPU paths apply them in torch, the same ops as the graph had.

Dynamic activation quantization is per token over ``x``, which the members share: quantizing
once is the same as quantizing three times. The pass runs on execution graphs (the generation
graph of ``runtime/decoder.py``); the compiled graph that artifacts, reports and the ONNX exporter
read keeps one layer per module. New tensors are registered on the graph module's root
(``fused_<i>_<tensor>``), so a graph sharing its submodules with the compiled graph leaves the
compiled graph unchanged.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from typing import Any

import torch
from torch import fx

from qcompile.codegen.op_schema import (
    TENSOR_FIELDS,
    QuantizedLinearCall,
    is_quantized_linear,
    quantized_linear_nodes,
    quantized_linear_overload,
)
from qcompile.ir.graph import get_attr, module_path
from qcompile.passes.base import Pass, PassContext, PassResult, register_pass


def _key(call: QuantizedLinearCall) -> tuple | None:
    """What siblings share; ``None`` for a call that already has an epilogue (it is not merged)."""
    if call.epilogue != "none" or call.residual is not None:
        return None
    return (call.x, call.weight_spec.encode(), call.act_spec.encode() if call.act_spec else "", call.in_features)


@register_pass("fuse_sibling_linears")
class FuseSiblingLinears(Pass):
    """Sibling quantized linears → one quantized linear and slices (rules in the module docstring)."""

    exact = True
    requires = ("lowered",)

    def run(self, gm: fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
        groups: dict[tuple, list[fx.Node]] = defaultdict(list)
        for node in quantized_linear_nodes(gm):
            if (key := _key(QuantizedLinearCall.from_node(node))) is not None:
                groups[key].append(node)
        fused, notes = [], []
        first_index = sum(1 for name, _ in gm.named_buffers(recurse=False) if name.endswith("_qdata"))
        for members in (g for g in groups.values() if len(g) > 1):
            calls = [QuantizedLinearCall.from_node(n).resolve(gm) for n in members]
            paths = [module_path(n) or n.name for n in members]
            if any(isinstance(c.bias, fx.Node) and c.bias.op != "get_attr" for c in calls):
                notes.append(f"not fused (a bias computed in the graph): {', '.join(paths)}")
                continue
            calls = [replace(c, bias=get_attr(gm, c.bias.target)) if isinstance(c.bias, fx.Node) else c for c in calls]
            scales = [c.global_scale for c in calls]
            if scales[0] is not None and not all(torch.equal(scales[0], s) for s in scales[1:]):
                notes.append(f"not fused (different global scales): {', '.join(paths)}")
                continue
            fused.append(self._merge(gm, members, calls, first_index + len(fused)))
            fused[-1]["layers"] = paths
        gm.graph.eliminate_dead_code()
        stats: dict[str, Any] = {"fused": [f["layers"] for f in fused]}
        if notes:
            stats["notes"] = notes
        return PassResult(bool(fused), stats)

    @staticmethod
    def _merge(gm: fx.GraphModule, members: list[fx.Node], calls: list[QuantizedLinearCall], index: int) -> dict:
        """One call before the first member (every member's users come after it), slices for the members."""
        tensors = {f: torch.cat([getattr(c, f) for c in calls]) if getattr(calls[0], f) is not None else None
                   for f in TENSOR_FIELDS if f != "global_scale"}
        tensors["global_scale"] = calls[0].global_scale
        biased = [c.bias for c in calls if c.bias is not None]
        if biased:
            tensors["bias"] = torch.cat([c.bias if c.bias is not None else biased[0].new_zeros(c.out_features)
                                         for c in calls])
        first = members[0]
        nodes: dict[str, fx.Node | None] = {"bias": None}
        with gm.graph.inserting_before(first):
            for name, value in tensors.items():
                if value is None:
                    nodes[name] = None
                    continue
                target = f"fused_{index}_{name}"
                gm.register_buffer(target, value)
                nodes[name] = gm.graph.get_attr(target)
            call = QuantizedLinearCall.from_node(first)
            merged = QuantizedLinearCall(call.x, nodes["qdata"], nodes["scale"], nodes["zero"], nodes["global_scale"],
                                         nodes["bias"], call.weight_spec, call.in_features, call.act_spec)
            node = gm.graph.call_function(quantized_linear_overload(), merged.op_args())
            node.meta = {k: v for k, v in first.meta.items() if k != "val"}
            start = 0
            for member, c in zip(members, calls):
                piece = gm.graph.call_function(torch.ops.aten.slice.Tensor, (node, -1, start, start + c.out_features))
                piece.meta = dict(member.meta)
                member.replace_all_uses_with(piece)
                start += c.out_features
        for member in members:
            gm.graph.erase_node(member)
        return {"out_features": start}


def _val(node: object) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _half(node: object, linear: fx.Node, n: int) -> int | None:
    """0 or 1 if ``node`` is ``linear``'s output sliced to its first or second half (of ``n``)."""
    if not (isinstance(node, fx.Node) and node.target == torch.ops.aten.slice.Tensor and node.args[0] is linear):
        return None
    dim, start, end = (list(node.args[1:]) + [0, None, None])[:3]
    if dim not in (-1, 2) or len(node.users) != 1:
        return None
    if (start, end) == (0, n // 2):
        return 0
    return 1 if (start, end) == (n // 2, n) else None


def _out_features(gm: fx.GraphModule, call: QuantizedLinearCall) -> int:
    """Rows of a graph call's weight (its scale's first dimension, read from the graph module)."""
    return int(get_attr(gm, call.scale.target).shape[0])


def _rebuild(gm: fx.GraphModule, linear: fx.Node, at: fx.Node, **changes: object) -> fx.Node:
    """A copy of the quantized-linear call ``linear`` with ``changes``, inserted before ``at``; it
    replaces ``at``'s uses and both old nodes go."""
    call = replace(QuantizedLinearCall.from_node(linear), **changes)
    with gm.graph.inserting_before(at):
        node = gm.graph.call_function(quantized_linear_overload(), call.op_args())
    node.meta = dict(at.meta)
    at.replace_all_uses_with(node)
    gm.graph.erase_node(at)
    return node


@register_pass("fuse_epilogues")
class FuseEpilogues(Pass):
    """SiLU·mul and residual adds → quantized-linear epilogues (rules in the module docstring)."""

    exact = True
    requires = ("lowered",)
    runs_after = ("fuse_sibling_linears",)

    def run(self, gm: fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
        silu, residual = [], []
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.target == torch.ops.aten.mul.Tensor:
                path = self._silu_mul(gm, node)
                if path:
                    silu.append(path)
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.target == torch.ops.aten.add.Tensor and len(node.args) == 2 \
                    and not node.kwargs:
                path = self._residual(gm, node)
                if path:
                    residual.append(path)
        gm.graph.eliminate_dead_code()
        return PassResult(bool(silu or residual), {"silu_mul": silu, "residual": residual})

    @staticmethod
    def _silu_mul(gm: fx.GraphModule, mul: fx.Node) -> str | None:
        a, b = mul.args[:2] if len(mul.args) == 2 else (None, None)
        for act, other in ((a, b), (b, a)):
            if not (isinstance(act, fx.Node) and act.target == torch.ops.aten.silu.default and len(act.users) == 1):
                continue
            gate = act.args[0]
            linear = gate.args[0] if isinstance(gate, fx.Node) and gate.args else None
            if not (isinstance(linear, fx.Node) and is_quantized_linear(linear)):
                continue
            call = QuantizedLinearCall.from_node(linear)
            n = _out_features(gm, call)
            if call.epilogue != "none" or call.residual is not None or n % 2 or len(linear.users) != 2:
                continue
            if _half(gate, linear, n) == 0 and _half(other, linear, n) == 1:
                _rebuild(gm, linear, mul, epilogue="silu_mul")
                return module_path(linear) or linear.name
        return None

    @staticmethod
    def _residual(gm: fx.GraphModule, add: fx.Node) -> str | None:
        for y, r in (add.args, add.args[::-1]):
            if isinstance(y, fx.Node) and y.target == torch.ops.aten.dropout.default and len(y.users) == 1 \
                    and len(y.args) > 2 and y.args[2] is False:
                y = y.args[0]                      # dropout in eval mode: the identity (OPT)
            if not (isinstance(y, fx.Node) and is_quantized_linear(y) and len(y.users) == 1 and isinstance(r, fx.Node)):
                continue
            call = QuantizedLinearCall.from_node(y)
            vy, vr = _val(y), _val(r)
            if call.residual is not None or vy is None or vr is None or vy.shape != vr.shape or vy.dtype != vr.dtype:
                continue
            path = module_path(y) or y.name
            _rebuild(gm, y, add, residual=r)
            return path
        return None
