"""Fused dequantize-GEMM Triton kernels.

Public API:

- :func:`triton_quantized_linear` — ``y = x @ dequant(W).T (+ bias) (silu_mul) (+ residual)``
- :func:`unsupported_reason` — why no Triton kernel handles a (weight, activation) spec pair
- :func:`force_triton` / ``QCOMPILE_FORCE_TRITON=1`` and :func:`use_triton`

Kernel families (one per file): ``weight_only.py`` (W4A16 int4, W8A16 int8/fp8,
FP4 e2m1/NVFP4/MXFP4 weight-only), ``fp8.py`` (FP8 W8A8 with per-token activation
quantization), ``w4a8.py`` (int4 x fp8, one fp8 MMA per weight group), ``w4a4.py``
(NVFP4/MXFP4 x same, ``tl.dot_scaled`` for MXFP4). ``configs.py`` holds the cached tile heuristic, ``reference.py``
the float64 references.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from qcompile.codegen.gemm.configs import (
    INT_MMA_MAX_M,
    GemmConfig,
    pick_config,
    pick_int_mma_config,
)
from qcompile.codegen.triton_env import apply_interpreter_compat, num_sms
from qcompile.formats.kernel_codes import WEIGHT_CODES, packed_weight
from qcompile.formats.spec import PER_CHANNEL, QuantizedTensor, QuantSpec

__all__ = ["triton_quantized_linear", "unsupported_reason", "force_triton", "use_triton", "kernel_name"]

_FORCED: list[bool] = []
EPILOGUES = ("none", "silu_mul")
WEIGHT_ONLY_FORMATS = ("int4", "int8", "fp8_e4m3", "fp4_e2m1", "nvfp4", "mxfp4", "mxfp8")


@contextlib.contextmanager
def force_triton(enabled: bool = True) -> Iterator[None]:
    """Run the Triton kernels even without CUDA (on CPU they need ``TRITON_INTERPRET=1``, whose
    compatibility patch this applies: ``triton_env.apply_interpreter_compat``)."""
    if enabled:
        apply_interpreter_compat()
    _FORCED.append(enabled)
    try:
        yield
    finally:
        _FORCED.pop()


def _forced() -> bool:
    if _FORCED:
        return _FORCED[-1]
    return os.environ.get("QCOMPILE_FORCE_TRITON", "0") not in ("", "0", "false", "False")


def use_triton(x: torch.Tensor) -> bool:
    """True when ``x`` should go through a Triton kernel: on CUDA, or when forced."""
    return x.is_cuda or _forced()


def _int_mma_takes(code: int, group: int, K: int, M: int, config: GemmConfig | None) -> bool:
    """int4 / int8 weight-only GEMMs up to M = 128 run on ``int_mma`` (register dequantization);
    a ``config`` it cannot run (``block_m`` < 16, ``block_k`` < ``int_mma.MIN_BLOCK_K``,
    ``dequant``, K tiles across groups) selects the general weight-only kernel instead."""
    from qcompile.codegen.gemm.int_mma import MIN_BLOCK_K, supports

    if config is not None and (config.block_m < 16 or config.block_k < MIN_BLOCK_K or config.dequant
                               or (group and group % config.block_k)):
        return False
    if config is None and M > INT_MMA_MAX_M:
        return False
    return supports(code, group, K) is None


def unsupported_reason(weight_spec: QuantSpec, act_spec: QuantSpec | None = None,
                       device: torch.device | str | None = None) -> str | None:
    """``None`` if a Triton GEMM kernel handles this pair on ``device``, else a reason."""
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type != "cuda" and not _forced():
        return f"Triton GEMM kernels run on CUDA devices (got {dev}); force_triton() runs them in the interpreter"
    fmt = weight_spec.format
    if act_spec is None:
        if fmt not in WEIGHT_ONLY_FORMATS:
            return f"no weight-only Triton kernel for {fmt} weights (supported: {', '.join(WEIGHT_ONLY_FORMATS)})"
        if fmt in ("fp8_e4m3", "fp4_e2m1", "nvfp4", "mxfp4", "mxfp8") and not weight_spec.symmetric:
            return f"{fmt} is symmetric only"
        return None
    if act_spec.format == "fp8_e4m3":
        if not act_spec.dynamic or act_spec.group_size != PER_CHANNEL:
            return "FP8 activations are supported as dynamic per-token scales only"
        if fmt == "int4":  # W4A8 (w4a8.py): one fp8 MMA per weight group
            from qcompile.codegen.gemm.w4a8 import W4A8_GROUPS

            if weight_spec.group_size not in W4A8_GROUPS:
                return f"W4A8 needs int4 group size in {W4A8_GROUPS}, got {weight_spec.short()}"
        elif fmt != "fp8_e4m3" or weight_spec.group_size != PER_CHANNEL:
            return f"FP8 activations need fp8_e4m3 per-channel or int4 group-wise weights, got {weight_spec.short()}"
        if dev is not None and dev.type == "cuda" and torch.cuda.get_device_capability(dev) < (8, 9):
            return "FP8 tensor-core GEMM needs compute capability >= 8.9"
        return None
    if act_spec.format in ("nvfp4", "mxfp4"):  # W4A4 (w4a4.py)
        if not act_spec.dynamic:
            return f"{act_spec.format} activations are supported as dynamic (per-token block) scales only"
        if fmt != act_spec.format:
            return f"W4A4 needs weights and activations in the same format, got {fmt} x {act_spec.format}"
        return None
    if act_spec.format == "int8":
        return "int8 activation kernels (W8A8-int8, W4A8-int8) are not implemented; use fp8_e4m3 activations"
    return f"no Triton kernel for {act_spec.format} activations"


def kernel_name(weight_spec: QuantSpec, act_spec: QuantSpec | None, M: int, K: int) -> str:
    """Which kernel :func:`triton_quantized_linear` runs for this call (for reports and benchmarks)."""
    fmt = weight_spec.format
    if act_spec is not None:
        return {"fp8_e4m3": "w4a8" if fmt == "int4" else "fp8"}.get(act_spec.format, "w4a4")
    code = WEIGHT_CODES.get(fmt, -1)
    if _int_mma_takes(code, weight_spec.group_size, K, M, None):
        return "int_mma"
    # the prefill switch to dequantize + cuBLAS depends on M only, not on N
    kind = "w4" if packed_weight(code) else "w8"
    return "dequant+cublas" if pick_config(M, 1, K, kind, weight_spec.group_size).dequant else "weight_only"


def triton_quantized_linear(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None = None,
                            act_spec: QuantSpec | None = None, residual: torch.Tensor | None = None,
                            epilogue: str = "none", config: GemmConfig | None = None) -> torch.Tensor:
    """``x [..., K]`` (bf16/fp16) times the quantized weight ``qt [N, K]``.

    Returns ``[..., N]``, or ``[..., N/2]`` for ``epilogue="silu_mul"`` where ``qt``
    is a merged gate/up weight (rows ``[0, N/2)`` gate, ``[N/2, N)`` up) and the
    result is ``silu(gate) * up``. ``bias`` ``[N]`` is added before the epilogue,
    ``residual`` ``[..., N_out]`` after it. ``config`` overrides the tile heuristic
    (benchmarks and tests only).
    """
    from qcompile.codegen.gemm.fp8 import launch_fp8
    from qcompile.codegen.gemm.weight_only import launch_weight_only
    from qcompile.formats.kernel_layouts import gemm_weight_operands

    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue must be one of {EPILOGUES}, got {epilogue!r}")
    reason = unsupported_reason(qt.spec, act_spec, x.device)
    if reason is not None:
        raise NotImplementedError(reason)
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"activations must be bfloat16 or float16, got {x.dtype}")
    N, K = qt.shape
    if x.shape[-1] != K:
        raise ValueError(f"x has K={x.shape[-1]}, weight has K={K}")
    silu = epilogue == "silu_mul"
    if silu and N % 2:
        raise ValueError("silu_mul needs an even number of output rows (gate then up)")
    n_out = N // 2 if silu else N
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K).contiguous()
    res2 = None
    if residual is not None:
        res2 = residual.reshape(-1, n_out)
        if res2.stride(-1) != 1:
            res2 = res2.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    if act_spec is not None and qt.spec.format == "int4":
        from qcompile.codegen.gemm.w4a8 import launch_w4a8

        return launch_w4a8(x2, qt, bias, res2, silu).reshape(*lead, n_out)
    if act_spec is not None and act_spec.format in ("nvfp4", "mxfp4"):
        from qcompile.codegen.gemm.w4a4 import launch_w4a4

        return launch_w4a4(x2, qt, act_spec.format, bias, res2, silu).reshape(*lead, n_out)
    ops = gemm_weight_operands(qt)
    M = x2.shape[0]
    if act_spec is None and _int_mma_takes(ops.code, ops.group, K, M, config):
        from qcompile.codegen.gemm.int_mma import launch_int_mma

        cfg = config or pick_int_mma_config(M, N, K, ops.code, ops.group, num_sms(x2.device))
        out = launch_int_mma(x2, ops.data, ops.scale, ops.zero, K, ops.group, ops.code, cfg, bias, res2, silu)
        return out.reshape(*lead, n_out)
    if act_spec is None:
        kind = "w4" if packed_weight(ops.code) else "w8"
        cfg = config or pick_config(M, N, K, kind, ops.group, num_sms(x2.device))
        out = launch_weight_only(x2, ops.data, ops.scale, ops.zero, ops.global_scale, K, ops.group,
                                 ops.per_channel, ops.code, ops.scale_kind, cfg, bias, res2, silu)
    else:
        cfg = config or pick_config(M, N, K, "fp8", 0, num_sms(x2.device))
        out = launch_fp8(x2, ops.data, ops.scale, cfg, bias, res2, silu)
    return out.reshape(*lead, n_out)
