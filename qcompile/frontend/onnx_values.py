"""Values an imported ONNX graph computes at trace time: tensors, and shape values held as Python.

ONNX computes shapes with tensors (``Shape`` → ``Gather`` → ``Concat`` → ``Reshape``). Under
``torch.export`` a shape read off a tensor is a tuple of ``SymInt``s; turning it into a tensor and
back (``.tolist()``) would be data-dependent and fix every dimension. So what ``Shape`` returns,
and what small integer arithmetic makes of it, stays a :class:`HostTensor`: a 0-d or 1-d tensor
whose elements are Python ints, floats, bools or ``SymInt``s. Ops consume it as a list of ints
(a shape, axes, indices) or, where a real tensor is needed, as one built from its values.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

HOST_MAX_ELEMENTS = 64
"""Integer constants and results up to this many elements (0-d or 1-d) are held as Python values."""


@dataclass(frozen=True)
class HostTensor:
    """A 0-d (``scalar``) or 1-d tensor held as Python values; ``dtype`` is its ONNX element type."""

    values: tuple
    dtype: torch.dtype
    scalar: bool = False

    def __post_init__(self) -> None:
        if self.scalar and len(self.values) != 1:
            raise ValueError(f"a 0-d host tensor holds one value, got {len(self.values)}")

    @property
    def shape(self) -> tuple[int, ...]:
        return () if self.scalar else (len(self.values),)

    @property
    def item(self) -> Any:
        return self.values[0]


Value = torch.Tensor | HostTensor | None


def _py(v: Any, dtype: torch.dtype) -> Any:
    """A Python value of ONNX type ``dtype``: int, float or bool (SymInts kept)."""
    if dtype == torch.bool:
        return v if isinstance(v, torch.SymBool) else bool(v)
    if dtype.is_floating_point:
        return v if isinstance(v, torch.SymFloat) else (torch.sym_float(v) if isinstance(v, torch.SymInt) else float(v))
    if isinstance(v, (torch.SymInt, torch.SymBool)):
        return v if isinstance(v, torch.SymInt) else torch.sym_ite(v, 1, 0)
    return int(v)


def host(values: Sequence[Any], dtype: torch.dtype, scalar: bool = False) -> HostTensor:
    return HostTensor(tuple(_py(v, dtype) for v in values), dtype, scalar)


def is_concrete(v: Any) -> bool:
    return isinstance(v, (int, float, bool)) and not isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool))


def host_from_tensor(t: torch.Tensor) -> HostTensor | None:
    """A small real (not fake, not meta) integer/bool tensor, or a float scalar, as a host value;
    ``None`` when it should stay a tensor."""
    if t.is_meta or t.dim() > 1:
        return None
    if t.is_floating_point() and t.numel() != 1:
        return None
    if t.numel() > HOST_MAX_ELEMENTS or t.is_complex():
        return None
    return host(t.reshape(-1).tolist(), t.dtype, scalar=t.dim() == 0)


def to_tensor(v: Value, device: torch.device | None) -> torch.Tensor:
    """``v`` as a tensor (a host value becomes a tensor of its values on ``device``)."""
    if isinstance(v, torch.Tensor):
        return v
    if isinstance(v, HostTensor):
        t = torch.tensor(list(v.values), dtype=v.dtype, device=device)
        return t.reshape(()) if v.scalar else t
    raise TypeError(f"expected a tensor, got {type(v).__name__}")


def ints(v: Value, what: str) -> list:
    """``v`` as a list of ints (SymInts kept): a shape, axes, starts/ends."""
    if isinstance(v, HostTensor):
        return [int(x) if is_concrete(x) else x for x in v.values]
    if isinstance(v, torch.Tensor):
        return [int(x) for x in v.reshape(-1).tolist()]
    raise TypeError(f"{what}: expected integers, got {type(v).__name__}")


def scalar(v: Value, what: str) -> Any:
    """The single element of ``v`` as a Python number (SymInt kept)."""
    if isinstance(v, HostTensor):
        if len(v.values) != 1:
            raise ValueError(f"{what}: expected one value, got {len(v.values)}")
        return v.values[0]
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{what}: expected one value, got shape {list(v.shape)}")
        return v.reshape(()).item()
    raise TypeError(f"{what}: expected a number, got {type(v).__name__}")


def as_operand(v: Value, other_rank: int, device: torch.device | None) -> Any:
    """An operand for a torch op against a tensor of rank ``other_rank``: a one-element host value
    of rank ≤ that rank becomes a Python scalar (broadcasting cannot change the result's rank),
    anything else a tensor."""
    if isinstance(v, HostTensor) and len(v.values) == 1 and len(v.shape) <= other_rank:
        return v.values[0]
    return to_tensor(v, device)


def host_map(fn: Callable[..., Any], dtype: torch.dtype, *xs: HostTensor) -> HostTensor:
    """Elementwise ``fn`` over host values (broadcasting one-element values against 1-d ones)."""
    n = max(len(x.values) for x in xs)
    if any(len(x.values) not in (1, n) for x in xs):
        raise ValueError(f"cannot broadcast shapes {', '.join(str(list(x.shape)) for x in xs)}")
    cols = [x.values * n if len(x.values) == 1 else x.values for x in xs]
    return host([fn(*row) for row in zip(*cols)], dtype, all(x.scalar for x in xs))


def int_div(a: Any, b: Any) -> Any:
    """ONNX integer Div (truncates toward zero); SymInts are sizes (non-negative): floor division."""
    if is_concrete(a) and is_concrete(b):
        q = abs(a) // abs(b)
        return q if (a >= 0) == (b >= 0) else -q
    return a // b


def int_mod(a: Any, b: Any, fmod: bool) -> Any:
    if fmod:
        return math.fmod(a, b)
    return a % b


HOST_BINARY: dict[str, Callable[[Any, Any], Any]] = {
    "Add": operator.add, "Sub": operator.sub, "Mul": operator.mul,
    "Equal": operator.eq, "Less": operator.lt, "LessOrEqual": operator.le, "Greater": operator.gt,
    "GreaterOrEqual": operator.ge, "And": operator.and_, "Or": operator.or_, "Xor": operator.xor,
}
"""Ops computed on host values elementwise (Div, Mod, Max, Min, Where are handled beside)."""
