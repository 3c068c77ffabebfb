"""The compiled graph → a graph ``torch.onnx.export`` turns into ops stock ONNX Runtime runs.

A copy of the compiled ``GraphModule`` (sharing its tensors; the compiled model is not changed) in
which:

- each ``qcompile::quantized_linear`` (read only through ``op_schema.QuantizedLinearCall``) becomes
  an export op of ``ops.py`` holding the repacked tensors (``repack.py``): int8/int4/int3/int2
  weight-only → ``matmul_nbits``; int8 per-token dynamic activations with symmetric per-channel
  int8 weights (W8A8) → ``int8_dynamic_matmul``; fp8 / MXFP8 weight-only → ``dequantize_matmul``.
  Anything else raises :class:`OnnxExportError` naming the layer, the format and the supported set;
- ``qcompile::rms_norm`` → ``x / sqrt(mean(x²) + eps) · w`` in ATen ops (exported as
  Pow/ReduceMean/Add/Sqrt/Div/Mul, which ONNX Runtime fuses into ``SimplifiedLayerNormalization``);
- ``qcompile::layer_norm`` → ``aten.layer_norm`` (``LayerNormalization``);
- ``qcompile::channel_scale`` → a multiplication (``Mul``);
- outlier splitting (``codegen/outlier_ops.py``): ``qcompile::zero_columns`` → ``Mul`` by a 0/1
  channel mask, ``qcompile::outlier_columns`` → ``Gather`` + ``Cast`` + ``MatMul`` (LLM.int8's
  16-bit columns); residual channels' reorder and widening are ``Gather``/``Concat``/``Slice``
  already. ``qcompile::sparse_residual`` and ``qcompile::activation_residual`` raise
  :class:`OnnxExportError` naming the layer and the split;
- ``qcompile::hadamard_transform`` → ``hadamard`` (``ops.py``): ``Q = diag(signs) · (H_p ⊗ B) · scale``
  regrouped as ``diag(signs) · (H_a ⊗ R)``, ``H_p = H_a ⊗ H_{p/a}`` and ``R = (H_{p/a} ⊗ B) · scale``
  (:func:`hadamard_factors`: ``c = p/a · m`` the smallest with ``c² ≥ n``); five ONNX nodes, ``O(n √n)``
  work, never a dense ``n × n`` matrix (but for ``n = m``: the block alone). A grouped transform
  (``groups = k``, ``Q = I_k ⊗ Q_g``) is three nodes: ``Reshape`` to ``[…, k, g]``, one ``MatMul`` by
  the ``g × g`` matrix ``Q_g`` with the signs folded in, ``Reshape`` back.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field

import torch
from torch import fx

from qcompile.codegen.op_schema import QuantizedLinearCall, is_quantized_linear
from qcompile.codegen.outlier_ops import (
    ACTIVATION_RESIDUAL,
    OUTLIER_COLUMNS,
    SPARSE_RESIDUAL,
    ZERO_COLUMNS,
)
from qcompile.formats import PER_CHANNEL, PER_TENSOR, QuantizedTensor, QuantSpec
from qcompile.formats.orthogonal import hadamard_matrix, is_power_of_two
from qcompile.formats.orthogonal import hadamard_transform as orthogonal_transform
from qcompile.ir.graph import add_get_attr, erase_dead_attrs, get_attr, module_path
from qcompile.ir.ops import CHANNEL_SCALE, HADAMARD_TRANSFORM, LAYER_NORM, RMS_NORM
from qcompile.onnx_export import repack
from qcompile.onnx_export.ops import (
    DEQUANTIZE_MATMUL,
    HADAMARD,
    INT8_DYNAMIC_MATMUL,
    MATMUL_NBITS,
    UINT8_PER_TENSOR_MATMUL,
)

SUPPORTED_WEIGHTS = ("int8", "int4", "int3", "int2", "fp8_e4m3", "fp8_e5m2", "mxfp8")
"""Weight formats with an ONNX Runtime 1.32 CPU path: MatMulNBits (int8/int4/int2, int3 in 4-bit
containers) and DequantizeLinear + MatMul (fp8, MXFP8)."""
UNSUPPORTED_WEIGHTS = {
    "fp4_e2m1": "ONNX Runtime 1.32's CPU DequantizeLinear has no float4e2m1 kernel",
    "nvfp4": "ONNX Runtime 1.32's CPU DequantizeLinear has no float4e2m1 kernel and its "
             "MatMulBlockQuantizedFp4Weight runs on CUDA only",
    "mxfp4": "ONNX Runtime 1.32's CPU DequantizeLinear has no float4e2m1 kernel",
}
SUPPORTED_ACTIVATIONS = ("int8 per-token symmetric dynamic (int8-pc-dynamic) and per-tensor asymmetric dynamic with "
                         "float32 scales (int8-pt-asym-scale:float32-dynamic, ONNX's DynamicQuantizeLinear); W8A8 "
                         "with symmetric per-channel int8 weights")


class OnnxExportError(ValueError):
    """The compiled model cannot be exported to the target: the message names the layer, op or file."""


@dataclass(frozen=True)
class LayerExport:
    """How one quantized linear is exported."""

    path: str
    weight: str
    """The weight spec (``QuantSpec.short()``)."""
    activation: str | None
    onnx_op: str
    """What ONNX Runtime runs, e.g. ``MatMulNBits(bits=4, block_size=128, zero_points)``."""
    packed_bytes: int
    """Bytes of the compiled model's packed tensors for the layer."""
    onnx_bytes: int
    """Bytes of the repacked tensors the ONNX file holds for it."""


