"""Public entry points: quantize, dequantize, fake_quantize, quantization_error, bits_per_weight.

This module owns everything formats share: input validation, zero padding of
K to whole groups (and whole bytes), bit packing, and the re-quantization
fixed point that makes ``quantize(dequantize(qt))`` reproduce ``qt`` exactly.
"""

from __future__ import annotations

import math

import torch

from .codec import Parts
from .packing import pack_bits, packed_nbytes, padded_codes, unpack_bits
from .registry import get_codec
from .scales import SCALE_DTYPES, scale_torch_dtype, to_groups
from .spec import FIXED_BLOCK, INT_FORMATS, PER_TENSOR, QuantizedTensor, QuantSpec

_POLISH_ROUNDS = 4


def _check_spec(spec: QuantSpec) -> None:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"expected a QuantSpec, got {type(spec).__name__}")
    gs = spec.group_size
    if isinstance(gs, bool) or not isinstance(gs, int) or (gs < 0 and gs != PER_TENSOR):
        raise ValueError(f"group_size must be an int >= 0 (0 = per channel) or {PER_TENSOR} (per tensor), got {gs!r}")
    if spec.format not in FIXED_BLOCK:
        scale_torch_dtype(spec.scale_dtype)


def _as_matrix(w: torch.Tensor) -> torch.Tensor:
    """Validate a ``[rows, K]`` float tensor and return it as float32."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(w).__name__}")
    if not w.is_floating_point():
        raise ValueError(f"expected a floating-point tensor, got {w.dtype}")
    if w.dim() != 2:
        raise ValueError(
            f"quantize expects a 2-D [rows, K] tensor, got {w.dim()}-D shape {tuple(w.shape)} "
            "(reshape first; use fake_quantize for activations of any rank)")
    if w.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor of shape {tuple(w.shape)}")
    w32 = w.detach().float()
    if not bool(torch.isfinite(w32).all()):
        raise ValueError("tensor contains NaN or Inf")
    return w32


def _bits_view(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().reshape(-1).contiguous().view(torch.uint8)


def _same(a: Parts, b: Parts) -> bool:
    for x, y in zip(a, b):
        xb, yb = _bits_view(x), _bits_view(y)
        if (xb is None) != (yb is None):
            return False
        if xb is not None and not torch.equal(xb, yb):
            return False
    return True


def _encode(wg: torch.Tensor, spec: QuantSpec) -> Parts:
    codec = get_codec(spec.format)
    parts = codec.encode(wg, spec)
    if codec.polish(spec):
        # float32 scales and asymmetric zero points can be an ulp / a code off
        # the fixed point of quantize∘dequantize; a few rounds reach it (the
        # codes do not change, the scale moves by at most a few ulps).
        for _ in range(_POLISH_ROUNDS):
            again = codec.encode(codec.decode(parts, spec), spec)
            if _same(again, parts):
                break
            parts = again
    return parts


def quantize(w: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
    """Quantize a 2-D ``[rows, K]`` tensor to ``spec`` (groups run along K).

    K is zero-padded to whole groups (and whole bytes for packed formats);
    ``QuantizedTensor.shape`` keeps the logical ``(rows, K)``.
    Raises ``ValueError`` for non-2-D, empty or non-finite input.
    """
    _check_spec(spec)
    if spec.group_size == PER_TENSOR:
        raise ValueError(f"spec {spec.encode()}: per-tensor scales are for dynamic activations (fake_quantize); "
                         "weights take per-channel (pc) or group (gN) scales")
    w32 = _as_matrix(w)
    rows, k = w32.shape
    codec = get_codec(spec.format)
    wg = to_groups(w32, spec.group_size or k)
    parts = _encode(wg, spec)
    data = parts.codes.reshape(rows, -1)
    if codec.pack_bits is not None:
        extra = padded_codes(data.shape[1], codec.pack_bits) - data.shape[1]
        if extra:
            fill = codec.zero_code(parts).expand(rows, extra)
            data = torch.cat([data, fill], dim=1)
        data = pack_bits(data.contiguous(), codec.pack_bits)
    return QuantizedTensor(spec, (rows, k), data.contiguous(), parts.scale.contiguous(),
                           parts.zero, parts.global_scale)


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reconstruct the logical ``[rows, K]`` tensor (padding dropped) in ``dtype``."""
    spec = qt.spec
    codec = get_codec(spec.format)
    rows, k = qt.shape
    n_groups, group = qt.scale.shape[1], qt.group_size
    padded = n_groups * group
    if qt.scale.shape[0] != rows or padded < k:
        raise ValueError(f"scale shape {tuple(qt.scale.shape)} does not fit shape {qt.shape} "
                         f"with group_size {group}")
    if codec.pack_bits is not None:
        codes = unpack_bits(qt.data, codec.pack_bits, padded)
    else:
        codes = qt.data[:, :padded]
    if tuple(codes.shape) != (rows, padded):
        raise ValueError(f"data shape {tuple(qt.data.shape)} does not fit shape {qt.shape}")
    parts = Parts(codes.reshape(rows, n_groups, group), qt.scale, qt.zero, qt.global_scale)
    out = codec.decode(parts, spec).reshape(rows, padded)[:, :k]
    return out.to(dtype)


