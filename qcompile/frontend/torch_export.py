"""nn.Module → FX GraphModule through torch.export (non-strict)."""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx

from qcompile.frontend.dynamic_shapes import BATCH, SEQ, plan_dynamic, refine
from qcompile.frontend.export_errors import is_dynamic_shape_error, quiet_export, summarize


class ExportError(RuntimeError):
    """torch.export could not trace the model. The message is two lines (exception, failing op,
    the model's source line); the full torch error is ``__cause__``."""


@dataclass
class ExportedModel:
    """The traced graph plus what calling it needs: the example inputs it was traced
    with and keyword arguments the frontend pins (``use_cache=False`` for
    transformers models, whose KV cache lives outside the graph)."""

    gm: fx.GraphModule
    args: tuple
    kwargs: dict
    pinned_kwargs: dict = field(default_factory=dict)
    dynamic: bool = True
    model_class: str = ""
    shape_fallback: str | None = None
    """Why the named batch/sequence dims could not all stay dynamic (the report notes it)."""


def check_finite(model: torch.nn.Module) -> None:
    """Fail early, naming the parameter, rather than quantizing NaNs."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all()):
            kind = "parameter" if name in dict(model.named_parameters()) else "buffer"
            raise ValueError(f"{kind} {name!r} of {type(model).__name__} contains NaN or Inf values")


def pinned_kwargs_for(model: torch.nn.Module, kwargs: dict) -> dict:
    """transformers models return a DynamicCache when ``use_cache`` is on; the
    compiled graph is the stateless forward, so pin it off unless the user chose."""
    config = getattr(model, "config", None)
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    if config is not None and getattr(config, "use_cache", False) and "use_cache" in params and "use_cache" not in kwargs:
        return {"use_cache": False}
    return {}


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """Trace in eval mode without leaving the user's module changed."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def _var_keyword_items(model: torch.nn.Module, kwargs: dict) -> dict:
    """The keyword arguments that ``forward`` takes through ``**kwargs``."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return {}
    return {k: v for k, v in kwargs.items() if k not in params}


def _holds_tensor(value: Any) -> bool:
    return any(isinstance(x, torch.Tensor) for x in pytree.tree_leaves(value))


@contextlib.contextmanager
def _bound_forward(model: torch.nn.Module, constants: dict):
    """Constants passed through ``**kwargs`` bound into ``forward`` for the trace (the graph is
    specialized on them anyway): torch.export 2.13 mismatches ``**kwargs`` entries against
    ``dynamic_shapes``. The instance attribute is removed afterwards."""
    if not constants:
        yield
        return
    had = "forward" in vars(model)
    previous = vars(model).get("forward")
    model.forward = functools.partial(model.forward, **constants)
    try:
        yield
    finally:
        if had:
            model.forward = previous
        else:
            del model.forward


def export_model(
    model: torch.nn.Module, args: tuple, kwargs: dict | None = None, dynamic: bool = True
) -> ExportedModel:
    """Trace ``model(*args, **kwargs)`` into an ATen-level GraphModule whose weights
    are attributes and whose nodes carry their source module paths.

    ``dynamic``: batch and sequence dimensions are traced dynamic whatever the example's sizes
    (``frontend/dynamic_shapes.py``); where the model needs one static, export is retried with
    ``Dim.AUTO`` (the model's own choice) and then with static shapes, each with a warning, but
    only when the failure is about dynamic shapes. Any other failure is an :class:`ExportError`
    naming the exception, the failing op and the model's source line.
    A model with tensors on the meta device (an architecture skeleton, for re-tracing a compiled
    model) is traced on meta copies of the inputs (fake tensors must share a device); the device
    constants the trace records become the inputs' device.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"qcompile compiles torch.nn.Module instances, got {type(model).__name__}")
    args = args if isinstance(args, tuple) else (args,)
    kwargs = dict(kwargs or {})
    check_finite(model)
    pinned = pinned_kwargs_for(model, kwargs)
    kwargs.update(pinned)
    name = f"{type(model).__module__}.{type(model).__name__}"
    extra = _var_keyword_items(model, kwargs)
    baked = {k: v for k, v in extra.items() if not _holds_tensor(v)}
    if dynamic and len(baked) < len(extra):
        warnings.warn(f"{type(model).__name__}: tensors passed through **kwargs ({', '.join(sorted(set(extra) - set(baked)))}) "
                      "cannot be given dynamic dimensions (torch.export 2.13 mismatches **kwargs in dynamic_shapes): "
                      "traced with static shapes", stacklevel=2)
        dynamic = False
    kwargs = {k: v for k, v in kwargs.items() if k not in baked}
    skeleton = any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    trace_args, trace_kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.to("meta"), (args, kwargs)) \
        if skeleton else (args, kwargs)
    with _eval_mode(model), _bound_forward(model, baked), torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)  # torch-internal noise
        ep, used_dynamic, fallback = export_with_fallbacks(model, trace_args, trace_kwargs, dynamic)
    gm = ep.module()
    if skeleton:
        _retarget_meta_devices(gm, _input_device(args, kwargs))
    return ExportedModel(gm, args, kwargs, pinned, used_dynamic, name, fallback)


