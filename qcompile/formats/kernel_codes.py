"""The integers a kernel sees for a format: the only place a format name becomes a number.

Kernels specialise on these codes as ``tl.constexpr`` arguments. Kernel modules wrap the
constants they compare with (``W_INT4 = tl.constexpr(kernel_codes.W_INT4)`` at module level,
since Triton code may only read constexpr globals) and never compare with literals; hosts map
names through the dicts below. This module imports no Triton.

Three vocabularies, whose names cannot collide:

- ``W_*``: how a stored GEMM weight code becomes a number before scaling (canonical
  ``QuantizedTensor`` layouts, ``formats/spec.py``).
- ``SCALE_*``: how a stored GEMM scale becomes a float.
- ``KV_*``: a KV-cache format (``formats/kv.py``); a KV format named like a weight format is a
  different format (see ``formats/kv.py`` for how KV ``int4`` differs from weight ``int4``).
"""

from __future__ import annotations

# ----------------------------------------------------------------------------- GEMM weights
W_INT4 = 0
"""Unsigned nibble minus 8 (symmetric) or minus the zero point (asymmetric)."""
W_INT8 = 1
"""Signed int8 (symmetric) or unsigned with zero point."""
W_FP4 = 2
"""E2M1 nibble (fp4_e2m1, NVFP4, MXFP4)."""
W_FP8 = 3
"""float8_e4m3fn (fp8_e4m3, MXFP8)."""

WEIGHT_CODES: dict[str, int] = {
    "int4": W_INT4, "int8": W_INT8,
    "fp4_e2m1": W_FP4, "nvfp4": W_FP4, "mxfp4": W_FP4,
    "fp8_e4m3": W_FP8, "mxfp8": W_FP8,
}
"""Weight format name -> ``W_*`` code, for the formats a GEMM kernel reads."""

# ----------------------------------------------------------------------------- GEMM scales
SCALE_FLOAT = 0
"""float16 / bfloat16 / float32."""
SCALE_E4M3 = 1
"""NVFP4 block scale (float8_e4m3fn)."""
SCALE_E8M0 = 2
"""MX biased exponent, 127 = 2**0."""

SCALE_CODES: dict[str, int] = {"nvfp4": SCALE_E4M3, "mxfp4": SCALE_E8M0, "mxfp8": SCALE_E8M0}
"""Weight format name -> ``SCALE_*`` code; formats not listed have ``SCALE_FLOAT`` scales."""

# ----------------------------------------------------------------------------- KV cache
KV_BF16 = 0
"""Uncompressed, in the cache's dtype."""
KV_FP8 = 1
"""e4m3 codes (uint8 bits), one float32 scale per token."""
KV_INT8 = 2
"""Symmetric int8 codes, one float32 scale per token."""
KV_INT4 = 3
"""Asymmetric 4-bit codes with float16 scale and minimum (keys per channel over token groups)."""
KV_INT2 = 4
"""Asymmetric 2-bit codes, laid out like ``KV_INT4``."""

KV_CODES: dict[str, int] = {"bf16": KV_BF16, "fp8_e4m3": KV_FP8, "int8": KV_INT8, "int4": KV_INT4,
                            "int2": KV_INT2}
"""KV-cache format name -> ``KV_*`` code."""


def weight_code(fmt: str) -> int:
    """``W_*`` code of a weight format (``KeyError`` if no GEMM kernel reads it)."""
    return WEIGHT_CODES[fmt]


def scale_code(fmt: str) -> int:
    """``SCALE_*`` code of a weight format's scales."""
    return SCALE_CODES.get(fmt, SCALE_FLOAT)


def packed_weight(code: int) -> bool:
    """Two codes per byte (int4, fp4): the 4-bit weight kernels' class."""
    return code in (W_INT4, W_FP4)


def kv_code(fmt: str) -> int:
    """``KV_*`` code of a KV-cache format."""
    return KV_CODES[fmt]


def kv_per_token(code: int) -> bool:
    """One symmetric scale per token (fp8, int8): 8-bit codes, one byte each."""
    return code in (KV_FP8, KV_INT8)


def kv_grouped(code: int) -> bool:
    """Asymmetric bit-packed codes (int4, int2): keys per channel over token groups, values per
    token over channel groups, a float16 scale and minimum each."""
    return code in (KV_INT4, KV_INT2)

