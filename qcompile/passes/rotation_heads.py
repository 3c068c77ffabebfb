"""rotate_heads (R2): a per-head orthogonal rotation folded into V's output rows and O's input
columns. The rotation family's shared vocabulary (graph helpers, weight folding, load records) is
in ``rotation.py``; ``docs/rotation.md`` has the rules.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from qcompile.formats.orthogonal import Rotation, derive_seed
from qcompile.ir.annotations import decision_of
from qcompile.ir.graph import erase_dead_attrs, is_linear
from qcompile.passes.base import PassResult, register_pass
from qcompile.passes.rotation import (
    _ATTENTION,
    _MATMUL,
    _SCALAR_MUL,
    _TRANSPOSES,
    _VIEWS,
    RotationError,
    _bias_node,
    _last,
    _passthrough,
    _record,
    _RotationPass,
    _saved_rotation,
    _set_bias,
    _users,
    _val,
    _weight_node,
    _Weights,
    make_rotation,
)

aten = torch.ops.aten


# ----------------------------------------------------------------------------- R2: attention heads
@dataclass
class _Attention:
    v: fx.Node
    offset: int
    kv_heads: int
    heads: int
    head_dim: int
    o: fx.Node


def _find_attentions(gm: fx.GraphModule) -> tuple[list[_Attention], dict[str, int]]:
    found, skipped = [], {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _ATTENTION:
            value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value")
        elif node.target in _MATMUL:
            value = node.args[1]
        else:
            continue
        att = _match_attention(node, value)
        if isinstance(att, str):
            if node.target in _ATTENTION:
                skipped[att] = skipped.get(att, 0) + 1
            continue
        found.append(att)
    return found, skipped


def _match_attention(att: fx.Node, value: Any) -> _Attention | str:
    d = _last(value)
    out = _val(att)
    if d is None or out is None or out.dim() < 3 or _last(att) != d:
        return "attention without static head dimension"
    v = _trace_value(value, d)
    if isinstance(v, str):
        return v
    lin_v, offset, kv = v
    o = _trace_output(att, d)
    if isinstance(o, str):
        return o
    lin_o, heads = o
    if heads % kv or lin_o.args[1] is lin_v.args[1]:
        return f"{heads} query heads cannot share {kv} KV heads"
    return _Attention(lin_v, offset, kv, heads, d, lin_o)


def _keeps_last(node: fx.Node, src: fx.Node, d: int) -> bool:
    """Pass-through for a per-head rotation of the last dimension (``d``): also transposes and
    permutes that keep the last dimension last."""
    if node.op == "call_function" and node.target in _TRANSPOSES and node.args[0] is src and _last(node) == d:
        v = _val(src)
        if v is None:
            return False
        last = v.dim() - 1
        if node.target is aten.transpose.int:
            return all(a % v.dim() != last for a in node.args[1:3])
        return node.args[1][-1] % v.dim() == last
    return _passthrough(node, src, d) and node.target not in _SCALAR_MUL


def _trace_value(value: fx.Node, d: int) -> tuple[fx.Node, int, int] | str:
    """(v linear, channel offset in its output, KV heads) for attention's value input."""
    node = value
    while True:
        if not isinstance(node, fx.Node) or node.op != "call_function" or not node.args:
            return "value path not recognized"
        if len(_users(node)) != 1:
            return "value tensor read by more than attention"
        src = node.args[0]
        if not isinstance(src, fx.Node):
            return "value path not recognized"
        if node.target in _VIEWS and _last(src) != d:
            shape = _val(node).shape
            if len(shape) >= 2 and _last(src) == int(shape[-2]) * d:
                kv, node = int(shape[-2]), src
                break
            return "value head split not recognized"
        if _keeps_last(node, src, d):
            node = src
            continue
        return f"value path through {node.target} not recognized"
    width, offset, prev = kv * d, 0, None
    while True:
        if is_linear(node):
            users = _users(node)
            if prev is not None and any(u is not prev and not _disjoint(u, node, offset, width) for u in users):
                return "fused value projection read elsewhere"
            return node, offset, kv
        if not isinstance(node, fx.Node) or node.op != "call_function" or not node.args:
            return "value projection not found"
        src = node.args[0]
        if node.target is operator.getitem and isinstance(src, fx.Node) and src.target in (aten.split.Tensor, aten.split_with_sizes.default):
            split, idx = src, node.args[1]
            x = split.args[0]
            v = _val(x)
            dim = split.args[2] if len(split.args) > 2 else 0
            if v is None or dim % v.dim() != v.dim() - 1:
                return "value split not on channels"
            sizes = split.args[1]
            offset += sum(sizes[:idx]) if isinstance(sizes, (list, tuple)) else idx * sizes
            prev, node = split, x
            if any(u is not split for u in _users(x)):
                return "split input read elsewhere"
            continue
        if node.target is aten.slice.Tensor and isinstance(src, fx.Node):
            v = _val(src)
            dim = node.args[1] if len(node.args) > 1 else 0
            if v is not None and dim % v.dim() == v.dim() - 1:
                start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
                step = node.args[4] if len(node.args) > 4 else 1
                if step != 1 or start < 0:
                    return "value slice not recognized"
                offset += start
                if any(u is not node and not _disjoint(u, src, offset, width) for u in _users(src)):
                    return "fused value projection read elsewhere"
                prev, node = node, src
                continue
        if isinstance(src, fx.Node) and _passthrough(node, src, _last(node) or -1) and node.target not in _SCALAR_MUL:
            if len(_users(src)) != 1 and not all(u.target is aten.slice.Tensor for u in _users(src)):
                return "value projection read elsewhere"
            prev, node = node, src
            continue
        return f"value projection path through {node.target} not recognized"


