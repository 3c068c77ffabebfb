"""A small declarative pattern matcher over FX graphs.

Patterns are trees written the way the graph reads::

    x, eps = Var("x"), Var("eps")
    rsqrt = Op(aten.rsqrt.default, Op(aten.add.Tensor, Op(aten.mean.dim, Op(aten.pow.Tensor_Scalar, x, 2), [-1], True), eps))

``match(pattern, node)`` returns the bindings (``{"x": node, "eps": 1e-6}``) and
the nodes the pattern covered, or ``None``. A name bound twice must bind the
same thing, which is how a pattern says "the same x feeds both branches".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

aten = torch.ops.aten

CAST_TARGETS = (aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default)


class Pattern:
    """Base class: a pattern matches a node or a literal argument."""


@dataclass(frozen=True)
class Var(Pattern):
    """Matches anything (a node or a literal) and binds it to ``name``."""

    name: str


@dataclass(frozen=True)
class Attr(Pattern):
    """Matches a ``get_attr`` node (a weight) and binds it to ``name``."""

    name: str


@dataclass(frozen=True)
class Op(Pattern):
    """Matches a ``call_function`` node with one of ``targets`` and matching args.

    ``commutative`` tries the first two arguments in both orders; extra trailing
    arguments of the node are allowed only if ``exact_arity`` is False.
    """

    targets: Any
    args: tuple = ()
    commutative: bool = False
    exact_arity: bool = False

    def __init__(self, targets, *args, commutative: bool = False, exact_arity: bool = False):
        targets = targets if isinstance(targets, tuple) else (targets,)
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "args", args)
        object.__setattr__(self, "commutative", commutative)
        object.__setattr__(self, "exact_arity", exact_arity)


@dataclass(frozen=True)
class Cast(Pattern):
    """Matches ``inner`` behind zero or more dtype casts (``.to(dtype)``, ``_to_copy``)."""

    inner: Pattern | Any


@dataclass
class Match:
    root: fx.Node
    bindings: dict[str, Any] = field(default_factory=dict)
    nodes: list[fx.Node] = field(default_factory=list)

    def __getitem__(self, name: str) -> Any:
        return self.bindings[name]


def strip_casts(value: Any) -> Any:
    while isinstance(value, fx.Node) and value.op == "call_function" and value.target in CAST_TARGETS:
        value = value.args[0]
    return value


def match(pattern: Pattern | Any, node: fx.Node) -> Match | None:
    m = Match(root=node)
    return m if _match(pattern, node, m) else None


def find_all(gm: fx.GraphModule, pattern: Pattern) -> list[Match]:
    """Every match rooted at a node, in graph order; overlapping matches are all returned."""
    return [m for node in gm.graph.nodes if (m := match(pattern, node)) is not None]


def _bind(m: Match, name: str, value: Any) -> bool:
    if name in m.bindings:
        return m.bindings[name] is value or m.bindings[name] == value
    m.bindings[name] = value
    return True


def _match(p: Pattern | Any, value: Any, m: Match) -> bool:
    if isinstance(p, Var):
        return _bind(m, p.name, value)
    if isinstance(p, Attr):
        return isinstance(value, fx.Node) and value.op == "get_attr" and _bind(m, p.name, value)
    if isinstance(p, Cast):
        while True:
            snapshot = (dict(m.bindings), list(m.nodes))
            if _match(p.inner, value, m):
                return True
            m.bindings, m.nodes = snapshot
            if not (isinstance(value, fx.Node) and value.op == "call_function" and value.target in CAST_TARGETS):
                return False
            m.nodes.append(value)
            value = value.args[0]
    if isinstance(p, Op):
        if not (isinstance(value, fx.Node) and value.op == "call_function" and value.target in p.targets):
            return False
        args = tuple(value.args)
        if len(args) < len(p.args) or (p.exact_arity and len(args) != len(p.args)):
            return False
        orders = [args]
        if p.commutative and len(args) >= 2:
            orders.append((args[1], args[0], *args[2:]))
        for order in orders:
            snapshot = (dict(m.bindings), list(m.nodes))
            m.nodes.append(value)
            if all(_match(sub, arg, m) for sub, arg in zip(p.args, order)):
                return True
            m.bindings, m.nodes = snapshot
        return False
    if isinstance(p, (list, tuple)):
        return isinstance(value, (list, tuple)) and len(p) == len(value) and all(
            _match(a, b, m) for a, b in zip(p, value)
        )
    return not isinstance(value, fx.Node) and value == p
