"""The ONNX importer's op table: each ONNX op (default domain) as torch ops.

A handler takes ``(ctx, inputs, attrs)``: ``inputs`` are tensors, :class:`HostTensor` shape values
(``onnx_values``) or ``None`` for an absent optional input; ``attrs`` the node's attributes as
Python values. Where every input is a host value (shape arithmetic) the handler computes in
Python, so dynamic sizes stay ``SymInt``s under ``torch.export``; otherwise it emits plain ATen
ops. The same handlers fold constant subgraphs at import time (inputs are then real tensors).
Handlers cover every version of their op from opset 13 up to ``MAX_OPSET`` (attribute → input
moves such as ``ReduceMean``'s ``axes`` at 18 are read in both forms). Shape and indexing ops live
in ``onnx_shape_ops`` (registered into the same :data:`OPS` when this module is imported).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from qcompile.frontend.onnx_values import (
    HOST_BINARY,
    HostTensor,
    Value,
    as_operand,
    host,
    host_map,
    int_div,
    int_mod,
    ints,
    is_concrete,
    scalar,
    to_tensor,
)

MIN_OPSET, MAX_OPSET = 13, 25
"""Default-domain opsets the importer reads (``docs/onnx-import.md``)."""

ONNX_DTYPES: dict[int, torch.dtype] = {
    1: torch.float32, 2: torch.uint8, 3: torch.int8, 4: torch.uint16, 5: torch.int16, 6: torch.int32,
    7: torch.int64, 9: torch.bool, 10: torch.float16, 11: torch.float64, 12: torch.uint32, 13: torch.uint64,
    16: torch.bfloat16,
}
"""ONNX ``TensorProto`` element types the importer maps to torch dtypes."""


class UnsupportedOnnxNode(ValueError):
    """A node uses an op, an attribute value or an input form the importer does not cover."""


@dataclass
class OpContext:
    """What a handler may need besides its inputs: the device new tensors go to, and the node
    (for errors)."""

    device: torch.device | None
    node: str = ""

    def fail(self, why: str) -> UnsupportedOnnxNode:
        return UnsupportedOnnxNode(f"{self.node}: {why}")


Handler = Callable[[OpContext, list, dict], Any]
OPS: dict[str, Handler] = {}


def op(*names: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        for name in names:
            OPS[name] = fn
        return fn
    return register


def _dtype(code: int, ctx: OpContext) -> torch.dtype:
    if code not in ONNX_DTYPES:
        raise ctx.fail(f"element type {code} is not supported (supported: {sorted(ONNX_DTYPES)})")
    return ONNX_DTYPES[code]


def _all_host(xs: list) -> bool:
    return all(isinstance(x, HostTensor) for x in xs if x is not None)


def _rank(x: Value) -> int:
    return len(x.shape) if x is not None else 0


def _tensor(x: Value, ctx: OpContext) -> torch.Tensor:
    return to_tensor(x, ctx.device)


def _axis(a: int, rank: int) -> int:
    return a + rank if a < 0 else a


def _dtype_of(x: Value) -> torch.dtype:
    return x.dtype


# ----------------------------------------------------------------------------- elementwise
_TORCH_BINARY: dict[str, Callable[[Any, Any], torch.Tensor]] = {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul,
    "Equal": torch.eq, "Less": torch.lt, "LessOrEqual": torch.le, "Greater": torch.gt, "GreaterOrEqual": torch.ge,
    "And": lambda a, b: a & b, "Or": lambda a, b: a | b, "Xor": lambda a, b: a ^ b,
}
_COMPARISONS = {"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor"}


def _binary_operands(a: Value, b: Value, ctx: OpContext) -> tuple[Any, Any]:
    """Torch operands for a binary op where at least one side is a tensor (the other may be a scalar)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a, b
    if isinstance(a, torch.Tensor):
        return a, as_operand(b, a.dim(), ctx.device)
    return as_operand(a, b.dim(), ctx.device), b


