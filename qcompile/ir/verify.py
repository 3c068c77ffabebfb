"""Numerical verification of exact passes: same function before and after."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from qcompile.ir.graph import module_path
from qcompile.ir.interpret import inputs_to_float64, run_recording, to_float64


class VerificationError(RuntimeError):
    """An exact pass changed the function the graph computes."""


@dataclass
class Equivalence:
    max_rel_error: float
    dtype: torch.dtype
    worst_output: int


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b|: scale-free and sensitive to any single wrong element."""
    a, b = a.double(), b.double()
    denom = b.abs().max().clamp_min(1e-30)
    return float((a - b).abs().max() / denom)


def _float_outputs(values: list[Any]) -> list[torch.Tensor]:
    return [v for v in values if isinstance(v, torch.Tensor) and v.is_floating_point()]


def compare(
    before: fx.GraphModule, after: fx.GraphModule, args: tuple, kwargs: dict, float64: bool = True
) -> Equivalence:
    """Run both graphs on the same inputs (in float64 when asked) and return the worst
    relative error over their floating outputs."""
    if float64:
        before, after = to_float64(before), to_float64(after)
        args, kwargs = inputs_to_float64(args, kwargs)
    out_a, _ = run_recording(before, args, kwargs, names=())
    out_b, _ = run_recording(after, args, kwargs, names=())
    fa, fb = _float_outputs(out_a), _float_outputs(out_b)
    if len(fa) != len(fb):
        raise VerificationError(f"output count changed: {len(fa)} floating outputs before, {len(fb)} after")
    errors = [relative_error(b, a) for a, b in zip(fa, fb)]
    worst = max(range(len(errors)), key=errors.__getitem__) if errors else 0
    dtype = fa[0].dtype if fa else torch.float64
    return Equivalence(max(errors, default=0.0), dtype, worst)


def first_divergence(
    before: fx.GraphModule, after: fx.GraphModule, args: tuple, kwargs: dict, tol: float
) -> str:
    """Name the first node (in the new graph's order) whose value differs from the
    node of the same name in the old graph: where to look when a pass breaks."""
    before, after = to_float64(before), to_float64(after)
    args, kwargs = inputs_to_float64(args, kwargs)
    _, va = run_recording(before, args, kwargs)
    _, vb = run_recording(after, args, kwargs)
    for node in after.graph.nodes:
        if node.op in ("get_attr", "placeholder"):
            continue  # exact passes legitimately rewrite weights; look at computed values
        a, b = va.get(node.name), vb.get(node.name)
        if (
            isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
            and a.is_floating_point() and a.shape == b.shape
            and relative_error(b, a) > tol
        ):
            where = module_path(node)
            return f"node {node.name} ({node.target}{', ' + where if where else ''}): relative error {relative_error(b, a):.3e}"
    return "no single node differs beyond the tolerance (the error accumulates)"
