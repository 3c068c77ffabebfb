"""Export-only ``torch.library`` ops: each is one ONNX Runtime construct, with an eager kernel that is
the reference of that construct's semantics, a fake kernel (so graphs holding them trace), and its
onnxscript translation (:data:`TRANSLATIONS`, handed to ``torch.onnx.export``).

- ``qcompile_onnx::matmul_nbits`` → ``com.microsoft.MatMulNBits``: ``y = x · ((code − zero) ·
  scale)ᵀ + bias`` with codes and zero points packed low bits first (``repack.NBitsWeight``).
- ``qcompile_onnx::dequantize_matmul`` → ``DequantizeLinear`` (opset 21, blocked along K or per
  column) + ``MatMul`` (+ ``Add``): fp8 weights.
- ``qcompile_onnx::int8_dynamic_matmul`` → W8A8 as qcompile computes it: per token ``s =
  cast(clip(max|x| / 127, tiny, max), scale dtype)``, ``QuantizeLinear(x / s, 1, 128)`` (uint8 codes
  ``round(x / s) + 128``: the division is the reference's, the unit-scale QuantizeLinear rounds half
  to even like ``torch.round`` and adds the offset),
  ``MatMulInteger(q, B, 128)``, then ``Cast · (s · b_scale)`` (ORT fuses these into
  ``MatMulIntegerToFloat``) and ``− (−bias)``: written as a Sub so that the fusion does not take the
  bias in, which ORT 1.32's kernel then multiplies by the per-token scale. The ``+128`` offset keeps
  ORT on its u8×s8 kernel (its s8×s8 path was 8× slower, docs/onnx-export.md); the integer products
  are the same.
- ``qcompile_onnx::hadamard`` → the online Hadamard ``x · diag(signs) · (L ⊗ R)`` in at most five
  nodes: ``Mul`` (signs), ``Reshape`` to ``[0, …, 0, a, c]`` (a constant: the leading axes are copied),
  ``MatMul(L, ·)`` by the ``±1`` Sylvester ``L = H_a``, ``MatMul(·, R)`` by the dense ``c × c`` ``R``
  (the low Sylvester digits ⊗ the block, times the scale), ``Reshape`` to ``[0, …, 0, n]``.
  ``O(n (a + c))`` work with ``a ≈ c ≈ √n``; no ``Shape`` ops (``lowering.hadamard_factors``).
- ``qcompile_onnx::uint8_per_tensor_matmul`` → W8A8 with per-tensor asymmetric uint8 activations
  (``int8-pt-asym`` specs): ``DynamicQuantizeLinear``, ``MatMulInteger(q, B, z)``, ``Cast · (s · b_scale)
  + bias``: the form ``quantize_dynamic`` writes, which ONNX Runtime fuses into
  ``DynamicQuantizeMatMul`` (or one shared ``DynamicQuantizeLinear`` + ``MatMulIntegerToFloat``s).

The MatMulNBits schema is built here and handed to onnxscript as an ``Op``; nothing is registered
globally. ``accuracy_level`` is passed through: the eager kernel computes in float32, which is what
ORT does at levels 0 and 1 (level 4 quantizes ``x`` to int8 per block inside ORT).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch
from onnx.defs import OpSchema
from onnxscript import opset21 as op
from onnxscript import values as osv

from qcompile.formats import unpack_bits
from qcompile.formats.scales import SCALE_DTYPES

OPSET = 21
"""The default-domain opset of the exported file (blocked ``DequantizeLinear``/``QuantizeLinear``)."""


# ------------------------------------------------------------------------- MatMulNBits
def nbits_dequantize(b: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None, k: int, n: int,
                     bits: int, block_size: int) -> torch.Tensor:
    """MatMulNBits' weight ``[N, K]`` in float32: ``(code − zero) · scale`` per block."""
    blocks = b.shape[1]
    codes = unpack_bits(b.reshape(n, -1), bits, blocks * block_size).reshape(n, blocks, block_size).float()
    if zero_points is None:
        zero = torch.full((n, blocks, 1), float(2 ** (bits - 1)))
    else:
        zero = unpack_bits(zero_points.reshape(n, -1), bits, blocks).float().unsqueeze(-1)
    w = (codes - zero) * scales.reshape(n, blocks, 1).float()
    return w.reshape(n, -1)[:, :k]