def _disjoint(u: fx.Node, src: fx.Node, offset: int, width: int) -> bool:
    """``u`` reads a channel range of ``src`` disjoint from ``[offset, offset + width)``."""
    if u.op != "call_function" or u.target is not aten.slice.Tensor:
        return False
    v = _val(src)
    dim = u.args[1] if len(u.args) > 1 else 0
    if v is None or dim % v.dim() != v.dim() - 1:
        return False
    n = int(v.shape[-1])
    start = u.args[2] if len(u.args) > 2 and u.args[2] is not None else 0
    end = min(u.args[3] if len(u.args) > 3 and u.args[3] is not None else n, n)
    return end <= offset or start >= offset + width


def _trace_output(att: fx.Node, d: int) -> tuple[fx.Node, int] | str:
    """(o linear, query heads) reading attention's output after the heads are merged."""
    node, merged, heads = att, False, int(_val(att).shape[-3])
    while True:
        users = _users(node)
        if len(users) != 1:
            return "attention output read by more than the output projection"
        u = users[0]
        if is_linear(u) and u.args[0] is node:
            return (u, heads) if merged and _last(node) == heads * d else "output projection before the heads merge"
        if u.op != "call_function" or not u.args or u.args[0] is not node:
            return "attention output path not recognized"
        if u.target in _VIEWS and not merged and _last(u) != d:
            shape = _val(node).shape
            if int(shape[-2]) == heads and _last(u) == heads * d:
                merged, node = True, u
                continue
            return "head merge not recognized"
        if (not merged and _keeps_last(u, node, d)) or (merged and _passthrough(u, node, heads * d)
                                                         and u.target not in _SCALAR_MUL):
            node = u
            continue
        return f"attention output path through {u.target} not recognized"


@register_pass("rotate_heads")
class RotateHeads(_RotationPass):
    """R2: per KV head ``g`` an orthogonal ``R_g`` (size head_dim, seeded per layer and head) folded
    into the value projection's output rows and the output projection's input columns.

    Rules: attention (``scaled_dot_product_attention``, or ``matmul(P, V)``) whose value input comes
    from a linear's output (a channel range of it for fused QKV) through a head split and layout
    ops only, and whose output reaches one linear through layout ops and the head merge; query head
    ``h`` uses KV head ``h // (heads / kv_heads)``'s rotation (grouped-query attention). Attention
    not matching is left alone (counted under ``stats["skipped"]``).
    """

    runs_after = ("assign_quant_specs", "fold_norm_scales", "rotate_residual")

    def _apply(self, gm: fx.GraphModule, compute: bool, saved: dict[fx.Node, dict] | None) -> PassResult:
        attentions, skipped = _find_attentions(gm)
        weights = _Weights(gm, compute, "_r2")
        done = 0
        for i, att in enumerate(attentions):
            if saved is not None:
                if att.o not in saved:
                    continue
                info = _saved_rotation(saved, [n for n in (att.v, att.o) if decision_of(n) is not None], self.name)
                if info["size"] != att.head_dim or info.get("kv_heads") != att.kv_heads:
                    raise RotationError(f"rotate_heads: recorded rotation {info} does not fit attention {i}")
                kind, seed = info["kind"], info["seed"]
            else:
                kind, seed = self.kind, derive_seed(self.seed, "heads", i)
            rots = [make_rotation(att.head_dim, derive_seed(seed, g), kind) for g in range(att.kv_heads)] if compute else []
            self._fold(att, rots, weights, key=i)
            info = {"kind": kind, "seed": seed, "size": att.head_dim, "kv_heads": att.kv_heads, "heads": att.heads}
            _record(att.v, self.name, {**info, "side": "output", "offset": att.offset})
            _record(att.o, self.name, {**info, "side": "input"})
            done += 1
        erase_dead_attrs(gm)
        stats = {"attentions": done, "kind": self.kind, "seed": self.seed, "skipped": skipped}
        if attentions:
            a = attentions[0]
            stats.update(head_dim=a.head_dim, heads=a.heads, kv_heads=a.kv_heads)
        if not compute:
            stats = {"restored": done}
        return PassResult(done > 0, stats)

    @staticmethod
    def _fold(att: _Attention, rots: list[Rotation], weights: _Weights, key: int) -> None:
        d, off, group = att.head_dim, att.offset, att.heads // att.kv_heads

        def v_rows(w: torch.Tensor) -> torch.Tensor:  # rows of head g ← R_gᵀ · rows
            w = w.clone()
            for g, r in enumerate(rots):
                rows = slice(off + g * d, off + (g + 1) * d)
                w[rows] = r.apply(w[rows].t()).t()
            return w

        def v_bias(b: torch.Tensor) -> torch.Tensor:
            b = b.clone()
            for g, r in enumerate(rots):
                rows = slice(off + g * d, off + (g + 1) * d)
                b[rows] = r.apply(b[rows])
            return b

        def o_cols(w: torch.Tensor) -> torch.Tensor:  # columns of query head h ← · R_{h // group}
            w = w.clone()
            for h in range(att.heads):
                cols = slice(h * d, (h + 1) * d)
                w[:, cols] = rots[h // group].apply(w[:, cols])
            return w

        weights.replace(att.v, _weight_node(att.v), ("heads_v", key), v_rows, lambda n: att.v.update_arg(1, n))
        bias = _bias_node(att.v)
        if bias is not None:
            weights.replace(att.v, bias, ("heads_vb", key), v_bias, lambda n: _set_bias(att.v, n))
        weights.replace(att.o, _weight_node(att.o), ("heads_o", key), o_cols, lambda n: att.o.update_arg(1, n))


