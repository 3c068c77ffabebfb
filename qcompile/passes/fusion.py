"""Fusion of sibling projections: quantized linears that read the same input become one GEMM.

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
    quantized_linear_nodes,
    quantized_linear_overload,
)
from qcompile.ir.graph import get_attr, module_path
from qcompile.passes.base import Pass, PassContext, PassResult, register_pass


def _key(call: QuantizedLinearCall) -> tuple:
    return (call.x, call.weight_spec.encode(), call.act_spec.encode() if call.act_spec else "", call.in_features)


@register_pass("fuse_sibling_linears")
class FuseSiblingLinears(Pass):
    """Sibling quantized linears → one quantized linear and slices (rules in the module docstring)."""

    exact = True
    requires = ("lowered",)

    def run(self, gm: fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
        groups: dict[tuple, list[fx.Node]] = defaultdict(list)
        for node in quantized_linear_nodes(gm):
            groups[_key(QuantizedLinearCall.from_node(node))].append(node)
        fused, notes = [], []
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
            fused.append(self._merge(gm, members, calls, len(fused)))
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


def fused_weight_bytes(gm: fx.GraphModule) -> int:
    """Bytes of the tensors :class:`FuseSiblingLinears` added to ``gm``."""
    return sum(t.numel() * t.element_size() for n, t in gm.named_buffers() if n.startswith("fused_"))
