"""The ONNX importer's shape and indexing ops (Shape, Reshape, Slice, Gather, Pad, ...), registered into
``onnx_ops.OPS``: where every input is a host value they compute in Python, so dynamic sizes stay
``SymInt``s under ``torch.export`` (see ``onnx_ops``)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from qcompile.frontend.onnx_ops import (
    OpContext,
    Value,
    _all_host,
    _axes,
    _axis,
    _rank,
    _tensor,
    op,
)
from qcompile.frontend.onnx_values import (
    HOST_MAX_ELEMENTS,
    HostTensor,
    host,
    ints,
    is_concrete,
    scalar,
    to_tensor,
)


# ----------------------------------------------------------------------------- shapes
@op("Shape")
def _shape(ctx: OpContext, inputs: list, attrs: dict) -> Value:
    x = inputs[0]
    dims = list(x.shape)
    start, end = attrs.get("start", 0), attrs.get("end", len(dims))
    return host(dims[slice(start, end)], torch.int64)


@op("Size")
def _size(ctx: OpContext, inputs: list, attrs: dict) -> Value:
    return host([math.prod(inputs[0].shape)], torch.int64, scalar=True)


@op("Reshape")
def _reshape(ctx: OpContext, inputs: list, attrs: dict) -> Value:
    x, shape_value = inputs
    shape = ints(shape_value, "Reshape shape")
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if is_concrete(d) and d == 0 else d for i, d in enumerate(shape)]
    if isinstance(x, HostTensor):
        if len(shape) > 1 or (shape and shape[0] not in (-1, len(x.values))):
            raise ctx.fail(f"Reshape of a shape value to {shape} is not supported")
        return HostTensor(x.values, x.dtype, scalar=not shape)
    return x.reshape(_infer_size(list(x.shape), shape))


def _same_size(a: Any, b: Any) -> bool:
    if is_concrete(a) and is_concrete(b):
        return a == b
    if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt):
        return a.node.expr == b.node.expr
    return False


def _infer_size(dims: list, shape: list) -> list:
    """``shape`` with its -1 replaced by the product of the input dimensions it stands for, found by
    matching the dimensions before and after it to the input's (torch's own inference divides
    symbolic sizes, which is slow and can fail to simplify under torch.export); unchanged where no
    such match is found."""
    if sum(1 for d in shape if is_concrete(d) and d == -1) != 1:
        return shape
    i = next(k for k, d in enumerate(shape) if is_concrete(d) and d == -1)
    head = 0
    while head < min(i, len(dims)) and _same_size(dims[head], shape[head]):
        head += 1
    tail = 0
    while tail < min(len(shape) - i - 1, len(dims) - head) and _same_size(dims[-1 - tail], shape[-1 - tail]):
        tail += 1
    rest_in = dims[head:len(dims) - tail]
    rest_out = shape[head:i] + shape[i + 1:len(shape) - tail]
    if rest_out and not all(is_concrete(d) for d in rest_out + rest_in):
        return shape
    size = math.prod(rest_in)
    if rest_out:
        den = math.prod(rest_out)
        if den == 0 or size % den:
            return shape
        size //= den
    return shape[:i] + [size] + shape[i + 1:]


@op("Flatten")
def _flatten(ctx: OpContext, inputs: list, attrs: dict) -> Value:
    x = _tensor(inputs[0], ctx)
    axis = _axis(attrs.get("axis", 1), x.dim())
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@op("Unsqueeze")
def _unsqueeze(ctx: OpContext, inputs: list, attrs: dict) -> Value:
    x = inputs[0]
    axes = _axes(inputs, attrs)
    rank = _rank(x) + len(axes)
    axes = sorted(_axis(a, rank) for a in axes)
    if isinstance(x, HostTensor):
        if x.scalar and axes == [0]:
            return HostTensor(x.values, x.dtype)
        raise ctx.fail(f"Unsqueeze of a shape value of shape {list(x.shape)} at {axes} is not supported")
    for a in axes:
        x = x.unsqueeze(a)
    return x


@op("Squeeze")
def _squeeze(ctx: OpContext, inputs: list, attrs: dict) -> Value:
    x = inputs[0]
    axes = _axes(inputs, attrs)
    if isinstance(x, HostTensor):
        if not x.scalar and len(x.values) == 1 and (axes is None or [_axis(a, 1) for a in axes] == [0]):
            return HostTensor(x.values, x.dtype, scalar=True)
        return x
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(_axis(a, x.dim()) for a in axes))


@op("Concat")
def _concat(ctx: OpContext, inputs: list, attrs: dict) -> Value:
    xs = [x for x in inputs if x is not None]
    if _all_host(xs):
        return host([v for x in xs for v in x.values], xs[0].dtype)
    tensors = [_tensor(x, ctx) for x in xs]
    return torch.cat(tensors, dim=attrs["axis"])


@op("Transpose")
def _transpose(ctx: OpContext, inputs: list, attrs: dict) -> Value:
    x = _tensor(inputs[0], ctx)
    perm = attrs.get("perm", list(range(x.dim()))[::-1])
    return x.permute(*perm)


def _clamp_index(v: Any, dim: Any, step: int, start: bool) -> Any:
    """ONNX Slice's clamping of a start or end index into ``dim`` for a negative step."""
    if is_concrete(v) and v < 0:
        v = v + dim
    if start:
        return max(0, min(v, dim - 1))
    return max(-1, min(v, dim - 1))


