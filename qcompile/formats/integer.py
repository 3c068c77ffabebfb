"""Integer formats int8/int4/int3/int2, symmetric or asymmetric, per group or per channel.

Symmetric: ``scale = amax / (2**(b-1) - 1)``, ``q = clamp(round(w / scale), -2**(b-1), 2**(b-1) - 1)``;
int8 stores ``q`` as ``torch.int8``, narrower widths store the unsigned code
``q + 2**(b-1)`` (so 0.0 is code ``2**(b-1)``) and are bit-packed.

Asymmetric: the range is widened to include 0 (``min <= 0 <= max``, the GPTQ
convention, so that 0.0 and zero padding are exact), ``scale = (max - min) / (2**b - 1)``,
``zero = round(-min / scale)`` and ``code = clamp(round(w / scale) + zero, 0, 2**b - 1)``,
all stored ``uint8`` (int8 asymmetric codes are therefore ``uint8``, like ONNX's
``DequantizeLinear`` with a ``uint8`` zero point). Dynamic asymmetric activations with float32
scales compute ``scale = (max - min) / (2**b - 1)`` in float32, as ONNX's ``DynamicQuantizeLinear``
does (per tensor, that is its exact definition).
"""

from __future__ import annotations

import torch

from .codec import Codec, Parts, zero_code_const
from .scales import cast_scale, scale_torch_dtype
from .spec import QuantSpec


def _qmax(spec: QuantSpec) -> int:
    return 2 ** (spec.bits - 1) - 1


def encode(wg: torch.Tensor, spec: QuantSpec) -> Parts:
    sdtype = scale_torch_dtype(spec.scale_dtype)
    if spec.symmetric:
        qmax = _qmax(spec)
        scale = cast_scale(wg.abs().amax(dim=-1) / qmax, sdtype)
        q = torch.round(wg / scale.float().unsqueeze(-1)).clamp_(-qmax - 1, qmax)
        if spec.bits == 8:
            return Parts(q.to(torch.int8), scale)
        return Parts((q + (qmax + 1)).to(torch.uint8), scale)
    top = 2**spec.bits - 1
    lo = wg.amin(dim=-1).clamp(max=0.0)
    hi = wg.amax(dim=-1).clamp(min=0.0)
    if spec.dynamic and spec.scale_dtype == "float32":
        # Activations, never re-quantized: ONNX's DynamicQuantizeLinear convention, float32 arithmetic
        # (an all-zero group gets scale 1), so that ONNX Runtime computes the same codes.
        scale = torch.where(hi > lo, (hi - lo) / top, torch.ones_like(hi))
    else:
        # Rounded down so that (hi - lo) / scale >= top: with zero = -round(lo / scale)
        # the min lands on code 0 and the max on code `top` (barring exact ties),
        # so re-quantizing the dequantized tensor reproduces scale and zero.
        scale = cast_scale((hi.double() - lo.double()) / top, sdtype, round_down=True)
    s = scale.float()
    zero = torch.round(-lo / s).clamp_(0, top)
    codes = (torch.round(wg / s.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp_(0, top)
    return Parts(codes.to(torch.uint8), scale, zero.to(torch.uint8))


def decode(parts: Parts, spec: QuantSpec) -> torch.Tensor:
    s = parts.scale.float().unsqueeze(-1)
    if parts.zero is not None:
        return (parts.codes.float() - parts.zero.float().unsqueeze(-1)) * s
    if parts.codes.dtype == torch.int8:
        return parts.codes.float() * s
    return (parts.codes.float() - 2 ** (spec.bits - 1)) * s


def _zero_code(bits: int):
    sym = zero_code_const(2 ** (bits - 1))

    def zero_code(parts: Parts) -> torch.Tensor:
        if parts.zero is None:
            return sym(parts)
        return parts.zero[:, -1:]

    return zero_code


def _polish(spec: QuantSpec) -> bool:
    return spec.scale_dtype == "float32" or not spec.symmetric


def codec(bits: int) -> Codec:
    packed = None if bits == 8 else bits
    return Codec(encode, decode, packed, _zero_code(bits), _polish)
