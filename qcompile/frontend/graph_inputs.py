"""What a traced graph accepts, read off its placeholders: the argument form, and per input
dimension whether it is static (and at which size), its allowed range, and which dimensions
share a symbol (must be equal).

Checking a call against this before running the graph turns torch's ``Guard failed:
input.size()[0] == 1`` into an error that names the argument, the dimension and both sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx

from qcompile.frontend.signature import CallForm, CallSignature


@dataclass(frozen=True)
class InputDim:
    """One dimension of one tensor input: ``static`` size, or a ``symbol`` with its range."""

    leaf: int
    label: str
    dim: int
    static: int | None
    symbol: str | None = None
    low: int = 0
    high: float = math.inf

    def describe(self) -> str:
        if self.static is not None:
            return f"argument {self.label} dim {self.dim} is static at {self.static}"
        return f"argument {self.label} dim {self.dim} accepts {self.low} to {self.high:g}"


def traced_inputs(gm: fx.GraphModule) -> tuple[tuple, dict] | None:
    """The ``(args, kwargs)`` a torch.export graph was traced with, as fake tensors and constants
    (``None`` for a graph that does not record them)."""
    spec = getattr(gm, "_in_spec", None)
    if spec is None:
        spec = getattr(getattr(gm.graph, "_codegen", None), "pytree_info", None)
        spec = getattr(spec, "in_spec", None)
    if spec is None:
        return None
    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    try:
        args, kwargs = pytree.tree_unflatten(vals, spec)
    except (ValueError, TypeError):
        return None
    return tuple(args), dict(kwargs)


SPECIALIZATION_FLOOR = 2
"""A lower bound this small is torch.export's 0/1 specialization, not the model's: ``Dim.AUTO``
dimensions get the range [2, ∞) on torch 2.11 while the graph runs sizes 0 and 1 fine (measured on
the H200 image, docs/benchmarks/compile-e2e-h200.md), so it is not enforced."""


def _range(size: torch.SymInt, ranges: dict) -> tuple[str | None, int, float]:
    """Symbol and range of a dynamic size: the program's ``range_constraints`` (what its input
    check enforces), not the tracer's working range (which assumes sizes ≥ 2)."""
    expr = size.node.expr
    if not getattr(expr, "is_Symbol", False):
        return None, 0, math.inf
    vr = ranges.get(expr)
    if vr is None:
        return str(expr), 0, math.inf
    low = int(_bound(vr.lower, 0))
    return str(expr), 0 if low <= SPECIALIZATION_FLOOR else low, _bound(vr.upper, math.inf)


def _bound(x: Any, infinite: float) -> float:
    """A sympy range bound as a number (torch's ``int_oo`` → ``infinite``)."""
    try:
        return int(x) if getattr(x, "is_Integer", False) else infinite
    except (TypeError, ValueError, OverflowError):
        return infinite


@dataclass
class GraphInputs:
    """A graph's argument form and the dimensions of its tensor inputs."""

    form: CallForm
    dims: list[InputDim]

    @classmethod
    def of(cls, gm: fx.GraphModule, signature: CallSignature) -> GraphInputs | None:
        traced = traced_inputs(gm)
        if traced is None:
            return None
        args, kwargs = traced
        form = signature.form_of(args, kwargs)
        dims = []
        leaves, _ = pytree.tree_flatten_with_path((args, kwargs))
        for i, (path, val) in enumerate(leaves):
            if not isinstance(val, torch.Tensor):
                continue
            label = signature.label(form, path)
            for d, size in enumerate(val.shape):
                if isinstance(size, torch.SymInt) and size.node.maybe_as_int() is not None:
                    size = size.node.maybe_as_int()  # specialized by the trace
                if isinstance(size, int):
                    dims.append(InputDim(i, label, d, size))
                else:
                    symbol, low, high = _range(size, getattr(gm, "range_constraints", None) or {})
                    dims.append(InputDim(i, label, d, None, symbol, low, high))
        return cls(form, dims)

    def static_dims(self) -> list[InputDim]:
        return [d for d in self.dims if d.static is not None]

    def limited_dims(self) -> list[InputDim]:
        """Dynamic dimensions with an upper bound (a model limit, e.g. 512 positions)."""
        return [d for d in self.dims if d.static is None and d.high != math.inf]

    def check(self, args: tuple, kwargs: dict[str, Any]) -> None:
        """``ValueError`` naming the argument and dimension where a call's shapes do not fit."""
        leaves = pytree.tree_leaves((args, kwargs))
        seen: dict[str, tuple[InputDim, int]] = {}
        for d in self.dims:
            t = leaves[d.leaf] if d.leaf < len(leaves) else None
            if not isinstance(t, torch.Tensor) or t.dim() <= d.dim:
                continue
            size = int(t.shape[d.dim])
            if d.static is not None:
                if size != d.static:
                    raise ValueError(f"argument {d.label!r} dim {d.dim} has size {size}, but the compiled graph is "
                                     f"static at {d.static} in that dimension (the report's notes say why)")
                continue
            if not d.low <= size <= d.high:
                raise ValueError(f"argument {d.label!r} dim {d.dim} has size {size}; the compiled graph accepts "
                                 f"{d.low} to {d.high:g} there (a limit of the model's code)")
            if d.symbol is not None:
                first = seen.setdefault(d.symbol, (d, size))
                if first[1] != size:
                    raise ValueError(f"argument {d.label!r} dim {d.dim} has size {size}, but {first[0].label!r} dim "
                                     f"{first[0].dim} has size {first[1]}: the compiled graph needs them equal")