def _export(model: torch.nn.Module, args: tuple, kwargs: dict, spec: dict | None) -> torch.export.ExportedProgram:
    with quiet_export():
        return torch.export.export(model, args, kwargs, dynamic_shapes=spec, strict=False)


def export_with_fallbacks(model: torch.nn.Module, args: tuple, kwargs: dict, dynamic: bool
                           ) -> tuple[torch.export.ExportedProgram, bool, str | None]:
    """(program, traced with dynamic dims, why a fallback was taken or None)."""
    name = type(model).__name__
    reason = None
    if dynamic:
        plans = [plan_dynamic(model, args, kwargs)]
        while plans:
            plan = plans.pop(0)
            try:
                return _export(model, plan.args, plan.kwargs, plan.spec), True, reason
            except Exception as e:
                if not is_dynamic_shape_error(e):
                    raise ExportError(f"torch.export could not trace {name} ({type(model).__module__}.{name}): "
                                      f"{summarize(e)}") from e
                refined = refine(plan, e) if plan.named else None
                if refined is not None:
                    plans.insert(0, refined)
                    continue
                reason = _first_line(e)
                if plan.named == (BATCH, SEQ):  # torch 2.11 fails Llama's named sequence dim with no fix
                    plans.append(plan_dynamic(model, args, kwargs, named=(BATCH,)))
                elif plan.named:
                    warnings.warn(f"{name}: batch/sequence dimensions cannot all stay dynamic ({reason}); traced "
                                  "again with the dimensions the model allows dynamic (the report notes which are "
                                  "static)", stacklevel=3)
                    plans.append(plan_dynamic(model, args, kwargs, named=()))
                else:
                    warnings.warn(f"{name}: export with dynamic shapes failed ({reason}); retrying with the example "
                                  "input shapes fixed: the compiled model will accept only those shapes", stacklevel=3)
    try:
        return _export(model, args, kwargs, None), False, reason
    except Exception as e:
        raise ExportError(f"torch.export could not trace {name} ({type(model).__module__}.{name}): {summarize(e)}") from e


def _first_line(e: BaseException) -> str:
    """One line: the guard a constraint violation names, else the message's first line."""
    text = str(e).strip()
    dims = re.search(r"Constraints violated \(([^)]*)\)", text)
    constant = re.search(r"specialized it to be a constant \((\d+)\)", text)
    if dims and constant:
        return f"the model's code fixes {dims.group(1)} at {constant.group(1)}"
    guard = re.search(r"satisfy the generated guard (.+)", text)
    if guard:
        return f"the model's code requires {guard.group(1).strip()}"
    first = text.splitlines()[0].split(" For more information")[0] if text else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _input_device(args: tuple, kwargs: dict) -> torch.device:
    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    return tensors[0].device if tensors else torch.device("cpu")


def _retarget_meta_devices(gm: fx.GraphModule, device: torch.device) -> None:
    """A skeleton's trace records ``device=meta`` wherever the model creates tensors on its
    weights' device; at run time that is where the inputs (and the compiled tensors) are."""
    def fix(a: Any) -> Any:
        return device if isinstance(a, torch.device) and a.type == "meta" else a

    for node in gm.graph.nodes:
        if node.op == "call_function":
            node.args = fx.node.map_aggregate(node.args, fix)
            node.kwargs = fx.node.map_aggregate(node.kwargs, fix)
    gm.recompile()
