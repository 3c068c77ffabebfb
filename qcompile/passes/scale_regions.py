"""Where scale migration can put a per-channel scale: groups of linears that read one input, the
producer each input comes from (a norm, or a linear through ops that are linear per channel), the
channel correspondence between them, and the graph edits that bind new weights, biases and
``channel_scale`` nodes. The passes themselves are in ``scale_migration.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from qcompile.ir.annotations import LayerDecision, decision_of, set_decision
from qcompile.ir.graph import (
    MODULE_PATH,
    add_get_attr,
    get_attr,
    is_linear,
    linear_nodes,
    module_path,
    set_attr,
)
from qcompile.ir.interpret import flat_inputs
from qcompile.ir.ops import CHANNEL_SCALE, LAYER_NORM, NORM_OPS
from qcompile.passes.base import PassContext
from qcompile.passes.norm_folding import _keeps_channels, _linear_consumers

aten = torch.ops.aten

_MOVES = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
    aten.permute.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
    aten.slice.Tensor, aten.select.int, aten.expand.default, aten.t.default,
}
"""Ops that only move elements: a channel index tensor passed through them says where each goes."""
_IDENTITIES = {
    aten.clone.default, aten.contiguous.default, aten.alias.default, aten.to.dtype, aten._to_copy.default,
    aten.dropout.default,
}
"""Ops that return their input's values (casts; dropout only when not training)."""
_VIEWS = {aten.view.default, aten._unsafe_view.default}
_SDPA = aten.scaled_dot_product_attention.default
_MATMULS = {aten.matmul.default, aten.bmm.default}
_SOFTMAX = {aten._softmax.default, aten.softmax.int}


# ----------------------------------------------------------------------------- graph structure
def _is_eval_dropout(node: fx.Node) -> bool:
    if node.target != aten.dropout.default:
        return False
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.0)
    return train is False or p == 0


def _is_last_dim_softmax(node: Any) -> bool:
    """Rows of a softmax over the last dimension sum to 1, so ``P·(V − z) = P·V − z``."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in _SOFTMAX):
        return False
    val = node.meta.get("val")
    dim = node.args[1]
    return dim == -1 or (isinstance(val, torch.Tensor) and dim == val.dim() - 1)


def _source(lin: fx.Node) -> fx.Node:
    """The node a linear's input comes from, past ops that move whole rows (and eval dropout)."""
    node = lin.args[0]
    channels = _weight_shape(lin)[1]
    while (isinstance(node, fx.Node) and isinstance(node.args[0] if node.args else None, fx.Node)
           and (_keeps_channels(node, channels) or (node.op == "call_function" and _is_eval_dropout(node)))):
        node = node.args[0]
    return node


def _weight_shape(lin: fx.Node) -> tuple[int, ...]:
    return tuple(get_attr(lin.graph.owning_module, lin.args[1].target).shape)


def _chain_inputs(node: fx.Node, mode: str) -> list[fx.Node]:
    """The inputs through which ``node`` is linear per channel (``mode="scale"``: commutes with a
    positive per-channel scale; ``"shift"``: with subtracting a per-channel constant)."""
    if node.op != "call_function":
        return []
    t, args = node.target, node.args
    first = args[0] if args else None
    if t in _MOVES or t in _IDENTITIES:
        if t == aten.dropout.default and not _is_eval_dropout(node):
            return []
        return [first] if isinstance(first, fx.Node) else []
    if t == _SDPA:
        q, k, v = args[:3]
        mask = args[3] if len(args) > 3 else node.kwargs.get("attn_mask")
        dropout = args[4] if len(args) > 4 else node.kwargs.get("dropout_p", 0.0)
        if not isinstance(v, fx.Node) or v in (q, k, mask) or (mode == "shift" and dropout != 0):
            return []
        return [v]
    if t in _MATMULS:
        a, b = args[:2]
        if not isinstance(b, fx.Node) or a is b:
            return []
        if mode == "shift" and not _is_last_dim_softmax(a):
            return []
        return [b]
    if mode != "scale":
        return []
    if t == aten.mul.Tensor:
        a, b = args[:2]
        if a is b:
            return []
        return [x for x in (a, b) if isinstance(x, fx.Node)]
    if t == aten.div.Tensor:
        return [first] if isinstance(first, fx.Node) and args[1] is not first else []
    if t == aten.relu.default:
        return [first] if isinstance(first, fx.Node) else []
    return []