def _binary(name: str) -> Handler:
    def run(ctx: OpContext, inputs: list, attrs: dict) -> Value:
        a, b = inputs
        if _all_host([a, b]):
            out_dtype = torch.bool if name in _COMPARISONS and name not in ("And", "Or", "Xor") else a.dtype
            if name in ("And", "Or", "Xor"):
                out_dtype = torch.bool
            return host_map(HOST_BINARY[name], out_dtype, a, b)
        x, y = _binary_operands(a, b, ctx)
        if not isinstance(x, torch.Tensor):  # scalar first: torch ops want the tensor first
            if name in ("Add", "Mul", "Equal", "And", "Or", "Xor"):
                return _TORCH_BINARY[name](y, x)
            x = to_tensor(a, ctx.device)
        return _TORCH_BINARY[name](x, y)
    return run


for _name in _TORCH_BINARY:
    OPS[_name] = _binary(_name)


@op("Div")
def _div(ctx: OpContext, inputs: list, attrs: dict) -> Value:
    a, b = inputs
    if _all_host([a, b]):
        fn = (lambda x, y: x / y) if a.dtype.is_floating_point else int_div
        return host_map(fn, a.dtype, a, b)
    x, y = _binary_operands(a, b, ctx)
    if not isinstance(x, torch.Tensor):
        x = to_tensor(a, ctx.device)
    if _dtype_of(a).is_floating_point:
        return torch.div(x, y)
    return torch.div(x, y, rounding_mode="trunc")


@op("Mod")
def _mod(ctx: OpContext, inputs: list, attrs: dict) -> Value:
    a, b = inputs
    fmod = bool(attrs.get("fmod", 0))
    if _all_host([a, b]):
        return host_map(lambda x, y: int_mod(x, y, fmod), a.dtype, a, b)
    x, y = _binary_operands(a, b, ctx)
    x = to_tensor(a, ctx.device) if not isinstance(x, torch.Tensor) else x
    return torch.fmod(x, y) if fmod else torch.remainder(x, y)


@op("Pow")
def _pow(ctx: OpContext, inputs: list, attrs: dict) -> Value:
    a, b = inputs
    if _all_host([a, b]):
        return host_map(lambda x, y: x ** y, a.dtype, a, b)
    base = _tensor(a, ctx)
    exponent = as_operand(b, base.dim(), ctx.device)
    out = torch.pow(base, exponent)
    return out if out.dtype == base.dtype else out.to(base.dtype)


def _variadic(torch_fn: Callable, py_fn: Callable) -> Handler:
    def run(ctx: OpContext, inputs: list, attrs: dict) -> Value:
        xs = [x for x in inputs if x is not None]
        if _all_host(xs):
            return host_map(py_fn, xs[0].dtype, *xs)
        out = _tensor(xs[0], ctx)
        for x in xs[1:]:
            out = torch_fn(out, _tensor(x, ctx))
        return out
    return run


OPS["Max"] = _variadic(torch.maximum, lambda *v: _sym_fold(torch.sym_max, v))
OPS["Min"] = _variadic(torch.minimum, lambda *v: _sym_fold(torch.sym_min, v))
OPS["Sum"] = _variadic(torch.add, lambda *v: sum(v[1:], v[0]))


def _sym_fold(fn: Callable, values: tuple) -> Any:
    out = values[0]
    for v in values[1:]:
        out = (max if fn is torch.sym_max else min)(out, v) if is_concrete(out) and is_concrete(v) else fn(out, v)
    return out


@op("Mean")
def _mean(ctx: OpContext, inputs: list, attrs: dict) -> Value:
    xs = [_tensor(x, ctx) for x in inputs if x is not None]
    out = xs[0]
    for x in xs[1:]:
        out = out + x
    return out / len(xs)


