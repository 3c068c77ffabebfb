"""Block formats with hardware-defined scales: NVFP4, MXFP4, MXFP8.

NVFP4 (NVIDIA, two-level): ``global_scale = amax(tensor) / (6 * 448)`` (float32);
per 16-element block ``block_scale = e4m3((block_amax / 6) / global_scale)``;
elements ``e2m1(w / (block_scale * global_scale))``. Dequantize:
``e2m1 * block_scale * global_scale``.

MX (OCP Microscaling v1.0): per 32-element block a shared E8M0 scale
``X = 2**(floor(log2(block_amax)) - emax_elem)`` (emax_elem 2 for E2M1, 8 for
E4M3), stored as the biased exponent ``uint8`` (127 ↔ 2**0, 255 = NaN);
elements ``w / X`` rounded to nearest-even, saturating. All-zero blocks get
the smallest scale (code 0, 2**-127), as the OCP reference code does.
"""

from __future__ import annotations

import torch

from .codec import Codec, Parts, zero_code_const
from .floating import E2M1_EMAX, E2M1_MAX, E4M3_MAX, fp4_e2m1_decode, fp4_e2m1_encode, fp8_cast
from .spec import QuantSpec

E4M3_EMAX = 8
E4M3_MIN_NORMAL = 2.0**-6
NVFP4_GLOBAL_DIVISOR = E2M1_MAX * E4M3_MAX  # 2688
E8M0_BIAS = 127
E8M0_NAN = 255


# ---------------------------------------------------------------- E8M0 scales

def e8m0_decode(codes: torch.Tensor) -> torch.Tensor:
    """Biased-exponent ``uint8`` → float32 power of two (255 → NaN), built from bits so it is exact."""
    c = codes.to(torch.int32)
    bits = torch.where(c == 0, torch.full_like(c, 1 << 22), c << 23)  # code 0 is the subnormal 2**-127
    bits = torch.where(c == E8M0_NAN, torch.full_like(c, 0x7FC00000), bits)
    return bits.view(torch.float32)


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """Exact ``2.0**e`` (float32) for integer ``e`` in [-126, 127]."""
    return ((e.to(torch.int32) + E8M0_BIAS) << 23).view(torch.float32)


def mx_scale_exponent(amax: torch.Tensor, emax_elem: int) -> torch.Tensor:
    """Unbiased shared exponent ``floor(log2(amax)) - emax_elem`` clamped to [-127, 127] (int32).

    ``frexp`` gives ``floor(log2)`` exactly (``log2`` can round up just below a
    power of two); zero blocks get -127.
    """
    _, exp = torch.frexp(amax.float())
    e = (exp.to(torch.int32) - 1 - emax_elem).clamp_(-E8M0_BIAS, E8M0_BIAS)
    return torch.where(amax > 0, e, torch.full_like(e, -E8M0_BIAS))


def _mx_encode(wg: torch.Tensor, spec: QuantSpec) -> Parts:
    emax = E2M1_EMAX if spec.format == "mxfp4" else E4M3_EMAX
    e = mx_scale_exponent(wg.abs().amax(dim=-1), emax)
    # -e is in [-125, 127], so 2**-e is a normal float32 and the product is exact.
    x = wg * _pow2(-e).unsqueeze(-1)
    codes = fp4_e2m1_encode(x) if spec.format == "mxfp4" else fp8_cast(x, "fp8_e4m3")
    return Parts(codes, (e + E8M0_BIAS).to(torch.uint8))


def _mx_decode(parts: Parts, spec: QuantSpec) -> torch.Tensor:
    values = fp4_e2m1_decode(parts.codes) if spec.format == "mxfp4" else parts.codes.float()
    return values * e8m0_decode(parts.scale).unsqueeze(-1)


# ---------------------------------------------------------------------- NVFP4

def nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """``amax / (6 * 448)`` as a float32 scalar, 1.0 for an all-zero tensor.

    Nudged to a fixed point of ``g -> fl(fl(2688 * g) / 2688)`` (at most a few
    ulps away), so that re-quantizing the dequantized tensor, whose amax is
    ``fl(2688 * g)``, reproduces ``g`` exactly.
    """
    amax = amax.float().reshape(())
    g = amax / NVFP4_GLOBAL_DIVISOR
    g = torch.where((amax > 0) & (g > 0), g, torch.ones_like(g))
    for _ in range(8):
        nxt = (g * NVFP4_GLOBAL_DIVISOR) / NVFP4_GLOBAL_DIVISOR
        if bool(nxt == g):
            break
        g = nxt
    return g


def _nvfp4_encode(wg: torch.Tensor, spec: QuantSpec) -> Parts:
    g = nvfp4_global_scale(wg.abs().amax())
    block = (wg.abs().amax(dim=-1) / E2M1_MAX) / g
    # Smallest *normal* e4m3 as the floor: no 0/0 in all-zero blocks, and the
    # block scale keeps 4 significant bits (needed for exact round trips).
    block_scale = block.clamp(min=E4M3_MIN_NORMAL, max=E4M3_MAX).to(torch.float8_e4m3fn)
    codes = fp4_e2m1_encode(wg / (block_scale.float() * g).unsqueeze(-1))
    return Parts(codes, block_scale, None, g)


def _nvfp4_decode(parts: Parts, spec: QuantSpec) -> torch.Tensor:
    # (e2m1 * e4m3) is exact in float32; one rounding for the global scale.
    local = fp4_e2m1_decode(parts.codes) * parts.scale.float().unsqueeze(-1)
    return local * parts.global_scale.float()


MXFP4_CODEC = Codec(_mx_encode, _mx_decode, 4, zero_code_const(0), lambda spec: False)
MXFP8_CODEC = Codec(_mx_encode, _mx_decode, None, None, lambda spec: False)
NVFP4_CODEC = Codec(_nvfp4_encode, _nvfp4_decode, 4, zero_code_const(0), lambda spec: False)