def _producer_chain(lin: fx.Node, mode: str) -> tuple[fx.Node, list[fx.Node]] | None:
    """``(P, chain)``: the linear ``P`` whose output reaches ``lin``'s input only through
    single-consumer per-channel-linear ops (``chain``, in order), or None."""

    def walk(node: Any, depth: int) -> tuple[fx.Node, list[fx.Node]] | None:
        if not isinstance(node, fx.Node) or depth > 64 or len(node.users) != 1:
            return None
        if is_linear(node):
            return node, []
        for inp in _chain_inputs(node, mode):
            found = walk(inp, depth + 1)
            if found is not None:
                return found[0], [*found[1], node]
        return None

    return walk(lin.args[0], 0)


def _linear_bias_node(lin: fx.Node) -> Any:
    return lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")


def _params_ok(lin: fx.Node) -> bool:
    bias = _linear_bias_node(lin)
    return bias is None or (isinstance(bias, fx.Node) and bias.op == "get_attr")


def _norm_params_ok(norm: fx.Node) -> bool:
    params = norm.args[1:3] if norm.target == LAYER_NORM else norm.args[1:2]
    return all(p is None or (isinstance(p, fx.Node) and p.op == "get_attr") for p in params)


class _ChannelShadow(fx.Interpreter):
    """Runs the graph and, beside it, pushes a tensor of channel indices from each producer ``P``
    down its chain: at the consumer's input it says which ``P`` channel each channel comes from."""

    def __init__(self, gm: fx.GraphModule, chains: list[tuple[fx.Node, list[fx.Node], fx.Node]]):
        super().__init__(gm)
        self.starts = {p for p, _, _ in chains}
        self.prev: dict[fx.Node, fx.Node] = {}
        for p, nodes, _ in chains:
            prev = p
            for n in nodes:
                self.prev[n] = prev
                prev = n
        self.shadow: dict[fx.Node, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n in self.starts:
            self.shadow[n] = torch.arange(out.shape[-1], dtype=torch.float64).expand(out.shape).contiguous()
        elif n in self.prev and self.prev[n] in self.shadow:
            with contextlib.suppress(Exception):  # an unexpected op just means no fold through it
                self.shadow[n] = self._propagate(n, self.prev[n], self.shadow[self.prev[n]], out)
        return out

    def _propagate(self, n: fx.Node, prev: fx.Node, sh: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        t = n.target
        if t in _IDENTITIES:
            return sh
        if t in _MOVES:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            args = [sh if a is prev else v for a, v in zip(n.args, args)]
            if t in _VIEWS:
                return aten.reshape.default(*args, **kwargs)
            return t(*args, **kwargs).contiguous()
        if t == _SDPA or t in _MATMULS:
            token = sh[..., :1, :]
            if not bool((sh == token).all()):
                raise ValueError("channel indices vary over tokens")
            if token.dim() >= 3 and out.dim() >= 3 and token.shape[-3] not in (1, out.shape[-3]):
                token = token.repeat_interleave(out.shape[-3] // token.shape[-3], dim=-3)  # enable_gqa
            return token.expand(out.shape).contiguous()
        return sh.expand(out.shape).contiguous()  # mul / div / relu: elementwise, maybe broadcast


def _channel_maps(gm: fx.GraphModule, ctx: PassContext,
                  chains: list[tuple[fx.Node, list[fx.Node], fx.Node]]) -> dict[str, torch.Tensor]:
    """Consumer name → ``index [K]``: the producer channel feeding each consumer input channel."""
    if not chains:
        return {}
    shadow = _ChannelShadow(gm, chains)
    with torch.no_grad():
        shadow.run(*flat_inputs(gm, ctx.example_args, ctx.example_kwargs))
    maps = {}
    for p, nodes, c in chains:
        sh = shadow.shadow.get(nodes[-1] if nodes else p)
        k = _weight_shape(c)[1]
        if sh is None or sh.shape[-1] != k:
            continue
        rows = sh.reshape(-1, k)
        first = rows[0]
        if bool((rows == first).all()) and bool((first == first.round()).all()):
            maps[c.name] = first.long()
    return maps


@dataclass
class _Group:
    linears: list[fx.Node]
    source: fx.Node
    fold: str = "channel_scale"
    norm: fx.Node | None = None
    producer: fx.Node | None = None
    index: torch.Tensor | None = None
    """Fold ``linear``: the producer channel of each input channel."""
    why: str = ""


def _groups(gm: fx.GraphModule, ctx: PassContext, select: Callable[[LayerDecision], bool], mode: str) -> list[_Group]:
    """The groups of selected linears sharing a source, with the fold each can use, in graph order."""
    by_source: dict[fx.Node, list[fx.Node]] = {}
    for lin in linear_nodes(gm):
        decision = decision_of(lin)
        if decision is not None and decision.quantized and select(decision) and len(_weight_shape(lin)) == 2:
            by_source.setdefault(_source(lin), []).append(lin)
    groups, chains = [], []
    for src, lins in by_source.items():
        g = _Group(lins, src)
        if src.op == "call_function" and src.target in NORM_OPS:
            consumers = _linear_consumers(src)
            if not _norm_params_ok(src):
                g.why = "norm parameters computed in the graph"
            elif consumers is None or set(consumers) != set(lins):
                g.why = "the norm has other consumers (a residual, or a layer this pass leaves alone)"
            else:
                g.fold, g.norm = "norm", src
        elif len(lins) == 1:
            found = _producer_chain(lins[0], mode)
            if found is None:
                g.why = "no producer absorbs it (a nonlinearity or a shared input)"
            else:
                p, nodes = found
                d = decision_of(p)
                if d is None or not d.quantized:
                    g.why = "the producer linear is kept float"
                elif not _params_ok(p):
                    g.why = "the producer's bias is computed in the graph"
                else:
                    chains.append((p, nodes, lins[0]))
                    g.fold, g.producer = "linear", p
        else:
            g.why = "linears share an input no op can absorb"
        groups.append(g)
    maps = _channel_maps(gm, ctx, chains)
    for g in groups:
        if g.fold == "linear":
            g.index = maps.get(g.linears[0].name)
            if g.index is None:
                g.fold, g.producer, g.why = "channel_scale", None, "the producer's channels do not map one to one"
    return groups


# ----------------------------------------------------------------------------- rewriting helpers
def _set_arg(gm: fx.GraphModule, node: fx.Node, idx: int, new: Any, kwarg: str | None = None) -> None:
    """Replace argument ``idx`` (or keyword ``kwarg`` when the node passes it so) of ``node``,
    dropping the get_attr it replaces when nothing else reads it."""
    if kwarg is not None and kwarg in node.kwargs:
        old = node.kwargs[kwarg]
        node.update_kwarg(kwarg, new)
    else:
        args = list(node.args) + [None] * max(0, idx + 1 - len(node.args))
        old, args[idx] = args[idx], new
        node.args = tuple(args)
    if isinstance(old, fx.Node) and old.op == "get_attr" and not old.users:
        gm.graph.erase_node(old)


def _bind_attr(gm: fx.GraphModule, name: str, value: torch.Tensor, before: fx.Node) -> fx.Node:
    """A get_attr for ``name`` (created with ``value``) placed before ``before``: at load the
    recorded names are re-used exactly, so the artifact's state dict fits."""
    set_attr(gm, name, value)
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(name)


def _bias_of(gm: fx.GraphModule, lin: fx.Node, rows: int) -> torch.Tensor:
    """The linear's bias in float64 (zeros when it has none)."""
    bias = _linear_bias_node(lin)
    return get_attr(gm, bias.target).double() if bias is not None else torch.zeros(rows, dtype=torch.float64)


def _base(node: fx.Node, suffix: str) -> str:
    return f"{module_path(node) or node.name}.{suffix}"


def _set_bias(gm: fx.GraphModule, lin: fx.Node, value: torch.Tensor, tag: str) -> str:
    new = add_get_attr(gm, _base(lin, f"bias_{tag}"), value, before=lin)
    _set_arg(gm, lin, 2, new, kwarg="bias")
    return new.target


def _set_weight(gm: fx.GraphModule, lin: fx.Node, value: torch.Tensor, tag: str) -> str:
    new = add_get_attr(gm, lin.args[1].target + f"_{tag}", value, before=lin)
    _set_arg(gm, lin, 1, new)
    return new.target


def _insert_channel_scale(gm: fx.GraphModule, linears: Sequence[fx.Node], scale_name: str,
                          value: torch.Tensor | None = None) -> None:
    """``x → channel_scale(x, scale)`` before each linear (one node per distinct input)."""
    made: dict[fx.Node, fx.Node] = {}
    for lin in linears:
        x = lin.args[0]
        if x not in made:
            first = min((u for u in x.users if u in linears), key=_position(gm))
            if value is not None:
                set_attr(gm, scale_name, value)
            with gm.graph.inserting_before(first):
                scale = gm.graph.get_attr(scale_name)
                cs = gm.graph.call_function(CHANNEL_SCALE, (x, scale))
            if "val" in x.meta:
                cs.meta["val"] = x.meta["val"]
            cs.meta[MODULE_PATH] = module_path(lin)
            made[x] = cs
        lin.update_arg(0, made[x])


def _position(gm: fx.GraphModule) -> Callable[[fx.Node], int]:
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return order.__getitem__


def _f(x: Any) -> float:
    return float(f"{float(x):.6g}")


def _record(node: fx.Node, name: str, info: dict[str, Any]) -> None:
    decision = decision_of(node)
    set_decision(node, decision.replace(extras={**decision.extras, name: info}))


# ----------------------------------------------------------------------------- scale passes
