"""The CPU kernels of ``qcompile::quantized_linear``: torch's own packed CPU GEMMs, real int8 GEMM,
and float32 GEMM on a cached dequantized weight. Each takes ``x2 [M, K]`` and returns float32 ``[M, N]``.

Checked on torch 2.13 (``tests/codegen/test_cpu_kernels.py``, docs/kernels-cpu.md):

- ``aten._weight_int8pack_mm(x, w_int8 [N, K], scales [N])``: int8 symmetric per-channel weights,
  any N; its bfloat16 variant needs K a multiple of 16 (else padded, a cached copy). Scales must have x's dtype; only the bfloat16 variant is vectorized (float32 and
  float16 take 5-50x a float32 GEMM's time, docs/kernels-cpu.md), so x runs in bfloat16 and the
  kernel gets unit scales: the float32 scales are applied to its output, keeping them exact.
- ``aten._weight_int4pack_mm_for_cpu(x, packed, group, scale_and_zeros [K/group, N, 2])``:
  ``w = (code - 8) * scale + zero`` with a float ``zero``; our asymmetric ``(code - z) * s`` is
  ``(code - 8) * s + (8 - z) * s``. Groups 32/64/128/256 (a larger multiple of 32 repeats its scale),
  N a multiple of 16 (padded), K a multiple of the group (x zero-padded). bfloat16 is the
  vectorized variant, so scales and zeros are rounded to bfloat16 (2^-9 relative).
- ``torch._int_mm(int8 [M, K], int8 [K, N]) -> int32``: exact; W8A8 quantizes x per token with the
  formats library's own int8 encoder, so the result is the simulated reference's, computed in integers.
- ``aten._dyn_quant_matmul_4bit``: quantizes activations to int8 on the fly, so it is not W4A16;
  not used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qcompile.formats import QuantizedTensor, QuantSpec, dequantize, fake_quantize
from qcompile.formats.packing import unpack_bits
from qcompile.formats.registry import get_codec
from qcompile.formats.scales import to_groups
from qcompile.formats.spec import PER_CHANNEL, PER_TENSOR

INT4PACK_GROUPS = (256, 128, 64, 32)
"""``_weight_int4pack_mm_for_cpu``'s group sizes, largest first."""
INT4PACK_N_MULTIPLE = 16
"""``_convert_weight_to_int4pack_for_cpu`` needs N divisible by this."""
INT8PACK_K_MULTIPLE = 16
"""``_weight_int8pack_mm``'s bfloat16 variant reads out of bounds (NaN, or a crash) unless K is a multiple of this."""
INT8PACK_ALIGNMENT = 64
"""... and it crashes on weight codes not aligned to this many bytes (tensors read from a safetensors
file can start 8 bytes past an alignment boundary): such codes are packed as an aligned copy."""

_aten = torch.ops.aten


def has_op(name: str) -> bool:
    """Whether the installed torch has ``aten::<name>`` (torch 2.11-2.13 all do; guarded anyway)."""
    return hasattr(_aten, name)


