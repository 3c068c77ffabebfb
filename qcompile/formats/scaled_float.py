"""Plain scaled float formats: fp8_e4m3, fp8_e5m2 and fp4_e2m1 with one scale per group/channel.

``scale = amax / max_finite(format)`` (448, 57344, 6) in ``spec.scale_dtype``;
elements are ``w / scale`` rounded to nearest-even and saturated. FP8 data is
stored as ``torch.float8_*`` ``[rows, K]``; FP4 as packed E2M1 codes.
"""

from __future__ import annotations

import torch

from .codec import Codec, Parts, zero_code_const
from .floating import E2M1_MAX, FP8_MAX, fp4_e2m1_decode, fp4_e2m1_encode, fp8_cast
from .scales import cast_scale, scale_torch_dtype
from .spec import QuantSpec


def _max(fmt: str) -> float:
    return E2M1_MAX if fmt == "fp4_e2m1" else FP8_MAX[fmt]


def encode(wg: torch.Tensor, spec: QuantSpec) -> Parts:
    scale = cast_scale(wg.abs().amax(dim=-1) / _max(spec.format), scale_torch_dtype(spec.scale_dtype))
    x = wg / scale.float().unsqueeze(-1)
    codes = fp4_e2m1_encode(x) if spec.format == "fp4_e2m1" else fp8_cast(x, spec.format)
    return Parts(codes, scale)


def decode(parts: Parts, spec: QuantSpec) -> torch.Tensor:
    values = fp4_e2m1_decode(parts.codes) if spec.format == "fp4_e2m1" else parts.codes.float()
    return values * parts.scale.float().unsqueeze(-1)


FP8_CODEC = Codec(encode, decode, None)
FP4_CODEC = Codec(encode, decode, 4, zero_code_const(0))