@dataclass
class LoweredGraph:
    """The export graph, what each quantized linear became, and notes for the report."""

    gm: fx.GraphModule
    layers: list[LayerExport]
    notes: list[str] = field(default_factory=list)


def _per_token_int8(a: QuantSpec) -> bool:
    return a.format == "int8" and a.symmetric and a.group_size == PER_CHANNEL and a.dynamic


def _per_tensor_uint8(a: QuantSpec) -> bool:
    """ONNX's ``DynamicQuantizeLinear`` exactly: asymmetric, one float32 scale and zero point per tensor."""
    return (a.format == "int8" and not a.symmetric and a.group_size == PER_TENSOR and a.dynamic
            and a.scale_dtype == "float32")


def spec_unsupported_reason(weight: QuantSpec, activation: QuantSpec | None) -> str | None:
    """Why a layer of these specs has no ONNX Runtime CPU export (``None``: it has one). Group sizes are
    checked per layer (:func:`repack.nbits_block_reason`)."""
    if weight.format in UNSUPPORTED_WEIGHTS:
        return (f"weight format {weight.format}: {UNSUPPORTED_WEIGHTS[weight.format]}; supported weight formats: "
                f"{', '.join(SUPPORTED_WEIGHTS)}")
    if weight.format not in SUPPORTED_WEIGHTS:
        return f"weight format {weight.format}: no ONNX Runtime export; supported: {', '.join(SUPPORTED_WEIGHTS)}"
    if activation is None:
        return None
    if not (_per_token_int8(activation) or _per_tensor_uint8(activation)):
        return (f"activations {activation.encode()}: ONNX Runtime 1.32 has no CPU op computing them (fake-quantizing "
                f"them in float ops would only simulate the format); supported activation quantization: "
                f"{SUPPORTED_ACTIVATIONS}")
    if not (weight.format == "int8" and weight.symmetric and weight.group_size == 0):
        return f"W8A8 weights {weight.short()}: MatMulInteger takes symmetric per-channel int8 weights (int8-pc)"
    return None


def shared_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A deep copy of ``gm`` (modules, graph, metadata) sharing its parameter and buffer tensors."""
    memo = {id(t): t for t in itertools.chain(gm.parameters(), gm.buffers())}
    return copy.deepcopy(gm, memo)


# ----------------------------------------------------------------------------- norms, scales, rotations
def rms_norm_onnx(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``qcompile::rms_norm`` for float32 ``x`` in the form ONNX Runtime fuses into SimplifiedLayerNormalization."""
    y = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y * weight if weight is not None else y


