"""Calls bound to the model's ``forward`` signature.

A traced graph takes exactly the input structure it was traced with: the same arguments, passed the
same way (positionally or by keyword), the same non-tensor values. :class:`CallSignature` turns any
call the model's ``forward`` accepts into a *structure key* (which arguments are present, tensors by
rank and kind, constants by value; arguments equal to their defaults count as absent, since they
trace the same program) and into the exact argument form a given graph was traced with. So a
compiled model can reuse a graph for every call of the same structure, and knows when it must
re-trace.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

_CONSTANTS = (type(None), bool, int, float, str, torch.dtype, torch.device)
"""Non-tensor argument values a graph can be traced with (specialized by value)."""

PINNED_REASONS = {"use_cache": "transformers' KV cache lives outside the compiled graph"}
"""Why the frontend pins a keyword argument, for the error when a call asks for another value."""


@dataclass(frozen=True)
class CallForm:
    """How a graph takes its inputs: these parameters positionally (then ``var_positional``
    values for ``*args``), these by keyword."""

    positional: tuple[str, ...]
    var_positional: int
    keywords: tuple[str, ...]


@dataclass(frozen=True)
class BoundCall:
    """A call normalized against the signature: the arguments that are present (not equal to
    their defaults) plus the pinned ones, by name; ``*args`` values; and the structure key."""

    values: dict[str, Any]
    var_positional: tuple
    key: tuple

    def describe(self, pinned: Mapping[str, Any]) -> str:
        """``input_ids 2-D, attention_mask 2-D, return_dict=False``: what a graph for this key takes."""
        def one(n: str, v: Any) -> str:
            if isinstance(v, torch.Tensor):
                return f"{n} {v.dim()}-D"
            return n if _is_tensor_like(v) else f"{n}={v!r}"

        parts = [one(n, v) for n, v in self.values.items() if n not in pinned]
        parts += [f"*args[{i}]" for i in range(len(self.var_positional))]
        return ", ".join(parts) or "no arguments"


def _is_tensor_like(v: Any) -> bool:
    return any(isinstance(x, torch.Tensor) for x in pytree.tree_leaves(v))


def _same_constant(value: Any, default: Any) -> bool:
    """``value`` traces the same program as the parameter's default (so it counts as absent)."""
    if default is inspect.Parameter.empty:
        return False
    if value is default:
        return True
    if isinstance(value, torch.Tensor) or isinstance(default, torch.Tensor):
        return False
    return type(value) is type(default) and type(value) in _CONSTANTS and value == default