@torch.library.custom_op("qcompile_onnx::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                 bias: torch.Tensor | None, k: int, n: int, bits: int, block_size: int,
                 accuracy_level: int) -> torch.Tensor:
    """``com.microsoft.MatMulNBits`` (see the module docstring)."""
    w = nbits_dequantize(b, scales, zero_points, k, n, bits, block_size)
    return torch.nn.functional.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)


@matmul_nbits.register_fake
def _(x, b, scales, zero_points, bias, k, n, bits, block_size, accuracy_level):
    return x.new_empty((*x.shape[:-1], n))


def _nbits_schema() -> OpSchema:
    param, optional = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    attr = OpSchema.Attribute
    return OpSchema(
        "MatMulNBits", "com.microsoft", 1,
        inputs=[param("A", "T1"), param("B", "T2"), param("scales", "T1"), param("zero_points", "T3", param_option=optional),
                param("g_idx", "T4", param_option=optional), param("bias", "T1", param_option=optional)],
        outputs=[param("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
                          ("T2", ["tensor(uint8)"], ""), ("T3", ["tensor(uint8)"], ""), ("T4", ["tensor(int32)"], "")],
        attributes=[attr("K", OpSchema.AttrType.INT, ""), attr("N", OpSchema.AttrType.INT, ""),
                    attr("bits", OpSchema.AttrType.INT, ""), attr("block_size", OpSchema.AttrType.INT, ""),
                    attr("accuracy_level", OpSchema.AttrType.INT, "", required=False)],
    )


_MATMUL_NBITS = osv.Op(osv.Opset("com.microsoft", 1), "MatMulNBits", _nbits_schema())


def _translate_matmul_nbits(x, b, scales, zero_points, bias, k, n, bits, block_size, accuracy_level):
    # level 0 is the attribute's default: left out, as ORT's own quantizer does (not every EP takes it)
    level = {"accuracy_level": accuracy_level} if accuracy_level else {}
    return _MATMUL_NBITS(x, b, scales, zero_points, None, bias, K=k, N=n, bits=bits, block_size=block_size, **level)


# ------------------------------------------------------------------------- DequantizeLinear + MatMul
@torch.library.custom_op("qcompile_onnx::dequantize_matmul", mutates_args=())
def dequantize_matmul(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                      block_size: int) -> torch.Tensor:
    """``MatMul(x, DequantizeLinear(data [K, N], scale))`` (+ bias): ``scale`` is ``[ceil(K / block), N]``
    blocked along K, or ``[N]`` per column with ``block_size`` 0."""
    w = data.float()
    s = scale.float()
    if block_size:
        s = s.repeat_interleave(block_size, dim=0)[: w.shape[0]]
    y = x.float() @ (w * s)
    return (y + bias.float() if bias is not None else y).to(x.dtype)


@dequantize_matmul.register_fake
def _(x, data, scale, bias, block_size):
    return x.new_empty((*x.shape[:-1], data.shape[1]))


def _translate_dequantize_matmul(x, data, scale, bias, block_size):
    if block_size:
        w = op.DequantizeLinear(data, scale, axis=0, block_size=block_size)
    else:
        w = op.DequantizeLinear(data, scale, axis=1)
    y = op.MatMul(x, w)
    return op.Add(y, bias) if bias is not None else y


# ------------------------------------------------------------------------- W8A8
def _const(value, dtype) -> ir.Value:
    return op.Constant(value=ir.tensor(np.array(value, dtype=dtype)))


def _scale_limits(scale_dtype: str) -> tuple[float, float]:
    info = torch.finfo(SCALE_DTYPES[scale_dtype])
    return float(info.tiny), float(info.max)


@torch.library.custom_op("qcompile_onnx::int8_dynamic_matmul", mutates_args=())
def int8_dynamic_matmul(x: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, bias: torch.Tensor | None,
                        scale_dtype: str) -> torch.Tensor:
    """W8A8 with per-token symmetric int8 activations (see the module docstring); ``b`` int8 ``[K, N]``."""
    tiny, top = _scale_limits(scale_dtype)
    xf = x.float()
    s = (xf.abs().amax(dim=-1, keepdim=True) / 127.0).clamp(tiny, top).to(SCALE_DTYPES[scale_dtype]).float()
    q = torch.round(xf / s).clamp(-128, 127)
    acc = (q.double() @ b.double()).float()  # exact: the int32 product
    y = acc * (s * b_scale.float())
    return (y + bias.float() if bias is not None else y).to(x.dtype)


@int8_dynamic_matmul.register_fake
def _(x, b, b_scale, bias, scale_dtype):
    return x.new_empty((*x.shape[:-1], b.shape[1]))


_ONNX_SCALE_TYPES = {"float16": ir.DataType.FLOAT16, "bfloat16": ir.DataType.BFLOAT16, "float32": ir.DataType.FLOAT}


def _translate_int8_dynamic_matmul(x, b, b_scale, bias, scale_dtype):
    tiny, top = _scale_limits(scale_dtype)
    amax = op.ReduceMax(op.Abs(x), _const([-1], np.int64), keepdims=1)
    s = op.Clip(op.Div(amax, _const(127.0, np.float32)), _const(tiny, np.float32), _const(top, np.float32))
    if scale_dtype != "float32":
        s = op.Cast(op.Cast(s, to=_ONNX_SCALE_TYPES[scale_dtype]), to=ir.DataType.FLOAT)
    offset = _const(128, np.uint8)
    # x / s rounds exactly as the reference does; a unit-scale per-tensor QuantizeLinear then rounds and
    # adds the offset (ONNX Runtime's vectorised path; one op fewer than a blocked QuantizeLinear
    # whose zero points must be expanded to the scales' run-time shape)
    q = op.QuantizeLinear(op.Div(x, s), _const(1.0, np.float32), offset)
    acc = op.MatMulInteger(q, b, offset)
    y = op.Mul(op.Cast(acc, to=ir.DataType.FLOAT), op.Mul(s, b_scale))
    # y - (-bias) is y + bias exactly, but keeps ORT's MatMulIntegerToFloat fusion from taking the bias
    # in: its kernel scales a fused bias by a per-token a_scale (bias · s added; ORT 1.32, docs/onnx-export.md)
    return op.Sub(y, op.Neg(bias)) if bias is not None else y


@torch.library.custom_op("qcompile_onnx::uint8_per_tensor_matmul", mutates_args=())
def uint8_per_tensor_matmul(x: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                            bias: torch.Tensor | None) -> torch.Tensor:
    """W8A8 with per-tensor asymmetric uint8 activations: ONNX's ``DynamicQuantizeLinear`` (``s = (max(x, 0)
    − min(x, 0)) / 255`` in float32, 1 for an all-zero ``x``; ``z = round(−min / s)``; codes ``round(x / s) +
    z``, saturated), then ``(codes − z) · B · (s · b_scale) + bias``; ``b`` int8 ``[K, N]``."""
    xf = x.float()
    lo, hi = xf.min().clamp(max=0.0), xf.max().clamp(min=0.0)
    s = torch.where(hi > lo, (hi - lo) / 255.0, torch.ones_like(hi))
    z = torch.round(-lo / s).clamp(0, 255)
    q = (torch.round(xf / s) + z).clamp(0, 255)
    acc = ((q - z).double() @ b.double()).float()  # exact: the int32 product
    y = acc * (s * b_scale.float())
    return (y + bias.float() if bias is not None else y).to(x.dtype)


@uint8_per_tensor_matmul.register_fake
def _(x, b, b_scale, bias):
    return x.new_empty((*x.shape[:-1], b.shape[1]))


def _translate_uint8_per_tensor_matmul(x, b, b_scale, bias):
    q, s, z = op.DynamicQuantizeLinear(x)
    y = op.Mul(op.Cast(op.MatMulInteger(q, b, z), to=ir.DataType.FLOAT), op.Mul(s, b_scale))
    # the form ONNX Runtime's quantize_dynamic writes, which it fuses into DynamicQuantizeMatMul (bias
    # included: with a scalar a_scale its fused bias is right)
    return op.Add(y, bias) if bias is not None else y


# ------------------------------------------------------------------------- online Hadamard
@torch.library.custom_op("qcompile_onnx::hadamard", mutates_args=())
def hadamard(x: torch.Tensor, signs: torch.Tensor | None, left: torch.Tensor | None, right: torch.Tensor,
             rank: int, groups: int = 1) -> torch.Tensor:
    """``x · diag(signs) · (left ⊗ right)`` along the last dimension (see the module docstring): the
    last axis viewed as ``[a, c]`` (``a`` = ``left``'s order, 1 without it, ``c`` = ``right``'s),
    ``left`` applied from the left, ``right`` from the right; ``rank`` is ``x``'s (for the translation's
    constant shapes). ``groups > 1`` (no ``left``): ``x · (I_groups ⊗ right)``, the last axis viewed as
    ``[groups, c]``."""
    c = right.shape[0]
    y = x.float()
    if signs is not None:
        y = y * signs.float()
    if groups > 1:
        return (y.reshape(*x.shape[:-1], groups, c) @ right.float()).reshape(x.shape).to(x.dtype)
    if left is None:
        return (y @ right.float()).to(x.dtype)
    y = torch.matmul(left.float(), y.reshape(*x.shape[:-1], x.shape[-1] // c, c)) @ right.float()
    return y.reshape(x.shape).to(x.dtype)


@hadamard.register_fake
def _(x, signs, left, right, rank, groups=1):
    return torch.empty_like(x)


def _static_rows(v) -> int:
    shape = v.shape if v.shape is not None else getattr(v.const_value, "shape", None)
    if shape is None:
        raise ValueError(f"qcompile_onnx::hadamard: the factor {v.name} has no static shape")
    return int(shape[0])


def _translate_hadamard(x, signs, left, right, rank, groups=1):
    y = op.Mul(x, signs) if signs is not None else x
    keep = [0] * (rank - 1)  # Reshape's 0: copy that axis from the input (batch, sequence stay dynamic)
    c = _static_rows(right)
    if groups > 1:  # I_groups ⊗ right: Reshape, one MatMul, Reshape
        y = op.MatMul(op.Reshape(y, _const(keep + [groups, c], np.int64)), right)
        return op.Reshape(y, _const(keep + [groups * c], np.int64))
    if left is None:
        return op.MatMul(y, right)
    a = _static_rows(left)
    y = op.Reshape(y, _const(keep + [a, c], np.int64))
    y = op.MatMul(op.MatMul(left, y), right)
    return op.Reshape(y, _const(keep + [a * c], np.int64))


TRANSLATIONS = {
    torch.ops.qcompile_onnx.matmul_nbits.default: _translate_matmul_nbits,
    torch.ops.qcompile_onnx.dequantize_matmul.default: _translate_dequantize_matmul,
    torch.ops.qcompile_onnx.int8_dynamic_matmul.default: _translate_int8_dynamic_matmul,
    torch.ops.qcompile_onnx.uint8_per_tensor_matmul.default: _translate_uint8_per_tensor_matmul,
    torch.ops.qcompile_onnx.hadamard.default: _translate_hadamard,
}
"""``custom_translation_table`` for ``torch.onnx.export``."""

MATMUL_NBITS = torch.ops.qcompile_onnx.matmul_nbits.default
DEQUANTIZE_MATMUL = torch.ops.qcompile_onnx.dequantize_matmul.default
INT8_DYNAMIC_MATMUL = torch.ops.qcompile_onnx.int8_dynamic_matmul.default
UINT8_PER_TENSOR_MATMUL = torch.ops.qcompile_onnx.uint8_per_tensor_matmul.default
HADAMARD = torch.ops.qcompile_onnx.hadamard.default