def layer_norm_onnx(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``qcompile::layer_norm`` as ``aten.layer_norm`` (ONNX LayerNormalization)."""
    return torch.nn.functional.layer_norm(x, x.shape[-1:], weight, bias, eps)


def channel_scale_onnx(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``qcompile::channel_scale``: a Mul."""
    return x * scale.to(x.dtype)


def outlier_columns_onnx(x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``qcompile::outlier_columns``: Gather the kept columns, MatMul by their 16-bit weight."""
    return torch.nn.functional.linear(torch.index_select(x, -1, index), weight.to(x.dtype))


def _lower_zero_columns(gm: fx.GraphModule, node: fx.Node) -> None:
    """``qcompile::zero_columns(x, index)`` → ``x · mask`` (0 on ``index``, 1 elsewhere); K is the
    consuming quantized linear's."""
    users = [u for u in node.users if is_quantized_linear(u)]
    if not users:
        raise OnnxExportError(f"layer {module_path(node) or node.name}: zero_columns feeds no quantized linear")
    k = QuantizedLinearCall.from_node(users[0]).in_features
    mask = torch.ones(k)
    mask[get_attr(gm, node.args[1].target).long()] = 0
    node.args = (node.args[0], add_get_attr(gm, f"{module_path(node) or 'root'}.onnx_column_mask", mask, before=node))
    node.target = channel_scale_onnx


NO_ONNX_SPLIT = {  # run-time ops of outlier splits without an ONNX Runtime export, and why
    SPARSE_RESIDUAL: "its dense-and-sparse residual (outlier split 'sparse') has no ONNX Runtime export (no "
                     "sparse MatMul on the CPU execution provider); compile it without the split",
    ACTIVATION_RESIDUAL: "its residual channels carry the activation's quantization residual (outlier split "
                         "'residual_channels' on an activation-quantized layer), which has no ONNX export",
}


def hadamard_factors(n: int, m: int) -> tuple[int, int]:
    """``(a, c)`` with ``n = a · c``: the online Hadamard's Sylvester order ``a`` (applied from the left)
    and dense right factor order ``c = m · 2^j``, the smallest such ``c`` with ``c² ≥ n`` (``a ≈ c ≈ √n``:
    the fewest multiply-adds of the two MatMuls; MiniLM's 384 → 16 · 24, 1536 → 32 · 48, Llama's 4096 →
    64 · 64). ``m`` is the block's order (1 without one); ``n / m`` must be a power of two."""
    c = m
    while c * c < n and n % (2 * c) == 0:
        c *= 2
    return n // c, c


def _last_dim(gm: fx.GraphModule, node: fx.Node) -> int | None:
    """The last dimension of what ``node`` computes: from its traced value, or, for a constant
    (passes add get_attr nodes such as a rotation's block without tracing them), the tensor."""
    val = node.meta.get("val")
    if val is None and node.op == "get_attr":
        val = get_attr(gm, node.target)
    return int(val.shape[-1]) if val is not None else None


def hadamard_operands(n: int, block: torch.Tensor | None, scale: float) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(L, R)`` of ``ops.hadamard`` for ``qcompile::hadamard_transform(x, signs, block, scale)`` over ``n``:
    ``L = H_a`` (``±1``, ``None`` for ``a = 1``) and ``R = (H_{c/m} ⊗ block) · scale``, float32
    (:func:`hadamard_factors`); ``R`` is computed in float64, then rounded once."""
    m = block.shape[0] if block is not None else 1
    a, c = hadamard_factors(n, m)
    low = hadamard_matrix(c // m)
    right = torch.kron(low, block.double()) if block is not None else low
    return (hadamard_matrix(a).float() if a > 1 else None), (right * float(scale)).float()


def _constant(gm: fx.GraphModule, name: str, value: torch.Tensor, before: fx.Node) -> fx.Node:
    """A get_attr of ``onnx_export.<name>`` holding ``value``: shared with the transforms that need the same
    tensor (the Sylvester factors; the right factors of equal blocks, orders and scales)."""
    holder = getattr(gm, "onnx_export", None)
    existing = getattr(holder, name, None) if holder is not None else None
    if existing is None:
        return add_get_attr(gm, f"onnx_export.{name}", value, before=before)
    if not torch.equal(existing, value):
        raise OnnxExportError(f"onnx_export.{name}: two different tensors under one name")
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(f"onnx_export.{name}")


def _right_factor_name(gm: fx.GraphModule, c: int, right: torch.Tensor) -> str:
    holder = getattr(gm, "onnx_export", None)
    i = 0
    while holder is not None and hasattr(holder, f"hadamard_right_{c}_{i}"):
        if torch.equal(getattr(holder, f"hadamard_right_{c}_{i}"), right):
            break
        i += 1
    return f"hadamard_right_{c}_{i}"


def _lower_grouped_hadamard(gm: fx.GraphModule, node: fx.Node, val: torch.Tensor) -> None:
    """``I_k ⊗ Q_g`` → ``hadamard(x, None, None, R, rank, k)`` with ``R = Q_g`` (signs folded in, float32):
    ONNX ``Reshape`` to ``[…, k, g]``, one ``MatMul`` by ``R``, ``Reshape`` back."""
    x, signs, block, scale, groups = node.args
    n = int(val.shape[-1])
    g = n // groups
    for t in (signs, block):
        if isinstance(t, fx.Node) and t.op != "get_attr":
            raise OnnxExportError(f"node {node.name}: hadamard_transform whose {t.name} is computed, not a constant")
    tensors = [get_attr(gm, t.target) if isinstance(t, fx.Node) else None for t in (signs, block)]
    right = orthogonal_transform(torch.eye(g, dtype=torch.float64), tensors[0], tensors[1], float(scale)).float()
    right_node = _constant(gm, _right_factor_name(gm, g, right), right, node)
    node.target = HADAMARD
    node.args = (x, None, None, right_node, val.dim(), int(groups))


def _lower_hadamard(gm: fx.GraphModule, node: fx.Node) -> None:
    if len(node.args) > 4 and node.args[4] != 1:
        val = node.meta.get("val")
        if val is None:
            raise OnnxExportError(f"node {node.name}: hadamard_transform whose input size is unknown (no shape "
                                  "recorded on the node)")
        _lower_grouped_hadamard(gm, node, val)
        return
    x, signs, block, scale = node.args[:4]
    n = _last_dim(gm, node) or _last_dim(gm, x)
    m = _last_dim(gm, block) if isinstance(block, fx.Node) else 1
    val = node.meta.get("val")
    if val is None and isinstance(x, fx.Node):
        val = x.meta.get("val")
    if not n or not m or val is None:
        raise OnnxExportError(f"node {node.name}: hadamard_transform whose input or block size is unknown (no shape "
                              f"recorded on the node)")
    p = n // m
    if n % m or not is_power_of_two(p):
        raise OnnxExportError(f"node {node.name}: hadamard_transform over {n} with block {m} (not a power of two times the block)")
    if isinstance(block, fx.Node) and block.op != "get_attr":
        raise OnnxExportError(f"node {node.name}: hadamard_transform whose block {block.name} is computed, not a "
                              "constant")
    left, right = hadamard_operands(n, get_attr(gm, block.target) if isinstance(block, fx.Node) else None, scale)
    if left is not None:
        left = _constant(gm, f"sylvester_{left.shape[0]}", left, node)
    right_node = _constant(gm, _right_factor_name(gm, right.shape[0], right), right, node)
    node.target = HADAMARD
    node.args = (x, signs, left, right_node, val.dim())


# ----------------------------------------------------------------------------- quantized linears
def _describe(w: repack.NBitsWeight | repack.IntegerWeight | repack.DequantizeWeight, qt: QuantizedTensor,
              per_tensor: bool = False) -> str:
    if isinstance(w, repack.NBitsWeight):
        extra = ", zero_points" if w.zero_points is not None else ""
        container = ", int3 in 4-bit containers" if qt.spec.bits == 3 else ""
        return f"MatMulNBits(bits={w.bits}, block_size={w.block_size}{extra}{container})"
    if isinstance(w, repack.IntegerWeight):
        if per_tensor:
            return "DynamicQuantizeLinear(uint8, per tensor) + MatMulInteger"
        return "QuantizeLinear(uint8, per token) + MatMulInteger"
    layout = f"block_size={w.block_size}" if w.block_size else "per column"
    return f"DequantizeLinear({str(w.data.dtype).removeprefix('torch.')}, {layout}) + MatMul"


def _lower_linear(gm: fx.GraphModule, node: fx.Node, accuracy_level: int) -> LayerExport:
    path = module_path(node) or node.name
    call = QuantizedLinearCall.from_node(node)
    resolved = call.resolve(gm)
    qt = resolved.quantized_weight()
    x = call.x
    dtype = x.meta["val"].dtype if isinstance(x, fx.Node) and "val" in x.meta else torch.float32
    if dtype != torch.float32:
        raise OnnxExportError(f"layer {path}: takes {str(dtype).removeprefix('torch.')} inputs; the ONNX export "
                              "handles float32 graphs (compile the model in float32)")
    reason = spec_unsupported_reason(qt.spec, call.act_spec)
    if reason is None and call.act_spec is None and qt.spec.format in repack.NBITS_FORMATS:
        block_reason = repack.nbits_block_reason(qt)
        if block_reason is not None:
            reason = f"weight {qt.spec.short()}: {block_reason}"
    if reason is not None:
        raise OnnxExportError(f"layer {path}: {reason}")

    def attr(suffix: str, value: torch.Tensor) -> fx.Node:
        return add_get_attr(gm, f"{path}.onnx_{suffix}" if path else f"onnx_{suffix}", value, before=node)

    if call.act_spec is not None:
        w = repack.to_matmul_integer(qt)
        if _per_tensor_uint8(call.act_spec):
            args, target = (x, attr("b", w.b), attr("b_scale", w.scale), call.bias), UINT8_PER_TENSOR_MATMUL
        else:
            args = (x, attr("b", w.b), attr("b_scale", w.scale), call.bias, call.act_spec.scale_dtype)
            target = INT8_DYNAMIC_MATMUL
    elif qt.spec.format in repack.NBITS_FORMATS:
        w = repack.to_matmul_nbits(qt)
        zp = attr("zero_points", w.zero_points) if w.zero_points is not None else None
        args = (x, attr("b", w.b), attr("scales", w.scales), zp, call.bias, w.k, w.n, w.bits, w.block_size,
                accuracy_level)
        target = MATMUL_NBITS
    else:
        w = repack.to_dequantize_linear(qt)
        args = (x, attr("data", w.data), attr("scale", w.scale), call.bias, w.block_size)
        target = DEQUANTIZE_MATMUL
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(target, args)
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    old_inputs = [a for a in (call.qdata, call.scale, call.zero, call.global_scale) if isinstance(a, fx.Node)]
    gm.graph.erase_node(node)
    for a in old_inputs:
        if not a.users:
            gm.graph.erase_node(a)
    per_tensor = call.act_spec is not None and _per_tensor_uint8(call.act_spec)
    return LayerExport(path, qt.spec.short(), call.act_spec.encode() if call.act_spec else None,
                       _describe(w, qt, per_tensor),
                       qt.nbytes(), w.nbytes())


_ADD = torch.ops.aten.add.Tensor


def _is_identity(node: fx.Node) -> bool:
    """Eval-mode dropout or a clone: the value passes through unchanged."""
    if node.target == torch.ops.aten.dropout.default:
        return node.args[2] is False or node.kwargs.get("train") is False
    return node.target == torch.ops.aten.clone.default


def _move_biases_past_residual_adds(gm: fx.GraphModule) -> list[str]:
    """``add(int8_dynamic_matmul(x, .., bias), r)`` → ``add(add(r, bias), int8_dynamic_matmul(x, .., None))``.

    ONNX Runtime's ``MatMulIntegerToFloat`` fusion cannot take a W8A8 bias (its kernel scales a fused
    bias by the per-token scale, so the translation keeps the bias out of the fusion with a separate
    ``Sub``); added to the residual instead, it becomes the bias input of the
    ``SkipLayerNormalization`` that ONNX Runtime fuses there (its pattern ``LayerNorm((r + bias) + y)``;
    ``(y + r) + bias`` is not fused): one elementwise op less per such layer.
    Returns the paths of the layers changed."""
    moved = []
    for node in list(gm.graph.nodes):
        if node.target != INT8_DYNAMIC_MATMUL or node.args[3] is None or len(node.users) != 1:
            continue
        src, user = node, next(iter(node.users))
        while _is_identity(user) and len(user.users) == 1:  # eval-mode dropout between linear and add
            src, user = user, next(iter(user.users))
        if user.target != _ADD or user.kwargs or len(user.args) != 2:
            continue
        other = user.args[1] if user.args[0] is src else user.args[0]
        val, other_val = src.meta.get("val"), getattr(other, "meta", {}).get("val")
        if not isinstance(other, fx.Node) or val is None or other_val is None or other_val.shape != val.shape:
            continue
        bias = node.args[3]
        node.args = (*node.args[:3], None, *node.args[4:])
        with gm.graph.inserting_before(user):
            biased = gm.graph.call_function(_ADD, (other, bias))
        biased.meta.update(other.meta)
        user.args = (biased, src)
        moved.append(module_path(node) or node.name)
    return moved


def lower_for_onnx(gm: fx.GraphModule, accuracy_level: int = 0) -> LoweredGraph:
    """The export graph of the compiled ``gm`` (see the module docstring); ``gm`` is not changed.
    ``accuracy_level`` is MatMulNBits' attribute."""
    out = shared_copy(gm)
    layers, notes = [], []
    for node in list(out.graph.nodes):
        if node.op != "call_function":
            continue
        if is_quantized_linear(node):
            layers.append(_lower_linear(out, node, accuracy_level))
        elif node.target == RMS_NORM:
            node.target = rms_norm_onnx
        elif node.target == LAYER_NORM:
            node.target = layer_norm_onnx
        elif node.target == CHANNEL_SCALE:
            node.target = channel_scale_onnx
        elif node.target == HADAMARD_TRANSFORM:
            _lower_hadamard(out, node)
        elif node.target == ZERO_COLUMNS:
            _lower_zero_columns(out, node)
        elif node.target == OUTLIER_COLUMNS:
            node.target = outlier_columns_onnx
        elif node.target in NO_ONNX_SPLIT:
            raise OnnxExportError(f"layer {module_path(node) or '(root)'}: {NO_ONNX_SPLIT[node.target]}")
    moved = _move_biases_past_residual_adds(out)
    erase_dead_attrs(out)
    out.recompile()

    def note(text: str, paths: list[str]) -> None:
        if paths:
            shown = ", ".join(p or "(root)" for p in paths[:3])
            notes.append(f"{text}: {shown}{f', ... ({len(paths)} layers)' if len(paths) > 3 else ''}")

    note("int3 weights stored in 4-bit MatMulNBits containers (no 3-bit kernel; same values, 4 bits per weight)",
         [layer.path for layer in layers if layer.weight.startswith("int3")])
    if accuracy_level < 4:
        note(f"8-bit MatMulNBits at accuracy_level {accuracy_level}: ONNX Runtime 1.32's CPU kernel has no float32 "
             "8-bit path and dequantizes the weight on every call (MiniLM w8a16, 16 tokens: 3x float32's time); "
             "accuracy_level=4 runs its int8 kernel (max rel err ~1e-2, docs/onnx-export.md)",
             [layer.path for layer in layers if layer.onnx_op.startswith("MatMulNBits(bits=8")])
    note("fp8/MXFP8 weights: ONNX Runtime runs DequantizeLinear on every call, then a float32 MatMul (no fused CPU "
         "kernel)", [layer.path for layer in layers if layer.onnx_op.startswith("DequantizeLinear")])
    note("W8A8 bias added to the residual (ONNX Runtime fuses it into SkipLayerNormalization; "
         "(r + b) + y instead of (y + b) + r, equal up to float32 rounding)", moved)
    return LoweredGraph(out, layers, notes)
