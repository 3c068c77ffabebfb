"""Kernel-facing views of canonical QuantizedTensors.

The GEMM kernels read the canonical layout directly (codes ``[N, Kp(/2)]``
K-contiguous, scales ``[N, G]``), so the only "re-layout" is normalising dtypes
and strides once per weight: contiguous tensors, per-channel fp8/int8 scales as a
flat fp32 vector, and the kernel codes (``kernel_codes``) the kernels specialise on. The result
is cached in ``qt.extra`` so a generate loop pays for it once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qcompile.formats.kernel_codes import WEIGHT_CODES, scale_code, weight_code
from qcompile.formats.spec import PER_CHANNEL, QuantizedTensor

_CACHE_KEY = "_gemm_operands"


@dataclass
class GemmWeightOperands:
    """Tensors and specialisation flags one GEMM kernel launch needs."""

    data: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    global_scale: torch.Tensor | None
    K: int
    group: int  # 0 = per channel
    code: int  # kernel_codes.W_*
    scale_kind: int  # kernel_codes.SCALE_*

    @property
    def per_channel(self) -> bool:
        return self.group == 0


def gemm_weight_operands(qt: QuantizedTensor) -> GemmWeightOperands:
    """Normalise ``qt`` for the GEMM kernels (cached in ``qt.extra``)."""
    cached = qt.extra.get(_CACHE_KEY)
    if cached is not None and cached.data.device == qt.data.device:
        return cached
    fmt = qt.spec.format
    if fmt not in WEIGHT_CODES:
        raise NotImplementedError(f"no GEMM kernel layout for {fmt}")
    per_channel = qt.spec.group_size == PER_CHANNEL or qt.scale.shape[1] == 1
    scale = qt.scale.contiguous()
    if fmt == "fp8_e4m3" and per_channel:
        scale = scale.float()
    data = qt.data.contiguous()
    if fmt == "fp8_e4m3" and data.dtype != torch.float8_e4m3fn:
        raise NotImplementedError(f"fp8 weights must be float8_e4m3fn, got {data.dtype}")
    ops = GemmWeightOperands(
        data=data, scale=scale,
        zero=qt.zero.contiguous() if qt.zero is not None else None,
        global_scale=qt.global_scale.reshape(1).float() if qt.global_scale is not None else None,
        K=qt.shape[1], group=0 if per_channel else qt.group_size,
        code=weight_code(fmt), scale_kind=scale_code(fmt),
    )
    qt.extra[_CACHE_KEY] = ops
    return ops
