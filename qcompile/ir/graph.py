"""Graph helpers every pass uses: where a node came from, which linears there
are, who produces and consumes what, and how to read and replace weights."""

from __future__ import annotations

from collections.abc import Iterator

import networkx as nx
import torch
from torch import fx

from qcompile.ir.ops import LINEAR

MODULE_PATH = "qcompile.module_path"
"""``node.meta`` key holding the dotted source module path (``model.layers.3.mlp.down_proj``)."""
FLOAT_REASON = "qcompile.float_reason"
"""``node.meta`` key on a weight layer the compiler recognizes but cannot quantize (a depthwise
conv, a transposed conv, ...): why it stays float. Set by canonicalization; ``assign_quant_specs``
turns it into a float decision, so the report lists the layer with the reason."""


def module_path(node: fx.Node) -> str:
    """The source module path of a node: set by canonicalization, else read
    from torch.export's ``nn_module_stack``, else ``""``."""
    if MODULE_PATH in node.meta:
        return node.meta[MODULE_PATH]
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return path.removeprefix("L__self__").lstrip(".")
    return ""


def weight_module_path(target: str) -> str:
    """The module path owning a weight attribute: ``"h.0.attn.c_attn"`` for
    ``"h.0.attn.c_attn.weight"``, ``""`` for a root-level ``"weight"`` (a bare ``nn.Linear``)."""
    return target.rpartition(".")[0]


def is_linear(node: fx.Node) -> bool:
    """An ``aten.linear`` whose weight is a graph attribute (a real layer, not x @ y)."""
    return (
        node.op == "call_function"
        and node.target == LINEAR
        and isinstance(node.args[1], fx.Node)
        and node.args[1].op == "get_attr"
    )


def linear_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if is_linear(n)]


def float_layer_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Weight layers left as they are, with a :data:`FLOAT_REASON` (not linears)."""
    return [n for n in gm.graph.nodes if FLOAT_REASON in n.meta]


def linear_weight(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    return get_attr(gm, node.args[1].target)


def linear_bias(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if bias is None:
        return None
    if not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
        raise ValueError(f"linear {node.name}: bias is computed in the graph, not a parameter")
    return get_attr(gm, bias.target)


def get_attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    owner, name = _owner(gm, target)
    return getattr(owner, name)


def set_attr(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    """Replace (or create) a weight. Parameters stay parameters, buffers stay
    buffers; passes never write weights in place, so the user's model is untouched."""
    owner, name = _owner(gm, target, create=True)
    old = getattr(owner, name, None)
    if name in owner._parameters or isinstance(old, torch.nn.Parameter):
        owner._parameters[name] = torch.nn.Parameter(value.detach(), requires_grad=False)
    else:
        owner._parameters.pop(name, None)
        owner.register_buffer(name, value.detach())


def del_attr(gm: fx.GraphModule, target: str) -> None:
    owner, name = _owner(gm, target)
    owner._parameters.pop(name, None)
    owner._buffers.pop(name, None)


def new_attr_name(gm: fx.GraphModule, base: str) -> str:
    """A fresh dotted attribute name next to ``base`` (``base``, ``base_1``, ...)."""
    candidate, i = base, 0
    while _exists(gm, candidate):
        i += 1
        candidate = f"{base}_{i}"
    return candidate


def add_get_attr(gm: fx.GraphModule, target: str, value: torch.Tensor, before: fx.Node) -> fx.Node:
    """Register ``value`` under a fresh name near ``target`` and return a get_attr node for it."""
    name = new_attr_name(gm, target)
    set_attr(gm, name, value)
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(name)


def producers(node: fx.Node) -> list[fx.Node]:
    return list(node.all_input_nodes)


def consumers(node: fx.Node) -> list[fx.Node]:
    return list(node.users)


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """A read-only dataflow view for analysis (regions, dominance, reachability).
    Nodes are fx node names with ``op``, ``target`` and ``module_path`` attributes."""
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        g.add_node(node.name, op=node.op, target=str(node.target), module_path=module_path(node))
        for src in node.all_input_nodes:
            g.add_edge(src.name, node.name)
    return g


def call_nodes(gm: fx.GraphModule, target) -> Iterator[fx.Node]:
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == target:
            yield node


def erase_dead_attrs(gm: fx.GraphModule) -> None:
    """Drop weights no get_attr node reads any more, so memory and artifacts shrink."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used:
            del_attr(gm, name)


def _owner(gm: torch.nn.Module, target: str, create: bool = False) -> tuple[torch.nn.Module, str]:
    *path, name = target.split(".")
    owner = gm
    for part in path:
        if not hasattr(owner, part):
            if not create:
                raise AttributeError(f"graph has no attribute {target!r}")
            owner.add_module(part, torch.nn.Module())
        owner = getattr(owner, part)
        if not isinstance(owner, torch.nn.Module):
            raise AttributeError(f"graph attribute {target!r}: {part!r} is a {type(owner).__name__}, not a module")
    return owner, name


def _exists(gm: torch.nn.Module, target: str) -> bool:
    try:
        owner, name = _owner(gm, target)
    except AttributeError:
        return False
    return hasattr(owner, name)
