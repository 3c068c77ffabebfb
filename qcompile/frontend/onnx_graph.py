"""The ONNX graph the importer executes: constants folded, linears and norms recognized, named.

- Initializers, ``Constant`` nodes and every node whose inputs are all constant are evaluated at
  import time with the op table (``onnx_ops``); a constant remembers the initializer it is a
  relayout of (``Identity``/``Transpose``/same-type ``Cast``), so a weight folded through a
  ``Transpose`` is still known by its initializer.
- ``MatMul(x, W)`` (+ ``Add(b)``) and ``Gemm(x, W, b)`` with a constant 2-D ``W`` become
  ``qcompile.Linear`` nodes; ``LayerNormalization``, ``SimplifiedLayerNormalization``,
  ``RMSNormalization`` over the last axis and the decomposed forms exporters write
  (``ReduceMean``/``Sub``/``Pow``/``Sqrt``/``Div``…) become ``qcompile.LayerNorm`` /
  ``qcompile.RMSNorm`` nodes. The importer turns these into ``nn.Linear`` and norm modules.
- Module paths: torch.onnx's dynamo exporter records each node's module scope
  (``pkg.torch.onnx.name_scopes``), the TorchScript exporter writes it into node names
  (``/encoder/layer.0/attention/self/query/MatMul``); otherwise the initializer names say it
  (``encoder.layer.0.attention.self.query.weight``).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from qcompile.frontend.onnx_load import SCOPE_KEY
from qcompile.frontend.onnx_ops import NOT_FOLDED, OPS, OpContext, UnsupportedOnnxNode
from qcompile.frontend.onnx_values import HostTensor, to_tensor

LINEAR, LAYER_NORM, RMS_NORM = "qcompile.Linear", "qcompile.LayerNorm", "qcompile.RMSNorm"
_RELAYOUT = ("Identity", "Transpose", "Cast")


@dataclass
class Node:
    """One node as the importer runs it (``attrs`` as Python values; ``""`` marks an absent input)."""

    op_type: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any]
    scope: str | None = None
    """The module path the exporter recorded for the node, if any."""

    def describe(self, opset: int) -> str:
        return f"node {self.name or '(unnamed)'!r} ({self.op_type}, opset {opset})"


@dataclass
class Origin:
    """A constant that is initializer ``name``, transposed (2-D) or not."""

    name: str
    transposed: bool = False


@dataclass
class Graph:
    """The runtime part of an ONNX graph and the constants it reads."""

    inputs: list[str]
    outputs: list[str]
    nodes: list[Node]
    consts: dict[str, torch.Tensor]
    origins: dict[str, Origin]
    initializers: set[str]
    opset: int
    notes: list[str] = field(default_factory=list)
    deps: dict[str, set[str]] = field(default_factory=dict)
    """Constant name → the initializers it is computed from."""


def attribute_values(node: Any, where: str, tensor_from_proto: Any) -> dict[str, Any]:
    import onnx

    out = {}
    for a in node.attribute:
        if a.type == onnx.AttributeProto.TENSOR:
            out[a.name] = tensor_from_proto(a.t, where)
        elif a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            raise UnsupportedOnnxNode(f"{where}: node {node.name!r} ({node.op_type}) has a subgraph attribute "
                                      f"{a.name!r}: control flow is not supported")
        else:
            v = onnx.helper.get_attribute_value(a)
            out[a.name] = v.decode() if isinstance(v, bytes) else [x.decode() if isinstance(x, bytes) else x for x in v] \
                if isinstance(v, list) and v and isinstance(v[0], bytes) else v
    return out


def node_scope(node: Any) -> str | None:
    """The module path an exporter recorded for ``node`` (dynamo metadata, or a TorchScript-style name)."""
    for p in node.metadata_props:
        if p.key == SCOPE_KEY:
            try:
                scopes = ast.literal_eval(p.value)
            except (ValueError, SyntaxError):
                return None
            if isinstance(scopes, list) and len(scopes) >= 2 and all(isinstance(s, str) for s in scopes):
                return scopes[-2]
            return None
    if node.name.startswith("/") and node.name.count("/") >= 2:
        return ".".join(node.name.split("/")[1:-1])
    return None


def constant_value(node: Any, where: str, tensor_from_proto: Any) -> torch.Tensor:
    attrs = attribute_values(node, where, tensor_from_proto)
    if "value" in attrs:
        return attrs["value"]
    for key, dtype in (("value_float", torch.float32), ("value_floats", torch.float32), ("value_int", torch.int64),
                       ("value_ints", torch.int64)):
        if key in attrs:
            return torch.tensor(attrs[key], dtype=dtype)
    raise UnsupportedOnnxNode(f"{where}: Constant node {node.name!r} holds {', '.join(attrs) or 'nothing'}; only "
                              "tensor and numeric values are supported")


def fold_constants(nodes: list[Node], consts: dict[str, torch.Tensor], origins: dict[str, Origin],
                   where: str, opset: int, deps: dict[str, set[str]]) -> list[Node]:
    """Evaluate every node whose inputs are all constants (in place into ``consts``, with the
    initializers each result comes from in ``deps``); return the nodes left to run."""
    runtime = []
    ctx = OpContext(torch.device("cpu"))
    for node in nodes:
        present = [i for i in node.inputs if i]
        if node.op_type in NOT_FOLDED or not all(i in consts for i in present):
            runtime.append(node)
            continue
        ctx.node = f"{where}: {node.describe(opset)}"
        inputs = [consts[i] if i else None for i in node.inputs]
        try:
            out = OPS[node.op_type](ctx, inputs, node.attrs)
        except UnsupportedOnnxNode:
            raise
        except Exception as e:
            raise UnsupportedOnnxNode(f"{ctx.node} failed on its constant inputs: {type(e).__name__}: {e}") from e
        outs = out if isinstance(out, tuple) else (out,)
        sources = set().union(*(deps.get(i, set()) for i in present))
        for name, value in zip(node.outputs, outs):
            if name:
                consts[name] = to_tensor(value, None) if isinstance(value, HostTensor) else value
                deps[name] = sources
        src = origins.get(node.inputs[0]) if node.inputs else None
        if src is not None and node.op_type in _RELAYOUT and node.outputs and node.outputs[0]:
            value = consts[node.outputs[0]]
            if node.op_type == "Transpose" and value.dim() == 2 and list(node.attrs.get("perm", [1, 0])) == [1, 0]:
                origins[node.outputs[0]] = Origin(src.name, not src.transposed)
            elif node.op_type == "Identity" or (node.op_type == "Cast" and value.dtype == consts[node.inputs[0]].dtype):
                origins[node.outputs[0]] = src
    return runtime


# ----------------------------------------------------------------------------- pattern recognition
class _Uses:
    """Producers and consumer counts of the runtime graph."""

    def __init__(self, nodes: list[Node], outputs: list[str]):
        self.producer = {o: n for n in nodes for o in n.outputs if o}
        self.count: dict[str, int] = {}
        self.consumers: dict[str, list[Node]] = {}
        for n in nodes:
            for i in n.inputs:
                if i:
                    self.count[i] = self.count.get(i, 0) + 1
                    self.consumers.setdefault(i, []).append(n)
        for o in outputs:
            self.count[o] = self.count.get(o, 0) + 1_000  # a graph output is never absorbed

    def only(self, name: str, op_types: tuple[str, ...], uses: int = 1) -> Node | None:
        """The producer of ``name`` if it is one of ``op_types`` and ``name`` has exactly ``uses`` uses."""
        node = self.producer.get(name)
        if node is None or node.op_type not in op_types or self.count.get(name, 0) != uses:
            return None
        return node


def _const_scalar(consts: dict, name: str) -> float | None:
    t = consts.get(name)
    if t is None or t.numel() != 1 or not t.is_floating_point() and t.dtype not in (torch.int64, torch.int32):
        return None
    return float(t.reshape(()).item()) if not t.is_meta else None


def _last_axis_reduce(node: Node, consts: dict) -> bool:
    """A ReduceMean over the last axis only, keeping it."""
    if node.op_type != "ReduceMean" or not node.attrs.get("keepdims", 1):
        return False
    if "axes" in node.attrs:
        axes = list(node.attrs["axes"])
    elif len(node.inputs) > 1 and node.inputs[1] in consts:
        axes = consts[node.inputs[1]].reshape(-1).tolist()
    else:
        return False
    return axes == [-1]


def _other(node: Node, name: str) -> str | None:
    """The other input of a binary node one of whose inputs is ``name``."""
    a, b = node.inputs[:2]
    return b if a == name else a if b == name else None


def _squared(uses: _Uses, name: str, consts: dict) -> str | None:
    """The x of ``Pow(x, 2)`` / ``Mul(x, x)`` producing ``name`` (used once)."""
    node = uses.only(name, ("Pow", "Mul"))
    if node is None:
        return None
    if node.op_type == "Pow" and _const_scalar(consts, node.inputs[1]) == 2.0:
        return node.inputs[0]
    if node.op_type == "Mul" and node.inputs[0] == node.inputs[1]:
        return node.inputs[0]
    return None


def _root_mean(uses: _Uses, sqrt_out: str, consts: dict) -> tuple[str, float, list[Node]] | None:
    """``Sqrt(ReduceMean_last(v) + eps)`` producing ``sqrt_out``: (v, eps, nodes)."""
    sqrt = uses.only(sqrt_out, ("Sqrt",))
    add = uses.only(sqrt.inputs[0], ("Add",)) if sqrt else None
    if add is None:
        return None
    for mean_out, eps_name in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
        eps = _const_scalar(consts, eps_name)
        mean = uses.only(mean_out, ("ReduceMean",))
        if eps is not None and mean is not None and _last_axis_reduce(mean, consts):
            return mean.inputs[0], eps, [sqrt, add, mean]
    return None


def _normalized(uses: _Uses, node: Node | None, consts: dict) -> tuple[str, str, float, list[Node]] | None:
    """``node`` as ``x / Sqrt(...)`` or ``x * Reciprocal(Sqrt(...))`` / ``x * (1 / Sqrt(...))``:
    (x, the value squared inside, eps, nodes)."""
    if node is None or node.op_type not in ("Div", "Mul"):
        return None
    candidates = []
    if node.op_type == "Div":
        candidates.append((node.inputs[0], node.inputs[1], []))
    else:
        for x, r in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
            recip = uses.only(r, ("Reciprocal", "Div"))
            if recip is None:
                continue
            if recip.op_type == "Reciprocal":
                candidates.append((x, recip.inputs[0], [recip]))
            elif _const_scalar(consts, recip.inputs[0]) == 1.0:
                candidates.append((x, recip.inputs[1], [recip]))
    for x, sqrt_out, extra in candidates:
        found = _root_mean(uses, sqrt_out, consts)
        if found is None:
            continue
        squared = _squared(uses, found[0], consts)
        if squared is not None:
            return x, squared, found[1], [node, *extra, *found[2], uses.producer[found[0]]]
    return None


def _weight_const(consts: dict, name: str) -> bool:
    t = consts.get(name)
    return t is not None and t.dim() == 1 and t.is_floating_point()


def recognize_norms(graph: Graph) -> int:
    """Replace the norm patterns (module docstring) by norm nodes; returns how many."""
    uses = _Uses(graph.nodes, graph.outputs)
    consts = graph.consts
    replaced: dict[int, Node] = {}
    absorbed: set[int] = set()
    for node in reversed(graph.nodes):  # pattern ends first: the largest match wins
        if id(node) in absorbed:
            continue
        found = _native_norm(node, consts) or _rms_pattern(uses, node, consts) or _layer_norm_pattern(uses, node, consts)
        if found is None:
            continue
        new, covered = found
        if any(id(n) in absorbed or id(n) in replaced for n in covered):
            continue
        replaced[id(node)] = new
        absorbed.update(id(n) for n in covered if n is not node)
    graph.nodes = [replaced.get(id(n), n) for n in graph.nodes if id(n) not in absorbed]
    return len(replaced)


def _native_norm(node: Node, consts: dict) -> tuple[Node, list[Node]] | None:
    if node.op_type not in ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization"):
        return None
    if node.attrs.get("axis", -1) != -1 or not _weight_const(consts, node.inputs[1]):
        return None
    if len([o for o in node.outputs if o]) > 1:
        return None
    bias = node.inputs[2] if node.op_type == "LayerNormalization" and len(node.inputs) > 2 and node.inputs[2] else None
    if bias is not None and not _weight_const(consts, bias):
        return None
    kind = LAYER_NORM if node.op_type == "LayerNormalization" else RMS_NORM
    attrs = {"epsilon": float(node.attrs.get("epsilon", 1e-5)), "weight": node.inputs[1], "bias": bias,
             "stash": node.op_type != "LayerNormalization" and node.attrs.get("stash_type", 1) == 1}
    return Node(kind, node.name, [node.inputs[0]], node.outputs[:1], attrs, node.scope), [node]


def _rms_pattern(uses: _Uses, node: Node, consts: dict) -> tuple[Node, list[Node]] | None:
    """``W * [Cast](x * 1/sqrt(mean(x², -1) + eps))`` (either operand order; Div forms too)."""
    if node.op_type != "Mul":
        return None
    for w, y in _operand_orders(node):
        if not _weight_const(consts, w):
            continue
        cast = uses.only(y, ("Cast",))
        inner = cast.inputs[0] if cast is not None else y
        found = _normalized(uses, uses.only(inner, ("Div", "Mul")), consts)
        if found is None or found[0] != found[1]:
            continue
        x, _, eps, covered = found
        attrs = {"epsilon": eps, "weight": w, "bias": None, "stash": False,
                 "cast_to": cast.attrs["to"] if cast is not None else None}
        return Node(RMS_NORM, node.name, [x], node.outputs[:1], attrs, node.scope), \
            [node, *([cast] if cast is not None else []), *covered]
    return None


def _layer_norm_pattern(uses: _Uses, node: Node, consts: dict) -> tuple[Node, list[Node]] | None:
    """``(x - mean(x)) / sqrt(mean((x - mean(x))², -1) + eps) [* W] [+ B]`` ending at ``node``."""
    weight = bias = None
    covered: list[Node] = []
    cur: Node | None = node
    if cur.op_type == "Add":
        pair = next(((b, r) for b, r in _operand_orders(cur) if _weight_const(consts, b)
                     and uses.only(r, ("Mul", "Div"))), None)
        if pair is None:
            return None
        bias, covered, cur = pair[0], [cur], uses.producer[pair[1]]
    if cur.op_type == "Mul":
        pair = next(((w, r) for w, r in _operand_orders(cur) if _weight_const(consts, w)
                     and uses.only(r, ("Mul", "Div"))), None)
        if pair is not None:
            weight, covered, cur = pair[0], [*covered, cur], uses.producer[pair[1]]
    found = _normalized(uses, cur, consts)
    if found is None or found[0] != found[1]:
        return None
    centered, _, eps, inner = found
    sub = uses.only(centered, ("Sub",), uses=2)
    mean = uses.producer.get(sub.inputs[1]) if sub is not None else None
    if mean is None or not _last_axis_reduce(mean, consts) or mean.inputs[0] != sub.inputs[0] \
            or uses.count.get(sub.inputs[1], 0) != 1:
        return None
    attrs = {"epsilon": eps, "weight": weight, "bias": bias, "stash": False}
    return Node(LAYER_NORM, node.name, [sub.inputs[0]], node.outputs[:1], attrs, node.scope), \
        [node, *covered, *inner, sub, mean]


def _operand_orders(node: Node) -> tuple[tuple[str, str], tuple[str, str]]:
    a, b = node.inputs[:2]
    return (a, b), (b, a)


def recognize_linears(graph: Graph) -> int:
    """Replace ``MatMul``(+``Add``) / ``Gemm`` with a constant 2-D float weight by linear nodes."""
    uses = _Uses(graph.nodes, graph.outputs)
    consts = graph.consts
    replaced: dict[int, Node] = {}
    absorbed: set[int] = set()
    for node in graph.nodes:
        if node.op_type == "MatMul":
            found = _matmul_linear(uses, node, consts)
        elif node.op_type == "Gemm":
            found = _gemm_linear(node, consts)
        else:
            continue
        if found is None:
            w = node.inputs[1] if len(node.inputs) > 1 else ""
            if w in consts and consts[w].is_floating_point():
                graph.notes.append(f"{node.describe(graph.opset)}: a constant weight of shape {list(consts[w].shape)} "
                                   "that is not a 2-D right operand: kept as a float matmul (not a quantizable linear)")
            continue
        new, covered = found
        replaced[id(node)] = new
        absorbed.update(id(n) for n in covered if n is not node)
    graph.nodes = [replaced.get(id(n), n) for n in graph.nodes if id(n) not in absorbed]
    return len(replaced)


def _matrix(consts: dict, name: str) -> bool:
    t = consts.get(name)
    return t is not None and t.dim() == 2 and t.is_floating_point()


def _matmul_linear(uses: _Uses, node: Node, consts: dict) -> tuple[Node, list[Node]] | None:
    x, w = node.inputs[:2]
    if x in consts or not _matrix(consts, w):
        return None
    n_out = consts[w].shape[1]
    attrs = {"weight": w, "transposed": True, "bias": None, "alpha": 1.0, "beta": 1.0}
    out, covered = node.outputs[0], [node]
    add = _single_consumer(uses, out, "Add")
    if add is not None:
        b = _other(add, out)
        t = consts.get(b) if b is not None else None
        if t is not None and t.is_floating_point() and tuple(t.shape) == (n_out,):
            attrs["bias"] = b
            out, covered = add.outputs[0], [node, add]
    return Node(LINEAR, node.name, [x], [out], attrs, node.scope), covered


def _single_consumer(uses: _Uses, name: str, op_type: str) -> Node | None:
    if uses.count.get(name, 0) != 1:
        return None
    return next((n for n in uses.consumers.get(name, []) if n.op_type == op_type), None)


def _gemm_linear(node: Node, consts: dict) -> tuple[Node, list[Node]] | None:
    a, b = node.inputs[:2]
    c = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] else None
    if a in consts or node.attrs.get("transA", 0) or not _matrix(consts, b):
        return None
    transposed = not node.attrs.get("transB", 0)
    n_out = consts[b].shape[1] if transposed else consts[b].shape[0]
    if c is not None:
        t = consts.get(c)
        if t is None or not t.is_floating_point() or tuple(t.shape) not in ((n_out,), (1, n_out)):
            return None
    attrs = {"weight": b, "transposed": transposed, "bias": c, "alpha": float(node.attrs.get("alpha", 1.0)),
             "beta": float(node.attrs.get("beta", 1.0))}
    return Node(LINEAR, node.name, [a], node.outputs[:1], attrs, node.scope), [node]


# ----------------------------------------------------------------------------- names
_COMPONENT = re.compile(r"[^0-9A-Za-z_]")


def clean_path(path: str) -> str:
    """``path`` with each dotted component made a valid module name."""
    parts = [_COMPONENT.sub("_", p) or "_" for p in path.split(".")]
    return ".".join(parts)


def is_module_path(name: str) -> bool:
    return bool(name) and all(p and not _COMPONENT.search(p) for p in name.split("."))


def layer_path(node: Node, graph: Graph, weight_attr: str, bias_attr: str | None, fallback: str) -> str:
    """Where a linear or norm goes in the module tree: the exporter's scope, else the weight's
    (or bias's) initializer name without ``.weight`` / ``.bias``, else ``fallback``."""
    if node.scope:
        return clean_path(node.scope)
    for name, suffix in ((node.attrs.get(weight_attr), ".weight"), (node.attrs.get(bias_attr) if bias_attr else None, ".bias")):
        origin = graph.origins.get(name) if name else None
        if origin is not None and origin.name.endswith(suffix) and len(origin.name) > len(suffix):
            return clean_path(origin.name[: -len(suffix)])
    return clean_path(fallback)