class CallSignature:
    """A model's ``forward`` signature plus the keyword arguments the frontend pins."""

    def __init__(self, signature: inspect.Signature, pinned: Mapping[str, Any], owner: str):
        self.signature = signature
        self.pinned = dict(pinned)
        self.owner = owner
        params = list(signature.parameters.values())
        self._positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self._var_positional = next((p.name for p in params if p.kind is p.VAR_POSITIONAL), None)
        self._var_keyword = next((p.name for p in params if p.kind is p.VAR_KEYWORD), None)

    @classmethod
    def of(cls, model: torch.nn.Module, pinned: Mapping[str, Any]) -> CallSignature | None:
        """The signature of ``model.forward``; ``None`` where Python cannot inspect it."""
        try:
            sig = inspect.signature(model.forward)
        except (TypeError, ValueError):
            return None
        return cls(sig, pinned, type(model).__name__)

    def bind(self, args: tuple, kwargs: Mapping[str, Any]) -> BoundCall:
        """Normalize a call; ``TypeError`` names an argument ``forward`` does not accept (or a
        value a graph cannot take), ``ValueError`` a pinned argument given another value."""
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{self.owner}.forward(): {e}") from None
        named: dict[str, Any] = {}
        var_positional: tuple = ()
        for name, value in bound.arguments.items():
            param = self.signature.parameters[name]
            if param.kind is param.VAR_POSITIONAL:
                var_positional = tuple(value)
            elif param.kind is param.VAR_KEYWORD:
                named.update(value)
            else:
                named[name] = value
        values: dict[str, Any] = {}
        for name, value in named.items():
            param = self.signature.parameters.get(name)
            default = param.default if param is not None and param.kind is not param.VAR_KEYWORD else inspect.Parameter.empty
            if name in self.pinned:
                if not (_same_constant(value, default) or _same_constant(value, self.pinned[name])):
                    why = PINNED_REASONS.get(name, "the compiled graph was traced with it")
                    raise ValueError(f"{self.owner}: {name}={value!r} is not supported: the compiled model pins "
                                     f"{name}={self.pinned[name]!r} ({why}); omit it or pass {self.pinned[name]!r}")
                continue
            if not _same_constant(value, default):
                values[name] = value
        for name, value in self.pinned.items():
            values[name] = value
        order = {n: i for i, n in enumerate(self.signature.parameters)}
        values = dict(sorted(values.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))
        key = tuple((n, self._structure(n, v)) for n, v in values.items() if n not in self.pinned)
        key += (("*", tuple(self._structure(f"*args[{i}]", v) for i, v in enumerate(var_positional))),)
        return BoundCall(values, var_positional, key)

    def _structure(self, name: str, value: Any) -> tuple:
        leaves, spec = pytree.tree_flatten(value)
        out = []
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                kind = "float" if leaf.is_floating_point() else "bool" if leaf.dtype == torch.bool else "int"
                out.append(("tensor", leaf.dim(), kind))
            elif isinstance(leaf, _CONSTANTS):
                out.append(("const", type(leaf).__name__, leaf))
            else:
                raise TypeError(f"{self.owner}: argument {name!r} holds a {type(leaf).__name__}; a compiled model "
                                "takes tensors, lists/tuples/dicts of tensors, and None/bool/int/float/str values")
        return (repr(spec), tuple(out))

    def form_of(self, args: tuple, kwargs: Mapping[str, Any]) -> CallForm:
        """The form of a traced ``(args, kwargs)`` pair."""
        n = min(len(args), len(self._positional))
        return CallForm(tuple(self._positional[:n]), len(args) - n, tuple(kwargs))

    def trace_form(self, call: BoundCall) -> CallForm:
        """The form a new trace uses: positional-only parameters (and ``*args``) positionally,
        the rest by keyword."""
        if call.var_positional:  # *args binds only after every positional parameter
            positional = tuple(self._positional)
        else:
            only = [n for n in self._positional
                    if self.signature.parameters[n].kind is inspect.Parameter.POSITIONAL_ONLY]
            present = [i for i, n in enumerate(only) if n in call.values]
            positional = tuple(only[:present[-1] + 1]) if present else ()
        keywords = tuple(n for n in call.values if n not in positional)
        return CallForm(positional, len(call.var_positional), keywords)

    def arguments(self, call: BoundCall, form: CallForm) -> tuple[tuple, dict[str, Any]]:
        """``(args, kwargs)`` for a graph of ``form``, from a call with the same key: absent
        arguments the form names get their defaults (which the key treats as the same program)."""
        def value(name: str) -> Any:
            if name in call.values:
                return call.values[name]
            return self.signature.parameters[name].default

        args = tuple(value(n) for n in form.positional) + call.var_positional[:form.var_positional]
        return args, {n: value(n) for n in form.keywords}

    def label(self, form: CallForm, path: tuple) -> str:
        """A user-facing name for the input at pytree ``path`` of a form's ``(args, kwargs)``."""
        top, index, rest = path[0], path[1], path[2:]
        if getattr(top, "idx", None) == 0:
            i = index.idx
            name = form.positional[i] if i < len(form.positional) else f"*args[{i - len(form.positional)}]"
        else:
            name = index.key
        return name + pytree.keystr(rest)
