"""Scale-dtype handling and the group view shared by every format.

All formats quantize a float32 view ``[rows, n_groups, group]`` of the (zero
padded) matrix and return one scale per ``[row, group]``. Scales are cast to
their storage dtype *before* the codes are computed, so that dequantization
with the stored scale is exactly what quantization assumed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SCALE_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}


def scale_torch_dtype(name: str) -> torch.dtype:
    try:
        return SCALE_DTYPES[name]
    except KeyError:
        raise ValueError(
            f"scale_dtype must be one of {', '.join(SCALE_DTYPES)}, got {name!r}") from None


def cast_scale(s: torch.Tensor, dtype: torch.dtype, round_down: bool = False) -> torch.Tensor:
    """Cast float32 scales to ``dtype``, clamped to ``[smallest normal, largest finite]``.

    Clamping at the smallest *normal* keeps all-zero groups free of 0/0 and
    keeps the scale's relative precision, which the exact re-quantization
    round trip relies on. ``round_down`` rounds toward zero (from float64 ``s``) instead of to
    nearest (asymmetric integer scales need it so that the group's min and
    max land on codes 0 and 2**b - 1, see ``integer.py``).
    """
    info = torch.finfo(dtype)
    if not round_down or dtype == torch.float32:
        # float32: the dequantized values are rounded anyway and rounding down
        # would drift on every round trip; api.quantize iterates to the fixed point.
        return s.float().clamp(min=info.tiny, max=info.max).to(dtype)
    target = s.double().clamp(min=info.tiny, max=info.max)
    out = target.to(dtype)
    down = torch.nextafter(out, torch.zeros_like(out))
    return torch.where(out.double() > target, down, out)


def to_groups(w: torch.Tensor, group: int) -> torch.Tensor:
    """``[rows, K]`` → float32 ``[rows, ceil(K/group), group]``, padding K with zeros."""
    rows, k = w.shape
    pad = (-k) % group
    w = w.float()
    if pad:
        w = F.pad(w, (0, pad))
    return w.reshape(rows, -1, group)
