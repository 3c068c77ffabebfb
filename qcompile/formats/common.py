"""Small helpers shared by the format modules (scale dtypes, safe scale casts)."""

from __future__ import annotations

import torch

SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def scale_dtype(name: str) -> torch.dtype:
    """The torch dtype for a ``QuantSpec.scale_dtype`` name."""
    try:
        return SCALE_DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown scale_dtype {name!r}; valid: {', '.join(SCALE_DTYPES)}") from None


def cast_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast positive scales to ``dtype`` without producing 0 or Inf.

    Zero scales (all-zero groups) become 1; scales outside the dtype's range
    are clamped so that quantization never divides by zero and dequantization
    never produces Inf (the group saturates instead).
    """
    info = torch.finfo(dtype)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale.clamp(info.tiny, info.max).to(dtype)