@op("Slice")
def _slice(ctx: OpContext, inputs: list, attrs: dict) -> Value:
    x = inputs[0]
    starts, ends = ints(inputs[1], "Slice starts"), ints(inputs[2], "Slice ends")
    rank = _rank(x)
    axes = ints(inputs[3], "Slice axes") if len(inputs) > 3 and inputs[3] is not None else list(range(len(starts)))
    steps = ints(inputs[4], "Slice steps") if len(inputs) > 4 and inputs[4] is not None else [1] * len(starts)
    if isinstance(x, HostTensor):
        if axes not in ([0], [-1]) or x.scalar:
            raise ctx.fail("Slice of a shape value along an axis other than 0")
        return HostTensor(x.values[slice(starts[0], ends[0], steps[0])], x.dtype)
    for st, e, a, step in zip(starts, ends, axes, steps):
        a = _axis(a, rank)
        if not is_concrete(step) or step == 0:
            raise ctx.fail(f"Slice step {step} is not supported")
        if step > 0:  # aten.slice clamps like ONNX (and Python) for a positive step
            x = torch.ops.aten.slice.Tensor(x, a, st, e, step)
            continue
        if not (is_concrete(st) and is_concrete(e) and is_concrete(x.shape[a])):
            raise ctx.fail("Slice with a negative step needs static starts, ends and dimension")
        dim = x.shape[a]
        lo, hi = _clamp_index(e, dim, step, False) + 1, _clamp_index(st, dim, step, True) + 1
        x = torch.ops.aten.slice.Tensor(torch.flip(x, [a]), a, dim - hi, dim - lo, -step)
    return x


@op("Expand")
def _expand(ctx: OpContext, inputs: list, attrs: dict) -> Value:
    """Bidirectional broadcast; a 1 in ``shape`` keeps the input's size (no guard on SymInts)."""
    x = _tensor(inputs[0], ctx)
    shape = ints(inputs[1], "Expand shape")
    rank = max(x.dim(), len(shape))
    shape = [1] * (rank - len(shape)) + shape
    x = x.reshape([1] * (rank - x.dim()) + list(x.shape)) if x.dim() < rank else x
    target = [-1 if is_concrete(d) and d == 1 else d for d in shape]
    return x.expand(target)


@op("Tile")
def _tile(ctx: OpContext, inputs: list, attrs: dict) -> Value:
    return _tensor(inputs[0], ctx).repeat(ints(inputs[1], "Tile repeats"))


@op("ConstantOfShape")
def _constant_of_shape(ctx: OpContext, inputs: list, attrs: dict) -> Value:
    shape = ints(inputs[0], "ConstantOfShape shape")
    value = attrs.get("value")  # a one-element HostTensor (the importer converts the attribute)
    fill = value.item if value is not None else 0.0
    dtype = value.dtype if value is not None else torch.float32
    if all(is_concrete(d) for d in shape) and len(shape) <= 1 and math.prod(shape) <= HOST_MAX_ELEMENTS \
            and not dtype.is_floating_point:
        return host([fill] * math.prod(shape), dtype, scalar=not shape)
    return torch.full(shape, fill, dtype=dtype, device=ctx.device)


@op("Range")
def _range(ctx: OpContext, inputs: list, attrs: dict) -> Value:
    start, limit, delta = (scalar(v, "Range") for v in inputs)
    dtype = inputs[0].dtype
    return torch.arange(start, limit, delta, dtype=dtype, device=ctx.device)