@op("Where")
def _where(ctx: OpContext, inputs: list, attrs: dict) -> Value:
    c, a, b = inputs
    if _all_host([c, a, b]):
        return host_map(_pick, a.dtype, c, a, b)
    cond = _tensor(c, ctx)
    rank = max(cond.dim(), _rank(a), _rank(b))
    x = as_operand(a, rank, ctx.device) if isinstance(a, HostTensor) else a
    y = as_operand(b, rank, ctx.device) if isinstance(b, HostTensor) else b
    out = torch.where(cond, x, y)
    dtype = _dtype_of(a)
    return out if out.dtype == dtype else out.to(dtype)


def _pick(cond: Any, x: Any, y: Any) -> Any:
    """``x if cond else y`` without a guard where the shape environment already knows ``cond``
    (``s == -1`` for a size ``s``, as the TorchScript exporter writes around ``Expand``)."""
    if is_concrete(cond):
        return x if cond else y
    if statically_known_true(cond):
        return x
    if statically_known_true(torch.sym_not(cond)):
        return y
    return x if cond else y


def _unary(torch_fn: Callable, py_fn: Callable | None = None) -> Handler:
    def run(ctx: OpContext, inputs: list, attrs: dict) -> Value:
        (x,) = inputs[:1]
        if isinstance(x, HostTensor) and py_fn is not None:
            return host_map(py_fn, torch.bool if torch_fn is torch.logical_not else x.dtype, x)
        return torch_fn(_tensor(x, ctx))
    return run


for _name, _fn, _py in [
    ("Neg", torch.neg, lambda v: -v), ("Abs", torch.abs, abs), ("Not", torch.logical_not, lambda v: not v),
    ("Sqrt", torch.sqrt, None), ("Reciprocal", torch.reciprocal, None), ("Exp", torch.exp, None),
    ("Log", torch.log, None), ("Sin", torch.sin, None), ("Cos", torch.cos, None), ("Tan", torch.tan, None),
    ("Tanh", torch.tanh, None), ("Sigmoid", torch.sigmoid, None), ("Erf", torch.erf, None),
    ("Relu", torch.relu, None), ("Floor", torch.floor, None), ("Ceil", torch.ceil, None),
    ("Round", torch.round, None), ("Sign", torch.sign, None), ("IsNaN", torch.isnan, None),
    ("Atan", torch.atan, None), ("Asin", torch.asin, None), ("Acos", torch.acos, None),
    ("Sinh", torch.sinh, None), ("Cosh", torch.cosh, None), ("Softsign", F.softsign, None),
    ("Mish", F.mish, None), ("Softplus", F.softplus, None),
]:
    OPS[_name] = _unary(_fn, _py)


@op("Identity")
def _identity(ctx: OpContext, inputs: list, attrs: dict) -> Value:
    return inputs[0]


@op("Dropout")
def _dropout(ctx: OpContext, inputs: list, attrs: dict) -> Any:
    """Inference: the input unchanged (and an all-true mask when asked for)."""
    x = inputs[0]
    return x, (torch.ones_like(_tensor(x, ctx), dtype=torch.bool))


@op("IsInf")
def _isinf(ctx: OpContext, inputs: list, attrs: dict) -> Value:
    x = _tensor(inputs[0], ctx)
    pos, neg = attrs.get("detect_positive", 1), attrs.get("detect_negative", 1)
    if pos and neg:
        return torch.isinf(x)
    if pos:
        return torch.isposinf(x)
    if neg:
        return torch.isneginf(x)
    return torch.zeros_like(x, dtype=torch.bool)


@op("LeakyRelu")
def _leaky_relu(ctx: OpContext, inputs: list, attrs: dict) -> Value:
    return F.leaky_relu(_tensor(inputs[0], ctx), attrs.get("alpha", 0.01))


@op("Elu")
def _elu(ctx: OpContext, inputs: list, attrs: dict) -> Value:
    return F.elu(_tensor(inputs[0], ctx), attrs.get("alpha", 1.0))