def fake_quantize(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize-dequantize ``x`` along its last dim (rows = all leading dims, e.g. tokens; a
    ``PER_TENSOR`` spec takes the whole tensor as one group).

    Same shape and dtype as ``x``; scales are always computed from ``x``
    itself (dynamic). Not differentiable; no NaN/Inf check (they propagate
    into their row/group), to stay cheap on the inference path.
    """
    _check_spec(spec)
    if not x.is_floating_point():
        raise ValueError(f"fake_quantize expects a floating-point tensor, got {x.dtype}")
    if x.numel() == 0:
        return x.clone()
    k = (x.numel() if spec.group_size == PER_TENSOR else x.shape[-1]) if x.dim() else 1
    w = x.detach().reshape(-1, k).float()
    codec = get_codec(spec.format)
    wg = to_groups(w, spec.group_size if spec.group_size > 0 else k)
    out = codec.decode(codec.encode(wg, spec), spec).reshape(w.shape[0], -1)[:, :k]
    return out.reshape(x.shape).to(x.dtype)


def quantization_error(w: torch.Tensor, qt: QuantizedTensor) -> float:
    """Relative Frobenius error ``||w - dequantize(qt)|| / ||w||`` (0 for an exact all-zero w)."""
    if tuple(w.shape) != tuple(qt.shape):
        raise ValueError(f"w has shape {tuple(w.shape)} but qt has shape {qt.shape}")
    w32 = w.detach().float()
    diff = float(torch.linalg.vector_norm(w32 - dequantize(qt).to(w32.device)))
    ref = float(torch.linalg.vector_norm(w32))
    if ref == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / ref


def scale_nbytes(spec: QuantSpec) -> int:
    """Bytes of one stored scale: 1 for NVFP4 (e4m3) and MX (e8m0), else ``scale_dtype``'s size."""
    if spec.format in FIXED_BLOCK:
        return 1
    return torch.empty((), dtype=SCALE_DTYPES[spec.scale_dtype]).element_size()


def bits_per_weight(spec: QuantSpec, k: int, rows: int | None = None) -> float:
    """Effective stored bits per logical weight of a ``[rows, k]`` matrix.

    Counts packed codes (with padding), scales and zero points; with ``rows``
    also NVFP4's 4-byte global scale. ``bits_per_weight(spec, k, rows) * rows * k / 8``
    equals ``quantize(w, spec).nbytes()``.
    """
    _check_spec(spec)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    group = spec.group_size or k
    n_groups = -(-k // group)
    codec = get_codec(spec.format)
    if codec.pack_bits is None:
        data = n_groups * group
    else:
        data = packed_nbytes(n_groups * group, codec.pack_bits)
    per_row = data + n_groups * scale_nbytes(spec)
    if not spec.symmetric and spec.format in INT_FORMATS:
        per_row += n_groups
    total = per_row * (rows or 1)
    if rows and spec.format == "nvfp4":
        total += 4
    return 8.0 * total / (k * (rows or 1))