@op("Split")
def _split(ctx: OpContext, inputs: list, attrs: dict, outputs: int = 0) -> Any:
    x = _tensor(inputs[0], ctx)
    axis = _axis(attrs.get("axis", 0), x.dim())
    if "split" in attrs:
        sizes = list(attrs["split"])
    elif len(inputs) > 1 and inputs[1] is not None:
        sizes = ints(inputs[1], "Split split")
    else:
        n = attrs.get("num_outputs") or attrs["_outputs"]
        dim = x.shape[axis]
        chunk = -(-dim // n)
        sizes = [chunk] * (n - 1) + [dim - chunk * (n - 1)]
    return tuple(torch.split(x, sizes, dim=axis))


@op("Pad")
def _pad(ctx: OpContext, inputs: list, attrs: dict) -> Value:
    x = _tensor(inputs[0], ctx)
    pads = ints(inputs[1], "Pad pads")
    value = scalar(inputs[2], "Pad constant_value") if len(inputs) > 2 and inputs[2] is not None else 0
    axes = ints(inputs[3], "Pad axes") if len(inputs) > 3 and inputs[3] is not None else list(range(x.dim()))
    axes = [_axis(a, x.dim()) for a in axes]
    n = len(axes)
    per_axis = {a: (pads[i], pads[i + n]) for i, a in enumerate(axes)}
    flat: list[Any] = []
    for a in reversed(range(x.dim())):
        flat += list(per_axis.get(a, (0, 0)))
    mode = attrs.get("mode", "constant")
    modes = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}
    if mode not in modes:
        raise ctx.fail(f"Pad mode {mode!r} is not supported")
    if mode == "constant":
        return F.pad(x, flat, value=value)
    for a, (lo, hi) in per_axis.items():  # torch pads non-constant modes on trailing dims only: one axis at a time
        if is_concrete(lo) and is_concrete(hi) and lo == hi == 0:
            continue
        moved = x.movedim(a, -1)
        shape = list(moved.shape)
        padded = F.pad(moved.reshape(-1, 1, shape[-1]), [lo, hi], mode=modes[mode])
        x = padded.reshape(shape[:-1] + [padded.shape[-1]]).movedim(-1, a)
    return x


# ----------------------------------------------------------------------------- indexing
def _normalize_indices(idx: torch.Tensor, dim: Any) -> torch.Tensor:
    return torch.where(idx < 0, idx + dim, idx)


@op("Gather")
def _gather(ctx: OpContext, inputs: list, attrs: dict) -> Value:
    data, indices = inputs
    axis = attrs.get("axis", 0)
    if isinstance(data, HostTensor) and isinstance(indices, HostTensor):
        n = len(data.values)
        picked = [data.values[int(i) + n if int(i) < 0 else int(i)] for i in indices.values]
        return host(picked, data.dtype, scalar=indices.scalar)
    data = _tensor(data, ctx)
    axis = _axis(axis, data.dim())
    if isinstance(indices, HostTensor):
        if indices.scalar:
            return data.select(axis, indices.item)
        idx = to_tensor(indices, data.device)
        return torch.index_select(data, axis, _normalize_indices(idx, data.shape[axis]))
    if axis == 0 and data.dim() == 2 and data.is_floating_point():
        return F.embedding(_normalize_indices(indices, data.shape[0]), data)  # a table lookup, as torch models write it
    idx = _normalize_indices(indices, data.shape[axis])
    flat = torch.index_select(data, axis, idx.reshape(-1))
    return flat.reshape(list(data.shape[:axis]) + list(indices.shape) + list(data.shape[axis + 1:]))


@op("GatherElements")
def _gather_elements(ctx: OpContext, inputs: list, attrs: dict) -> Value:
    data, indices = (_tensor(x, ctx) for x in inputs)
    axis = _axis(attrs.get("axis", 0), data.dim())
    return torch.gather(data, axis, _normalize_indices(indices, data.shape[axis]))


@op("GatherND")
def _gather_nd(ctx: OpContext, inputs: list, attrs: dict) -> Value:
    data, indices = (_tensor(x, ctx) for x in inputs)
    if attrs.get("batch_dims", 0):
        raise ctx.fail(f"GatherND batch_dims={attrs['batch_dims']} is not supported (only 0)")
    k = indices.shape[-1]
    if not is_concrete(k):
        raise ctx.fail("GatherND needs a static last index dimension")
    coords = tuple(_normalize_indices(indices[..., i], data.shape[i]) for i in range(k))
    return data[coords]


@op("ScatterND")
def _scatter_nd(ctx: OpContext, inputs: list, attrs: dict) -> Value:
    data, indices, updates = (_tensor(x, ctx) for x in inputs)
    if attrs.get("reduction", "none") != "none":
        raise ctx.fail(f"ScatterND reduction={attrs['reduction']!r} is not supported")
    k = indices.shape[-1]
    coords = tuple(_normalize_indices(indices[..., i], data.shape[i]) for i in range(k))
    return data.index_put(coords, updates)


@op("Trilu")
def _trilu(ctx: OpContext, inputs: list, attrs: dict) -> Value:
    x = _tensor(inputs[0], ctx)
    k = scalar(inputs[1], "Trilu k") if len(inputs) > 1 and inputs[1] is not None else 0
    return torch.triu(x, k) if attrs.get("upper", 1) else torch.tril(x, k)


@op("CumSum")
def _cumsum(ctx: OpContext, inputs: list, attrs: dict) -> Value:
    x = _tensor(inputs[0], ctx)
    axis = _axis(scalar(inputs[1], "CumSum axis"), x.dim())
    if attrs.get("reverse", 0):
        x = torch.flip(x, [axis])
    out = torch.cumsum(x, axis)
    if attrs.get("exclusive", 0):
        out = out - x
    return torch.flip(out, [axis]) if attrs.get("reverse", 0) else out