@op("Selu")
def _selu(ctx: OpContext, inputs: list, attrs: dict) -> Value:
    x = _tensor(inputs[0], ctx)
    alpha, gamma = attrs.get("alpha", 1.67326319217681884765625), attrs.get("gamma", 1.05070102214813232421875)
    return gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


@op("Celu")
def _celu(ctx: OpContext, inputs: list, attrs: dict) -> Value:
    return F.celu(_tensor(inputs[0], ctx), attrs.get("alpha", 1.0))


@op("HardSigmoid")
def _hard_sigmoid(ctx: OpContext, inputs: list, attrs: dict) -> Value:
    x = _tensor(inputs[0], ctx)
    return torch.clamp(attrs.get("alpha", 0.2) * x + attrs.get("beta", 0.5), 0.0, 1.0)


@op("HardSwish")
def _hard_swish(ctx: OpContext, inputs: list, attrs: dict) -> Value:
    return F.hardswish(_tensor(inputs[0], ctx))


@op("Gelu")
def _gelu(ctx: OpContext, inputs: list, attrs: dict) -> Value:
    approximate = attrs.get("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise ctx.fail(f"Gelu approximate={approximate!r} is not supported")
    return F.gelu(_tensor(inputs[0], ctx), approximate=approximate)


@op("Clip")
def _clip(ctx: OpContext, inputs: list, attrs: dict) -> Value:
    x = _tensor(inputs[0], ctx)
    lo = scalar(inputs[1], "Clip min") if len(inputs) > 1 and inputs[1] is not None else None
    hi = scalar(inputs[2], "Clip max") if len(inputs) > 2 and inputs[2] is not None else None
    return torch.clamp(x, lo, hi) if lo is not None or hi is not None else x


@op("Cast")
def _cast(ctx: OpContext, inputs: list, attrs: dict) -> Value:
    x = inputs[0]
    dtype = _dtype(attrs["to"], ctx)
    if isinstance(x, HostTensor):
        return host(x.values, dtype, x.scalar)
    return x if x.dtype == dtype else x.to(dtype)


@op("CastLike")
def _cast_like(ctx: OpContext, inputs: list, attrs: dict) -> Value:
    x, like = inputs
    if isinstance(x, HostTensor):
        return host(x.values, like.dtype, x.scalar)
    return x if x.dtype == like.dtype else x.to(like.dtype)


def _axes(inputs: list, attrs: dict, index: int = 1) -> list[int] | None:
    if "axes" in attrs:
        return list(attrs["axes"])
    if len(inputs) > index and inputs[index] is not None:
        return ints(inputs[index], "axes")
    return None


# ----------------------------------------------------------------------------- reductions, linear algebra
def _reduce(fn: Callable[[torch.Tensor, list[int], bool], torch.Tensor]) -> Handler:
    def run(ctx: OpContext, inputs: list, attrs: dict) -> Value:
        x = _tensor(inputs[0], ctx)
        axes = _axes(inputs, attrs)
        keep = bool(attrs.get("keepdims", 1))
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return fn(x, [_axis(a, x.dim()) for a in axes], keep)
    return run


OPS["ReduceMean"] = _reduce(lambda x, a, k: torch.mean(x, a, keepdim=k))
OPS["ReduceSum"] = _reduce(lambda x, a, k: torch.sum(x, a, keepdim=k))
OPS["ReduceMax"] = _reduce(lambda x, a, k: torch.amax(x, a, keepdim=k))
OPS["ReduceMin"] = _reduce(lambda x, a, k: torch.amin(x, a, keepdim=k))
OPS["ReduceProd"] = _reduce(lambda x, a, k: _prod(x, a, k))
OPS["ReduceL2"] = _reduce(lambda x, a, k: torch.linalg.vector_norm(x, 2, a, keepdim=k))
OPS["ReduceSumSquare"] = _reduce(lambda x, a, k: torch.sum(x * x, a, keepdim=k))


def _prod(x: torch.Tensor, axes: list[int], keep: bool) -> torch.Tensor:
    for a in sorted(axes, reverse=True):
        x = torch.prod(x, a, keepdim=keep)
    return x


def _arg(fn: Callable) -> Handler:
    def run(ctx: OpContext, inputs: list, attrs: dict) -> Value:
        x = _tensor(inputs[0], ctx)
        axis = _axis(attrs.get("axis", 0), x.dim())
        keep = bool(attrs.get("keepdims", 1))
        if attrs.get("select_last_index", 0):
            flipped = fn(torch.flip(x, [axis]), axis, keepdim=keep)
            return x.shape[axis] - 1 - flipped
        return fn(x, axis, keepdim=keep)
    return run


OPS["ArgMax"] = _arg(torch.argmax)
OPS["ArgMin"] = _arg(torch.argmin)


@op("Softmax")
def _softmax(ctx: OpContext, inputs: list, attrs: dict) -> Value:
    return torch.softmax(_tensor(inputs[0], ctx), attrs.get("axis", -1))


@op("LogSoftmax")
def _log_softmax(ctx: OpContext, inputs: list, attrs: dict) -> Value:
    return torch.log_softmax(_tensor(inputs[0], ctx), attrs.get("axis", -1))


@op("MatMul")
def _matmul(ctx: OpContext, inputs: list, attrs: dict) -> Value:
    return torch.matmul(_tensor(inputs[0], ctx), _tensor(inputs[1], ctx))


@op("Gemm")
def _gemm(ctx: OpContext, inputs: list, attrs: dict) -> Value:
    a, b = _tensor(inputs[0], ctx), _tensor(inputs[1], ctx)
    a = a.t() if attrs.get("transA", 0) else a
    b = b.t() if attrs.get("transB", 0) else b
    out = torch.matmul(a, b)
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    if alpha != 1.0:
        out = out * alpha
    if len(inputs) > 2 and inputs[2] is not None:
        c = _tensor(inputs[2], ctx)
        out = out + (c * beta if beta != 1.0 else c)
    return out


@op("Einsum")
def _einsum(ctx: OpContext, inputs: list, attrs: dict) -> Value:
    return torch.einsum(attrs["equation"], *(_tensor(x, ctx) for x in inputs))


# ----------------------------------------------------------------------------- normalization
def _norm_axes(x: torch.Tensor, axis: int) -> tuple[int, ...]:
    return tuple(range(_axis(axis, x.dim()), x.dim()))


@op("LayerNormalization")
def _layer_norm(ctx: OpContext, inputs: list, attrs: dict) -> Value:
    x = _tensor(inputs[0], ctx)
    weight = _tensor(inputs[1], ctx)
    bias = _tensor(inputs[2], ctx) if len(inputs) > 2 and inputs[2] is not None else None
    dims = _norm_axes(x, attrs.get("axis", -1))
    return F.layer_norm(x, [x.shape[d] for d in dims], weight, bias, attrs.get("epsilon", 1e-5))


@op("SimplifiedLayerNormalization", "RMSNormalization")
def _rms_norm(ctx: OpContext, inputs: list, attrs: dict) -> Value:
    x = _tensor(inputs[0], ctx)
    weight = _tensor(inputs[1], ctx)
    dims = _norm_axes(x, attrs.get("axis", -1))
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    y = xf * torch.rsqrt(xf.pow(2).mean(dims, keepdim=True) + attrs.get("epsilon", 1e-5))
    return weight * y.to(x.dtype)


from qcompile.frontend import onnx_shape_ops  # noqa: E402, F401  (registers the shape and indexing ops)

NOT_FOLDED = frozenset({"Dropout"})
"""Ops never evaluated at import time even on constant inputs."""
MULTI_OUTPUT = frozenset({"Split", "Dropout"})
"""Ops whose handler returns a tuple (one value per ONNX output)."""