def int4pack_group(spec: QuantSpec, in_features: int) -> int | None:
    """The kernel group size for an int4 weight (a divisor of its group), or None if none fits."""
    group = spec.group_size if spec.group_size != PER_CHANNEL else -(-in_features // 32) * 32
    return next((g for g in INT4PACK_GROUPS if group % g == 0), None)


@dataclass(frozen=True)
class Int4Packed:
    weight: torch.Tensor
    """``uint8`` in ``_convert_weight_to_int4pack_for_cpu``'s layout, ``[n_pad, k_pad / 2]``."""
    scale_and_zeros: torch.Tensor
    """bfloat16 ``[k_pad / group, n_pad, 2]``."""
    group: int
    k_pad: int
    n: int


def pack_int4(qt: QuantizedTensor) -> Int4Packed:
    """Repack a canonical int4 weight (nibble pairs along K, ``formats/packing.py``) for torch's CPU kernel."""
    n, k = qt.shape
    group = int4pack_group(qt.spec, k)
    if group is None:
        raise ValueError(f"int4 group size {qt.spec.group_size} is not a multiple of 32 ({qt.spec.short()})")
    codes = unpack_bits(qt.data, 4, qt.padded_k).to(torch.int32)
    scale = qt.scale.float()
    zero = (8.0 - qt.zero.float()) * scale if qt.zero is not None else torch.zeros_like(scale)
    k_pad = -(-qt.padded_k // group) * group
    repeat = qt.group_size // group if qt.spec.group_size != PER_CHANNEL else k_pad // group
    scale, zero = scale.repeat_interleave(repeat, dim=1), zero.repeat_interleave(repeat, dim=1)
    n_pad = -(-n // INT4PACK_N_MULTIPLE) * INT4PACK_N_MULTIPLE
    # padded K columns meet zero-padded x; padded N rows are sliced off the output
    codes = F.pad(codes, (0, k_pad - codes.shape[1], 0, n_pad - n), value=8)
    scale, zero = F.pad(scale, (0, 0, 0, n_pad - n)), F.pad(zero, (0, 0, 0, n_pad - n))
    weight = _aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
    scale_and_zeros = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
    return Int4Packed(weight, scale_and_zeros, group, k_pad, n)


def int4pack_linear(x2: torch.Tensor, packed: Int4Packed) -> torch.Tensor:
    xb = x2.to(torch.bfloat16)
    if packed.k_pad != xb.shape[1]:
        xb = F.pad(xb, (0, packed.k_pad - xb.shape[1]))
    y = _aten._weight_int4pack_mm_for_cpu(xb.contiguous(), packed.weight, packed.group, packed.scale_and_zeros)
    return y[:, :packed.n].float()


@dataclass(frozen=True)
class Int8Packed:
    padded: torch.Tensor | None
    """The int8 codes zero-padded to ``[N, k_pad]`` (or copied to aligned memory), or None when K is
    already a multiple of :data:`INT8PACK_K_MULTIPLE` and the stored codes, aligned, are used as
    they are (never referenced here: a cache entry must not keep its own weight alive)."""
    scale: torch.Tensor
    """float32 ``[N]`` per-channel scales, applied to the kernel's output."""
    ones: torch.Tensor
    """bfloat16 ``[N]`` unit scales for the kernel."""


def pack_int8(qt: QuantizedTensor) -> Int8Packed:
    n, k = qt.shape
    pad = -k % INT8PACK_K_MULTIPLE
    if pad:
        padded = F.pad(qt.data[:, :k], (0, pad)).contiguous()
    elif qt.data.data_ptr() % INT8PACK_ALIGNMENT or not qt.data.is_contiguous():
        padded = qt.data.contiguous().clone()
    else:
        padded = None
    return Int8Packed(padded, qt.scale.float().reshape(n), torch.ones(n, dtype=torch.bfloat16))


def int8pack_linear(x2: torch.Tensor, codes: torch.Tensor, packed: Int8Packed) -> torch.Tensor:
    """``codes``: the stored int8 ``[N, K]`` (used when ``packed.padded`` is None)."""
    weight = packed.padded if packed.padded is not None else codes
    xb = x2.to(torch.bfloat16)
    if weight.shape[1] != xb.shape[1]:
        xb = F.pad(xb, (0, weight.shape[1] - xb.shape[1]))
    return torch.mul(_aten._weight_int8pack_mm(xb.contiguous(), weight, packed.ones), packed.scale)


def int_mm_linear(x2: torch.Tensor, qt: QuantizedTensor, act_spec: QuantSpec) -> torch.Tensor:
    """W8A8: x quantized exactly as ``fake_quantize`` does (per token, or per tensor with a zero point),
    int32 GEMM, scales applied after. Per-tensor uint8 codes ``c`` with zero point ``z`` enter the GEMM
    as ``c - 128`` (int8), and ``(z - 128) · Σ_k w`` is subtracted: the same integer products."""
    k = qt.shape[1]
    w = qt.data[:, :k]
    if act_spec.group_size == PER_TENSOR:
        parts = get_codec(act_spec.format).encode(x2.float().reshape(1, 1, -1), act_spec)
        codes = (parts.codes.reshape(-1, k).to(torch.int16) - 128).to(torch.int8)
        offset = parts.zero.to(torch.int32).reshape(()) - 128
        acc = torch._int_mm(codes, w.t()) - offset * w.sum(dim=1, dtype=torch.int32)
        return acc.float() * (parts.scale.float().reshape(()) * qt.scale.float().reshape(1, -1))
    parts = get_codec(act_spec.format).encode(to_groups(x2.float(), k), act_spec)
    acc = torch._int_mm(parts.codes.reshape(-1, k), w.t())
    return acc.float() * (parts.scale.float().reshape(-1, 1) * qt.scale.float().reshape(1, -1))


SPLIT_LOW_DIVISOR = 254
"""The low term's scale is the high term's over this: the high term's rounding error is at most half
its scale, so the low codes fill [-127, 127]."""


def int8_split_linear(x2: torch.Tensor, qt: QuantizedTensor) -> torch.Tensor:
    """W8A16 on ``torch._int_mm``: x (float) written per token as ``s·q_hi + (s/254)·q_lo`` with int8
    codes, both terms in one int32 GEMM (``[q_hi; q_lo]``, so the weight is read once), recombined in
    float32. The expansion's error is at most ``amax(x)/64516`` per element (measured 3e-5 relative on
    the output, against 2.4e-3 for the bf16 rounding of ``_weight_int8pack_mm``), and the GEMM is
    exact: the int8 weight-only linear to float32 precision, at int8 speed."""
    m, k = x2.shape
    xf = x2.float()
    s_hi = xf.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
    q_hi = torch.round(xf / s_hi)
    s_lo = s_hi / SPLIT_LOW_DIVISOR
    q_lo = torch.round((xf - q_hi * s_hi) / s_lo).clamp_(-127, 127)
    acc = torch._int_mm(torch.cat([q_hi, q_lo]).to(torch.int8), qt.data[:, :k].t()).float()
    return (acc[:m] * s_hi + acc[m:] * s_lo) * qt.scale.float().reshape(1, -1)


def dequantize_float32(qt: QuantizedTensor) -> torch.Tensor:
    return dequantize(qt, torch.float32)


def dequant_linear(x2: torch.Tensor, w32: torch.Tensor, bias: torch.Tensor | None,
                   act_spec: QuantSpec | None) -> torch.Tensor:
    """The reference's arithmetic, op for op (fake-quantized x if ``act_spec``, float32 GEMM with the
    bias fused), on a given float32 weight: with the cached weight the result is the reference's, bit for bit."""
    xq = fake_quantize(x2, act_spec) if act_spec is not None else x2
    return F.linear(xq.float(), w32, bias.float() if bias is not None else None)
