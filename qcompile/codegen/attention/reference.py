"""Reference decode attention on the dequantized cache (float64 by default), for tests."""

from __future__ import annotations

import math

import torch

from qcompile.formats.hadamard import rotate
from qcompile.formats.kv import apply_rope


def reference_decode_attention(q: torch.Tensor, cache, layer: int, *, sm_scale: float | None = None,
                               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Exact attention of ``q`` (``[B, Hq, D]`` or ``[B, Hq, T, D]``) over the dequantized cache.

    Same semantics as ``decode_attention``: query ``t`` of ``T`` sits at ``length - T + t``.
    Returns ``dtype``.
    """
    squeeze = q.dim() == 3
    q4 = (q.unsqueeze(2) if squeeze else q).to(dtype)
    B, Hq, T, D = q4.shape
    spec = cache.spec
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    k, v = cache.dequantize(layer, dtype)
    k, v = k.to(q4.device), v.to(q4.device)
    S = k.shape[2]
    pos = torch.arange(S, device=q4.device)
    if spec.pre_rope:
        k = apply_rope(k, pos, spec.rope_theta)
    if spec.rotate_keys:
        q4 = rotate(q4)
    gqa = Hq // cache.num_kv_heads
    k = k.repeat_interleave(gqa, 1)
    v = v.repeat_interleave(gqa, 1)
    logits = (q4 @ k.transpose(-1, -2)) * sm_scale                       # [B, Hq, T, S]
    L = cache.lengths[layer].to(q4.device).long()
    qpos = L[:, None] - T + torch.arange(T, device=q4.device)[None, :]    # [B, T]
    mask = pos[None, None, :] <= qpos[:, :, None]
    logits = logits.masked_fill(~mask[:, None], float("-inf"))
    out = torch.softmax(logits, -1) @ v
    return out.squeeze(2) if squeeze else out
