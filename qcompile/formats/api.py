"""Public entry points: quantize, dequantize, fake_quantize, error and size accounting.

Every tensor is handled as ``[rows, K]`` with groups along K; K is zero-padded
to whole groups (and whole bytes when packed). The per-format modules work on
grouped views ``[rows, n_groups, group]``; this module does validation,
padding, packing and the layout contract of :class:`QuantizedTensor`.
"""

from __future__ import annotations

import torch

from .common import scale_dtype
from .floating import E2M1_VALUES, FP8_DTYPES, quantize_fp4, quantize_fp8
from .integer import dequantize_int, quantize_int
from .microscaling import dequantize_mx, dequantize_nvfp4, quantize_mx, quantize_nvfp4
from .packing import pack_bits, packed_width, unpack_bits
from .spec import FIXED_BLOCK, INT_FORMATS, QuantizedTensor, QuantSpec

PACKED_FORMATS = ("int4", "int3", "int2", "fp4_e2m1", "nvfp4", "mxfp4")
"""Formats whose codes are bit-packed into uint8 along K."""


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (exact passes check in float64); everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _group(spec: QuantSpec, k: int) -> int:
    return spec.group_size or k


def _check_2d(w: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"quantize expects a 2-D [rows, K] tensor, got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"quantize expects a floating-point tensor, got {w.dtype}")
    if w.shape[1] == 0:
        raise ValueError("quantize expects K >= 1, got an empty last dimension")


def _grouped(w: torch.Tensor, g: int) -> torch.Tensor:
    """Zero-pad K to a multiple of ``g`` and view as ``[rows, n_groups, g]``."""
    rows, k = w.shape
    pad = (-k) % g
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(rows, -1, g)


def _quantize_grouped(
    wg: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(codes [r,G,g] unpacked, scale, zero, global_scale) for grouped input."""
    fmt = spec.format
    if fmt in INT_FORMATS:
        codes, scale, zero = quantize_int(wg, spec.bits, spec.symmetric, scale_dtype(spec.scale_dtype))
        return codes, scale, zero, None
    if fmt in FP8_DTYPES:
        data, scale = quantize_fp8(wg, fmt, scale_dtype(spec.scale_dtype))
        return data, scale, None, None
    if fmt == "fp4_e2m1":
        codes, scale = quantize_fp4(wg, scale_dtype(spec.scale_dtype))
        return codes, scale, None, None
    if fmt == "nvfp4":
        codes, scale, gs = quantize_nvfp4(wg)
        return codes, scale, None, gs
    codes, scale = quantize_mx(wg, fmt)
    return codes, scale, None, None


def _dequantize_grouped(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
    gs: torch.Tensor | None, spec: QuantSpec, dtype: torch.dtype,
) -> torch.Tensor:
    """Values ``[r, G, g]`` in ``dtype`` (float32 or float64) from unpacked grouped codes."""
    fmt = spec.format
    if fmt in INT_FORMATS:
        return dequantize_int(codes, scale, zero, spec.bits, dtype)
    if fmt in FP8_DTYPES:
        return codes.to(dtype) * scale.to(dtype).unsqueeze(-1)
    if fmt == "fp4_e2m1":
        return E2M1_VALUES.to(device=codes.device, dtype=dtype)[codes.long()] * scale.to(dtype).unsqueeze(-1)
    if fmt == "nvfp4":
        return dequantize_nvfp4(codes, scale, gs).to(dtype)
    return dequantize_mx(codes, scale, fmt).to(dtype)


def quantize(w: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
    """Quantize a 2-D ``[rows, K]`` tensor to ``spec`` in the canonical layout.

    Raises ValueError for non-2-D input or non-finite values (a NaN would
    silently poison a whole group's scale).
    """
    _check_2d(w)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("tensor contains NaN or Inf; cannot quantize")
    rows, k = w.shape
    g = _group(spec, k)
    wg = _grouped(w.to(_compute_dtype(w.dtype)), g)
    codes, scale, zero, gs = _quantize_grouped(wg, spec)
    codes = codes.reshape(rows, -1)
    if spec.format in PACKED_FORMATS:
        data = pack_bits(codes, spec.bits)
    elif spec.format == "int8" and spec.symmetric:
        data = (codes.to(torch.int16) - 128).to(torch.int8)  # stored signed
    else:
        data = codes
    return QuantizedTensor(spec, (rows, k), data.contiguous(), scale.contiguous(),
                           None if zero is None else zero.contiguous(), gs)


def _codes(qt: QuantizedTensor) -> torch.Tensor:
    """Unpacked, unsigned (or fp8) codes ``[rows, padded_k]``."""
    spec = qt.spec
    if spec.format in PACKED_FORMATS:
        return unpack_bits(qt.data, spec.bits, qt.padded_k)
    if spec.format == "int8" and spec.symmetric:
        return (qt.data.to(torch.int16) + 128).to(torch.uint8)
    return qt.data


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reconstruct the logical ``[rows, K]`` tensor (padding dropped) in ``dtype``."""
    rows, k = qt.shape
    g = qt.group_size
    codes = _codes(qt).reshape(rows, -1, g)
    vals = _dequantize_grouped(codes, qt.scale, qt.zero, qt.global_scale, qt.spec, _compute_dtype(dtype))
    return vals.reshape(rows, -1)[:, :k].to(dtype)


def fake_quantize(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize-dequantize along the last dim of any-rank ``x``; same shape and dtype.

    Skips packing and the finiteness check (this runs per linear call at
    inference); non-finite values propagate to their group.
    """
    if x.numel() == 0:
        return x.clone()
    k = x.shape[-1]
    g = _group(spec, k)
    w = x.reshape(-1, k).to(_compute_dtype(x.dtype))
    rows = w.shape[0]
    codes, scale, zero, gs = _quantize_grouped(_grouped(w, g), spec)
    vals = _dequantize_grouped(codes, scale, zero, gs, spec, w.dtype)
    return vals.reshape(rows, -1)[:, :k].reshape(x.shape).to(x.dtype)


def quantization_error(w: torch.Tensor, qt: QuantizedTensor) -> float:
    """Relative Frobenius error ‖w − dequantize(qt)‖ / ‖w‖ (0 for an exact zero tensor)."""
    ref = w.to(torch.float64)
    diff = torch.linalg.norm(ref - dequantize(qt, torch.float64))
    norm = torch.linalg.norm(ref)
    if norm == 0:
        return 0.0 if diff == 0 else float("inf")
    return float(diff / norm)


_SCALE_BITS = {"float16": 16, "bfloat16": 16, "float32": 32}


def bits_per_weight(spec: QuantSpec, k: int) -> float:
    """Stored bits per logical weight of a row of ``k`` elements: codes (with
    padding), scales and zero points. NVFP4's single fp32 global scale is per
    tensor and not counted (it amortizes to ~0)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    g = _group(spec, k)
    n_groups = -(-k // g)
    padded = n_groups * g
    data_bits = packed_width(padded, spec.bits) * 8
    scale_bits = 8 if spec.format in FIXED_BLOCK else _SCALE_BITS[spec.scale_dtype]
    zero_bits = 0 if spec.symmetric else 8
    return (data_bits + n_groups * (scale_bits + zero_bits)) / k
