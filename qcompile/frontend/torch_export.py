"""nn.Module → FX GraphModule through torch.export (non-strict)."""

from __future__ import annotations

import contextlib
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx
from torch.export import Dim


class ExportError(RuntimeError):
    """torch.export could not trace the model."""


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


def check_finite(model: torch.nn.Module) -> None:
    """Fail early, naming the parameter, rather than quantizing NaNs."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
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


def _dynamic_shapes(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict:
    """Every tensor dimension ``Dim.AUTO``: export keeps what the model allows dynamic
    (batch, sequence) and specializes the rest."""
    bound = inspect.signature(model.forward).bind(*args, **kwargs)

    def spec(x: Any) -> Any:
        return {i: Dim.AUTO for i in range(x.dim())} if isinstance(x, torch.Tensor) else None

    out = {}
    for name, value in bound.arguments.items():
        kind = inspect.signature(model.forward).parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out[name] = {k: pytree.tree_map(spec, v) for k, v in value.items()}
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            out[name] = tuple(pytree.tree_map(spec, v) for v in value)
        else:
            out[name] = pytree.tree_map(spec, value)
    return out


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


def export_model(
    model: torch.nn.Module, args: tuple, kwargs: dict | None = None, dynamic: bool = True
) -> ExportedModel:
    """Trace ``model(*args, **kwargs)`` into an ATen-level GraphModule whose weights
    are attributes and whose nodes carry their source module paths."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"qcompile compiles torch.nn.Module instances, got {type(model).__name__}")
    args = args if isinstance(args, tuple) else (args,)
    kwargs = dict(kwargs or {})
    check_finite(model)
    pinned = pinned_kwargs_for(model, kwargs)
    kwargs.update(pinned)
    name = type(model).__name__
    ep, used_dynamic = None, False
    with _eval_mode(model), torch.no_grad():
        if dynamic:
            try:
                ep = torch.export.export(model, args, kwargs, dynamic_shapes=_dynamic_shapes(model, args, kwargs), strict=False)
                used_dynamic = True
            except Exception as e:  # noqa: BLE001 - retried statically below, and said so
                warnings.warn(
                    f"{name}: export with dynamic shapes failed ({type(e).__name__}: {str(e).splitlines()[0]}); "
                    "retrying with the example input shapes fixed: the compiled model will accept only those shapes",
                    stacklevel=2,
                )
        if ep is None:
            try:
                ep = torch.export.export(model, args, kwargs, strict=False)
            except Exception as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ExportError(
                    f"torch.export could not trace {name} ({type(model).__module__}.{name}): {first}"
                ) from e
    return ExportedModel(ep.module(), args, kwargs, pinned, used_dynamic, f"{type(model).__module__}.{name}")
