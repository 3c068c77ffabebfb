"""Convolutions as linears: Conv1d/Conv2d (groups = 1) become im2col → ``aten.linear`` → back.

Everything after canonicalization (decisions, quantizers, lowering, kernels, artifacts) works on
canonical linears, so a convolution the compiler can quantize is rewritten into one, with the
conv's weight reshaped to ``[C_out, C_in·k₁·k₂]`` and registered under the conv's module path
(decisions, overrides and the report name the conv layer)::

    x [N, C, H, W] ─pad─ unfold(H) ─ unfold(W) ─ [N, C, Ho, Wo, kh, kw] ─permute─ [N, Ho, Wo, C, kh, kw]
      ─flatten─ [N, Ho, Wo, C·kh·kw] ─linear─ [N, Ho, Wo, C_out] ─permute─ [N, C_out, Ho, Wo]

``aten.unfold`` (sliding windows, a view) rather than ``aten.im2col``: it needs no output size,
so dynamic spatial dimensions stay dynamic, it covers 1-D and 2-D alike, and it puts the
reduction dimension last, where a linear wants it (``im2col``'s ``[N, K, L]`` needs a transposed
copy anyway). The flatten materializes the patches: about ``kh·kw / (stride_h·stride_w)`` times the
input's size.
Kernels of size 1 with stride 1 skip the unfold (permute + linear). The result is copied to
the memory format eager conv gives on the example input (contiguous, or channels-last for a
channels-last example), so views downstream (``.view(N, -1)``) keep working. Padding is explicit
(``constant_pad_nd``; other padding modes are already ``aten.pad`` before the conv in the
exported graph), dilation is a strided slice of the window. Unbatched inputs work the same.

Grouped and depthwise convolutions, transposed convolutions and 3-D convolutions are not
rewritten: they keep running as they are and carry the reason in ``node.meta[FLOAT_REASON]``,
which ``assign_quant_specs`` turns into a float decision the report lists.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from qcompile.ir.graph import FLOAT_REASON, MODULE_PATH, add_get_attr, get_attr, weight_module_path
from qcompile.ir.ops import LINEAR

aten = torch.ops.aten

CONV_TO_LINEAR = {
    aten.conv1d.default: 1, aten.conv1d.padding: 1,
    aten.conv2d.default: 2, aten.conv2d.padding: 2,
}
"""Convolutions rewritten to linears, with their number of spatial dimensions."""

_LEFT_FLOAT = {
    aten.conv3d.default: "Conv3d: only Conv1d/Conv2d become linears",
    aten.conv3d.padding: "Conv3d: only Conv1d/Conv2d become linears",
    aten.conv_transpose1d.default: "transposed conv: not supported",
    aten.conv_transpose2d.input: "transposed conv: not supported",
    aten.conv_transpose3d.input: "transposed conv: not supported",
    aten.convolution.default: "generic aten.convolution call: not supported",
}


def raise_convolutions(gm: fx.GraphModule) -> dict[str, int]:
    """Rewrite every Conv1d/Conv2d with groups = 1 and a weight attribute into a linear; mark
    the convolutions left as they are with the reason. Returns counts for the pass record."""
    counts = {"conv_to_linear": 0, "conv_left_float": 0}
    matrices: dict[str, str] = {}  # conv weight → its matrix attribute (a conv called twice shares it)
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in CONV_TO_LINEAR:
            reason = _rewrite(gm, node, CONV_TO_LINEAR[node.target], matrices)
        elif node.target in _LEFT_FLOAT:
            reason = _LEFT_FLOAT[node.target]
        else:
            continue
        if reason is None:
            counts["conv_to_linear"] += 1
        else:
            weight = node.args[1]
            if isinstance(weight, fx.Node) and weight.op == "get_attr":
                node.meta[MODULE_PATH] = weight_module_path(weight.target)
            node.meta[FLOAT_REASON] = reason
            counts["conv_left_float"] += 1
    return counts


def _bind(node: fx.Node) -> dict[str, Any]:
    """The node's arguments by schema name, defaults filled in."""
    out = {}
    for i, arg in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        else:
            out[arg.name] = arg.default_value if arg.has_default_value() else None
    return out


def _per_dim(value: Any, spatial: int) -> list[int]:
    values = [value] if isinstance(value, int) else list(value)
    return values * spatial if len(values) == 1 else values


