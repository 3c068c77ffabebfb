"""Weight-only quantized GEMM: ``y = x @ dequant(W).T`` with bf16/fp16 activations.

One kernel covers W4A16 (int4 sym/asym, group-wise or per-channel), W8A16 (int8,
fp8-e4m3 weights) and FP4 weights (plain e2m1, NVFP4, MXFP4), because they differ
only in how a stored code and a stored scale become numbers.

Per tile of ``BLOCK_K`` the kernel loads packed codes (16-byte vector loads along
K: two int4 codes per byte, low nibble first), unpacks them in registers,
subtracts the offset / zero point, multiplies by the group scale, casts to the
activation dtype and feeds ``tl.dot``. Per-channel scales are applied once to the
fp32 accumulator instead. Decode (M <= 16) uses one 16-row M tile and splits K
across programs (fp32 atomics, then a tiny epilogue kernel) so that even N = 4096
puts every SM to work streaming weights.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcompile.codegen.gemm.common import (
    decode_fp4,
    decode_scale,
    finish_split_k,
    new_output,
    store_epilogue,
    swizzle,
    virtual_rows,
)
from qcompile.codegen.gemm.configs import GemmConfig, _block_k_for_group
from qcompile.codegen.triton_env import before_launch, dot, interpreting
from qcompile.formats import kernel_codes

W_INT4 = tl.constexpr(kernel_codes.W_INT4)
W_FP4 = tl.constexpr(kernel_codes.W_FP4)
packed_weight = triton.constexpr_function(kernel_codes.packed_weight)
MIN_BLOCK_K = 32
"""Smallest K tile :func:`launch_weight_only` takes: with ``GemmConfig(32, 16, 16)`` (16-code
tiles, int4 symmetric or not) the kernel computed garbage natively on an H200 (Triton 3.6)
while the interpreter was right."""


@triton.jit
def load_weight_tile(w_ptr, s_ptr, z_ptr, rows, k0, KD, G, stride_wn, stride_sn, stride_zn,
                     CODE: tl.constexpr, SCALE_KIND: tl.constexpr, GROUP: tl.constexpr,
                     PER_CHANNEL: tl.constexpr, HAS_ZERO: tl.constexpr, EVEN_K: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Load and dequantize W[rows, k0:k0+BLOCK_K] -> float32 ``[BLOCK_N, BLOCK_K]``
    (per-channel scales are left to the caller: they factor out of the K sum)."""
    PACKED: tl.constexpr = packed_weight(CODE)
    # ---- codes ----
    if PACKED:
        offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        if not EVEN_K:  # clamp, don't mask: finite codes past K meet x == 0
            offs_b = tl.minimum(offs_b, KD - 1)
        packed = tl.load(w_ptr + rows[:, None] * stride_wn + offs_b[None, :])
        # two codes per byte, element 2i in the low nibble
        q = tl.reshape(tl.join(packed & 0xF, packed >> 4), (BLOCK_N, BLOCK_K))
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if not EVEN_K:
            offs_k = tl.minimum(offs_k, KD - 1)
        q = tl.load(w_ptr + rows[:, None] * stride_wn + offs_k[None, :])
    if CODE == W_FP4:  # noqa: SIM108 (constexpr branch)
        w = decode_fp4(q)
    else:
        w = q.to(tl.float32)
    # ---- offset / zero point and scale ----
    if PER_CHANNEL:
        if HAS_ZERO:
            z = tl.load(z_ptr + rows * stride_zn).to(tl.float32)
            w = w - z[:, None]
        elif CODE == W_INT4:
            w = w - 8.0
    elif GROUP >= BLOCK_K:
        # the whole tile lies in one group
        g = k0 // GROUP
        s = decode_scale(tl.load(s_ptr + rows * stride_sn + g), SCALE_KIND)
        if HAS_ZERO:
            z = tl.load(z_ptr + rows * stride_zn + g).to(tl.float32)
            w = (w - z[:, None]) * s[:, None]
        elif CODE == W_INT4:
            w = (w - 8.0) * s[:, None]
        else:
            w = w * s[:, None]
    else:
        # BLOCK_K // GROUP groups per tile: broadcast each group's scale over its columns
        NG: tl.constexpr = BLOCK_K // GROUP
        offs_g = tl.minimum(k0 // GROUP + tl.arange(0, NG), G - 1)  # groups past K meet x == 0
        s = decode_scale(tl.load(s_ptr + rows[:, None] * stride_sn + offs_g[None, :]), SCALE_KIND)
        s = tl.reshape(tl.broadcast_to(s[:, :, None], (BLOCK_N, NG, GROUP)), (BLOCK_N, BLOCK_K))
        if HAS_ZERO:
            z = tl.load(z_ptr + rows[:, None] * stride_zn + offs_g[None, :])
            z = tl.reshape(tl.broadcast_to(z.to(tl.float32)[:, :, None], (BLOCK_N, NG, GROUP)), (BLOCK_N, BLOCK_K))
            w = (w - z) * s
        elif CODE == W_INT4:
            w = (w - 8.0) * s
        else:
            w = w * s
    return w


@triton.jit
def weight_only_gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, gs_ptr, bias_ptr, res_ptr, out_ptr,
    M, N, K, KD, G,
    stride_xm, stride_wn, stride_sn, stride_zn, stride_om, stride_rm,
    CODE: tl.constexpr, SCALE_KIND: tl.constexpr, GROUP: tl.constexpr,
    PER_CHANNEL: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_GS: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, SILU_MUL: tl.constexpr,
    SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, EMULATE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = swizzle(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_v = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_v < N
    rows = tl.where(n_mask, virtual_rows(offs_v, N, SILU_MUL), 0)
    m_ld = tl.where(offs_m < M, offs_m, 0)  # clamp instead of masking: rows stay vectorizable

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + m_ld[:, None] * stride_xm + offs_k[None, :]
        if EVEN_K:  # noqa: SIM108 (constexpr branch)
            x = tl.load(x_ptrs)
        else:
            x = tl.load(x_ptrs, mask=offs_k[None, :] < K, other=0.0)
        w = load_weight_tile(w_ptr, s_ptr, z_ptr, rows, k0, KD, G, stride_wn, stride_sn, stride_zn,
                             CODE, SCALE_KIND, GROUP, PER_CHANNEL, HAS_ZERO, EVEN_K, BLOCK_N, BLOCK_K)
        if BLOCK_M == 1:
            # GEMV (M == 1): FMAs and a row reduction, no 16-row tensor-core padding
            acc += tl.sum(x.to(tl.float32) * w, axis=1)[None, :]
        else:
            acc = dot(x, tl.trans(w.to(x.dtype)), acc, EMULATE_DOT)

    if PER_CHANNEL:
        s = decode_scale(tl.load(s_ptr + rows * stride_sn), SCALE_KIND)
        acc = acc * s[None, :]
    if HAS_GS:
        acc = acc * tl.load(gs_ptr).to(tl.float32)
    if SPLIT_K > 1:
        # partial sums: the workspace is indexed by physical rows
        tl.atomic_add(out_ptr + offs_m[:, None] * N + rows[None, :], acc,
                      mask=(offs_m[:, None] < M) & n_mask[None, :], sem="relaxed")
    else:
        store_epilogue(acc, offs_m, pid_n, M, N, rows, n_mask, out_ptr, stride_om, bias_ptr, res_ptr,
                       stride_rm, HAS_BIAS, HAS_RES, SILU_MUL, BLOCK_M, BLOCK_N)


@triton.jit
def dequant_weight_kernel(
    w_ptr, s_ptr, z_ptr, gs_ptr, out_ptr,
    N, K, KD, G, stride_wn, stride_sn, stride_zn, stride_on,
    CODE: tl.constexpr, SCALE_KIND: tl.constexpr, GROUP: tl.constexpr,
    PER_CHANNEL: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_GS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Write W[N, K] in the activation dtype. Prefill path: at large M the GEMM is
    compute bound, and re-dequantizing each weight tile for every M tile costs more
    than one streaming dequant pass plus cuBLAS."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1)
    k0 = tl.program_id(1) * BLOCK_K
    w = load_weight_tile(w_ptr, s_ptr, z_ptr, rows, k0, KD, G, stride_wn, stride_sn, stride_zn,
                         CODE, SCALE_KIND, GROUP, PER_CHANNEL, HAS_ZERO, EVEN_K, BLOCK_N, BLOCK_K)
    if PER_CHANNEL:
        w = w * decode_scale(tl.load(s_ptr + rows * stride_sn), SCALE_KIND)[:, None]
    if HAS_GS:
        w = w * tl.load(gs_ptr).to(tl.float32)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + offs_n[:, None] * stride_on + offs_k[None, :], w.to(out_ptr.dtype.element_ty),
             mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))


def dequantize_weight(data: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                      global_scale: torch.Tensor | None, K: int, group: int, per_channel: bool,
                      code: int, scale_kind: int, dtype: torch.dtype) -> torch.Tensor:
    """Canonical quantized weight -> dense ``[N, K]`` tensor of ``dtype`` (one streaming pass)."""
    N, KD = data.shape
    out = torch.empty((N, K), device=data.device, dtype=dtype)
    block_n = 32
    block_k = _block_k_for_group(256, group, K)
    grid = (triton.cdiv(N, block_n), triton.cdiv(K, block_k))
    before_launch()
    dequant_weight_kernel[grid](
        data, scale, zero if zero is not None else data, global_scale if global_scale is not None else data, out,
        N, K, KD, scale.shape[1], data.stride(0), scale.stride(0), zero.stride(0) if zero is not None else 0,
        out.stride(0),
        CODE=code, SCALE_KIND=scale_kind, GROUP=group, PER_CHANNEL=per_channel,
        HAS_ZERO=zero is not None, HAS_GS=global_scale is not None, EVEN_K=K % block_k == 0,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )
    return out


def dequant_then_matmul(x2: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                        residual: torch.Tensor | None, silu_mul: bool) -> torch.Tensor:
    """cuBLAS GEMM on the dequantized weight, epilogue in PyTorch (prefill only)."""
    y = torch.addmm(bias, x2, w.t()) if bias is not None else x2 @ w.t()
    if silu_mul:
        n = y.shape[1] // 2
        y = torch.nn.functional.silu(y[:, :n]) * y[:, n:]
    if residual is not None:
        y = y + residual
    return y


def launch_weight_only(x2: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                       global_scale: torch.Tensor | None, K: int, group: int, per_channel: bool,
                       code: int, scale_kind: int, cfg: GemmConfig, bias: torch.Tensor | None,
                       residual: torch.Tensor | None, silu_mul: bool) -> torch.Tensor:
    """Run the kernel on 2-D ``x2 [M, K]`` (contiguous) and canonical weight tensors."""
    if not cfg.dequant and cfg.block_k < MIN_BLOCK_K:
        raise ValueError(f"weight_only: block_k={cfg.block_k} is below {MIN_BLOCK_K}; such tiles gave "
                         "wrong results on sm_90 (Triton 3.6) while the interpreter computed them right. "
                         "Use block_k >= 32 (pick_config never chooses less for power-of-two groups).")
    if cfg.dequant:
        w = dequantize_weight(data, scale, zero, global_scale, K, group, per_channel, code, scale_kind, x2.dtype)
        return dequant_then_matmul(x2, w, bias, residual, silu_mul)
    M = x2.shape[0]
    N = data.shape[0]
    n_out = N // 2 if silu_mul else N
    out = new_output((M, n_out), x2.dtype, x2.device)
    KD = data.shape[1]
    even_k = K % cfg.block_k == 0 and KD * (2 if packed_weight(code) else 1) >= K
    split = cfg.split_k
    target = torch.zeros((M, N), device=x2.device, dtype=torch.float32) if split > 1 else out
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), split)
    dummy = data
    before_launch()
    weight_only_gemm_kernel[grid](
        x2, data, scale, zero if zero is not None else dummy, global_scale if global_scale is not None else dummy,
        bias if bias is not None else dummy, residual if residual is not None else dummy, target,
        M, N, K, KD, scale.shape[1],
        x2.stride(0), data.stride(0), scale.stride(0), zero.stride(0) if zero is not None else 0,
        target.stride(0), residual.stride(0) if residual is not None else 0,
        CODE=code, SCALE_KIND=scale_kind, GROUP=group, PER_CHANNEL=per_channel,
        HAS_ZERO=zero is not None, HAS_GS=global_scale is not None,
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, SILU_MUL=silu_mul,
        SPLIT_K=split, EMULATE_DOT=interpreting(), EVEN_K=even_k,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split > 1:
        finish_split_k(target, out, bias, residual, silu_mul)
    return out
