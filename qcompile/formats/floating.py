"""Element codecs for the small floating-point formats: FP4 E2M1 and FP8.

These are the *element* encodings only (no scales). FP4 E2M1 codes are the
OCP/NVIDIA bit patterns ``sign | exp(2) | mantissa(1)``, so code ``c`` decodes
to ``E2M1_TABLE[c]``; Triton kernels decode the same codes with the same table.
"""

from __future__ import annotations

import functools

import torch

E2M1_MAGNITUDES: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
"""Magnitudes of codes 0..7; codes 8..15 are the same values negated (8 is -0.0)."""
E2M1_MAX = 6.0
E2M1_EMAX = 2
"""Exponent of the largest normal E2M1 value (6 = 1.5 * 2**2); used by MX scaling."""

E2M1_VALUES = torch.tensor(E2M1_MAGNITUDES + tuple(-v for v in E2M1_MAGNITUDES), dtype=torch.float32)
"""``float32 [16]``: value of each 4-bit code (the public name)."""
E2M1_TABLE = E2M1_VALUES
"""``float32 [16]``: decode table, index = 4-bit code."""

# Decision thresholds between neighbouring magnitudes. A tie goes to the code
# with mantissa bit 0 (even code): down for the thresholds after an even code,
# up for those after an odd code. "x >= t" is written as "x > prev_float(t)"
# so that one bucketize (which counts thresholds strictly below x) does both.
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_TIES_UP = (False, True, False, True, False, True, False)


def _e2m1_bounds() -> torch.Tensor:
    mids = torch.tensor(_MIDPOINTS, dtype=torch.float32)
    below = torch.nextafter(mids, torch.zeros_like(mids))
    return torch.where(torch.tensor(_TIES_UP), below, mids)


E2M1_BOUNDS = _e2m1_bounds()


@functools.cache
def _e2m1_bounds_on(device: torch.device) -> torch.Tensor:
    """:data:`E2M1_BOUNDS` on ``device``, copied once: a host-to-device copy on every encode would
    cost a synchronising transfer per call and break CUDA-graph capture."""
    return E2M1_BOUNDS.to(device)

FP8_DTYPES: dict[str, torch.dtype] = {
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
FP8_MAX: dict[str, float] = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}
E4M3_MAX = FP8_MAX["fp8_e4m3"]
"""Largest finite float8_e4m3fn value (448), the one fp8 format the kernels compute in."""


def fp4_e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """Round ``x`` to the nearest E2M1 value (ties to even, saturating at ±6) → ``uint8`` codes.

    The sign bit follows ``signbit(x)``, so ``-0.0`` and tiny negatives encode as
    code 8 (-0), as hardware conversions do; NaN input is not defined.
    """
    x = x.float()
    mag = torch.bucketize(x.abs(), _e2m1_bounds_on(x.device), out_int32=True)
    sign = torch.signbit(x).to(torch.int32) << 3
    return (mag | sign).to(torch.uint8)


def fp4_e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """``uint8`` E2M1 codes (0..15) → ``float32`` values."""
    if codes.dtype != torch.uint8:
        raise ValueError(f"fp4_e2m1_decode expects uint8 codes, got {codes.dtype}")
    return E2M1_TABLE.to(codes.device)[codes.long()]


def fp4_e2m1_round(x: torch.Tensor) -> torch.Tensor:
    """Round ``float32`` values to the E2M1 grid (encode then decode)."""
    return fp4_e2m1_decode(fp4_e2m1_encode(x))


def fp8_cast(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Saturating, round-to-nearest-even cast to ``fp8_e4m3``/``fp8_e5m2``.

    torch's own cast maps out-of-range values to NaN (e4m3fn) or Inf (e5m2),
    so values are clamped to the largest finite value first.
    """
    limit = FP8_MAX[fmt]
    return x.float().clamp(-limit, limit).to(FP8_DTYPES[fmt])