def _padding(padding: Any, kernel: list[int], dilation: list[int]) -> list[tuple[int, int]] | None:
    """(before, after) padding per spatial dimension; ``"same"`` as ATen computes it (the extra
    element of an odd total goes after). ``None`` if it is not a constant."""
    if padding == "valid":
        return [(0, 0)] * len(kernel)
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return [(t // 2, t - t // 2) for t in totals]
    if isinstance(padding, str) or not all(isinstance(p, int) for p in _per_dim(padding, len(kernel))):
        return None
    return [(p, p) for p in _per_dim(padding, len(kernel))]


def _rewrite(gm: fx.GraphModule, conv: fx.Node, spatial: int, matrices: dict[str, str]) -> str | None:
    """Replace ``conv`` by pad → unfold → linear → permute; the reason if it cannot be."""
    a = _bind(conv)
    x, weight, bias, groups = a["input"], a["weight"], a["bias"], a["groups"]
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        return "conv weight is computed in the graph, not a parameter"
    if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
        return "conv bias is computed in the graph, not a parameter"
    w = get_attr(gm, weight.target)
    c_out, c_in_per_group, *kernel = w.shape
    if groups != 1:
        if c_in_per_group == 1:
            return f"depthwise conv (groups = {groups}): one input channel per output channel, not a dense matmul"
        return f"grouped conv (groups = {groups}): a block-diagonal matmul, not supported"
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    if not isinstance(val, torch.Tensor) or not isinstance(groups, int):
        return "conv input without a traced shape: cannot place the rewrite"
    stride, dilation = _per_dim(a["stride"], spatial), _per_dim(a["dilation"], spatial)
    pads = _padding(a["padding"], kernel, dilation)
    if pads is None or not all(isinstance(v, int) for v in (*stride, *dilation)):
        return f"conv with non-constant stride/padding/dilation ({a['stride']}, {a['padding']}, {a['dilation']})"

    channel = val.dim() - 1 - spatial  # 0 for an unbatched input, 1 for a batched one
    dims = list(range(channel + 1, channel + 1 + spatial))
    path = weight_module_path(weight.target)
    if weight.target in matrices:
        with gm.graph.inserting_before(conv):
            w2d = gm.graph.get_attr(matrices[weight.target])
    else:
        w2d = add_get_attr(gm, weight.target + "_im2col", w.reshape(c_out, -1).contiguous(), before=conv)
        matrices[weight.target] = w2d.target
    w2d.meta[MODULE_PATH] = path
    emit = _Emitter(gm, conv, path)
    h = x
    if any(p for pair in pads for p in pair):
        flat = [p for pair in reversed(pads) for p in pair]  # last dimension first, as pad wants
        h = emit(aten.constant_pad_nd.default, h, flat, 0.0)
    if all(k == 1 for k in kernel) and all(s == 1 for s in stride):
        h = emit(aten.permute.default, h, [*range(channel), *dims, channel])
    else:
        for dim, k, s, d in zip(dims, kernel, stride, dilation):
            h = emit(aten.unfold.default, h, dim, d * (k - 1) + 1, s)
        window = [channel + 1 + spatial + i for i in range(spatial)]
        for dim, k, d in zip(window, kernel, dilation):
            if d > 1:
                h = emit(aten.slice.Tensor, h, dim, 0, d * (k - 1) + 1, d)
        h = emit(aten.permute.default, h, [*range(channel), *dims, channel, *window])
        h = emit(aten.flatten.using_ints, h, channel + spatial, -1)
    h = emit(LINEAR, h, w2d, bias)
    out = emit(aten.permute.default, h, [*range(channel), channel + spatial, *range(channel, channel + spatial)])
    if not _channels_last(conv):  # the permute is a channels-last view; views downstream need eager's strides
        out = emit(aten.clone.default, out, memory_format=torch.contiguous_format)
    conv.replace_all_uses_with(out)
    gm.graph.erase_node(conv)
    return None


def _channels_last(conv: fx.Node) -> bool:
    """Whether eager conv gave a channels-last output on the example input (its traced strides)."""
    val = conv.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() != 4:
        return False
    stride = val.stride()  # read without guards (torch 2.11 cannot decide is_contiguous symbolically)
    return statically_known_true(stride[1] == 1) and not statically_known_true(stride[3] == 1)


class _Emitter:
    """Inserts nodes before the conv, each with the conv's module path and a traced ``val``
    (later passes read shapes off ``node.meta["val"]``)."""

    def __init__(self, gm: fx.GraphModule, conv: fx.Node, path: str):
        self.gm, self.conv, self.path = gm, conv, path
        self.fake_mode = getattr(conv.args[0].meta.get("val"), "fake_mode", None)

    def __call__(self, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
        with self.gm.graph.inserting_before(self.conv):
            node = self.gm.graph.call_function(target, args, kwargs)
        node.meta["nn_module_stack"] = self.conv.meta.get("nn_module_stack", {})
        node.meta[MODULE_PATH] = self.path
        if self.fake_mode is not None:
            vals = [self._val(a) for a in args]
            shape_env = self.fake_mode.shape_env
            guards = shape_env.suppress_guards() if shape_env is not None else contextlib.nullcontext()
            with self.fake_mode, guards:  # a guard here would specialize the graph's dynamic sizes
                if target is LINEAR:  # by shape: torch 2.11's linear calls numel() on symbolic sizes
                    x_val, w_val = vals[0], vals[1]
                    node.meta["val"] = x_val.new_empty((*x_val.shape[:-1], w_val.shape[0]))
                else:
                    node.meta["val"] = target(*vals, **kwargs)
        return node

    def _val(self, arg: Any) -> Any:
        if not isinstance(arg, fx.Node):
            return arg
        if arg.op == "get_attr" and "val" not in arg.meta:
            arg.meta["val"] = self.fake_mode.from_tensor(get_attr(self.gm, arg.target))
        return arg.meta["val"]
