"""Which input dimensions a trace keeps dynamic.

Batch and sequence are marked explicitly with named ``torch.export.Dim``s, shared across the
inputs that must agree: ``batch`` is dim 0 of every tensor whose dim 0 has the first tensor
input's size, ``seq`` dim 1 of every token-shaped (2-D integer) tensor whose dim 1 has the first
such tensor's size. Every other dimension is ``Dim.AUTO`` (export keeps it dynamic where the model
allows, static otherwise). torch.export specializes an example dimension of size 1, so a named
dimension of size 1 is traced on the example repeated to size 2: the program traced for sizes
≥ 2 also serves size 1, since named dimensions range over 0..∞ (tests check outputs at size 1).
Where the model bounds a named dimension (BERT: 512 positions), torch's suggested fix refines it.
Where a named sequence dimension fails without a fix (torch 2.11 cannot prove Llama's
``min(16*s, 32*s) == 16*s`` for ``s >= 0``), batch alone is named and sequence is ``Dim.AUTO``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.export import Dim
from torch.export.dynamic_shapes import refine_dynamic_shapes_from_suggested_fixes

BATCH, SEQ = "batch", "seq"


@dataclass
class DynamicPlan:
    """A ``dynamic_shapes`` argument and the inputs to trace with (size-1 named dims repeated)."""

    spec: dict[str, Any]
    args: tuple
    kwargs: dict[str, Any]
    named: tuple[str, ...]
    """The dimensions marked with named Dims in ``spec`` (``(BATCH, SEQ)``, ``(BATCH,)`` or none):
    those asked for that some input has."""


def _is_token_shaped(t: torch.Tensor) -> bool:
    return t.dim() == 2 and not t.is_floating_point() and not t.is_complex()


def plan_dynamic(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any], *,
                 named: tuple[str, ...] = (BATCH, SEQ)) -> DynamicPlan:
    """Named Dims for the ``named`` ones of batch and seq, ``Dim.AUTO`` elsewhere (``named=()``:
    ``Dim.AUTO`` everywhere, on the inputs as given)."""
    sig = inspect.signature(model.forward)
    bound = sig.bind(*args, **kwargs)
    tensors = [x for x in pytree.tree_leaves(dict(bound.arguments)) if isinstance(x, torch.Tensor)]
    first = next((t for t in tensors if t.dim() >= 1), None)
    token = next((t for t in tensors if _is_token_shaped(t)), None)
    dims = {BATCH: Dim(BATCH), SEQ: Dim(SEQ)}

    def named_dims(t: torch.Tensor) -> dict[int, str]:
        out = {}
        if BATCH in named and first is not None and t.dim() >= 1 and t.shape[0] == first.shape[0]:
            out[0] = BATCH
        if SEQ in named and token is not None and _is_token_shaped(t) and t.shape[1] == token.shape[1]:
            out[1] = SEQ
        return out

    used: set[str] = set()

    def spec(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return None
        marked = named_dims(x)
        used.update(marked.values())
        return {i: dims[marked[i]] if i in marked else Dim.AUTO for i in range(x.dim())}

    def widen(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        for d in named_dims(x):
            if x.shape[d] == 1:
                x = torch.cat([x, x], dim=d)
        return x

    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out[name] = {k: pytree.tree_map(spec, v) for k, v in value.items()}
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            out[name] = tuple(pytree.tree_map(spec, v) for v in value)
        else:
            out[name] = pytree.tree_map(spec, value)
    trace_args, trace_kwargs = pytree.tree_map(widen, (tuple(args), dict(kwargs)))
    return DynamicPlan(out, trace_args, trace_kwargs, tuple(n for n in named if n in used))


def refine(plan: DynamicPlan, error: BaseException) -> DynamicPlan | None:
    """``plan`` with torch's suggested fixes for a constraint violation applied (bounds such as
    ``seq <= 512``); ``None`` when there are none, or when a fix makes a named dim static (then
    the caller traces the inputs as given, so that the static size is the user's, not the
    repeated one)."""
    text = str(error)
    if "Suggested fixes:" not in text:
        return None
    fixes = "Suggested fixes:" + text.split("Suggested fixes:", 1)[1].split("\n\n", 1)[0]
    try:
        spec = refine_dynamic_shapes_from_suggested_fixes(fixes, plan.spec)
    except Exception:  # noqa: BLE001 - an unparsable suggestion means no refinement
        return None
    before, after = pytree.tree_leaves(plan.spec), pytree.tree_leaves(spec)
    if len(before) != len(after) or any(isinstance(b, Dim) and not isinstance(a, Dim) for b, a in zip(before, after)):
        return None
    if repr(spec) == repr(plan.spec):
        return None
    return DynamicPlan(spec, plan.args, plan.kwargs, plan.named)
