"""FP8 W8A8: e4m3 weights with per-channel scales, activations quantized per token on the fly.

Two launches: ``act_quant_fp8_kernel`` turns each bf16/fp16 token row into e4m3
codes plus one fp32 scale (amax / 448, ``FP8_MAX``), then ``fp8_gemm_kernel`` runs an
e4m3 x e4m3 -> fp32 ``tl.dot`` (Hopper wgmma) and multiplies the accumulator by
``token_scale[m] * channel_scale[n]`` in the epilogue.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcompile.codegen.gemm.common import (
    finish_split_k,
    new_output,
    store_epilogue,
    swizzle,
    virtual_rows,
)
from qcompile.codegen.gemm.configs import GemmConfig
from qcompile.codegen.triton_env import before_launch, dot, interpreting
from qcompile.formats.floating import E4M3_MAX

FP8_MAX = tl.constexpr(E4M3_MAX)


@triton.jit
def round_to_e4m3_grid(q):
    """Round-to-nearest-even onto the e4m3 grid, in fp32. Only under the interpreter:
    Triton 3.6's interpreter drops the carry when its fp32 -> e4m3 cast rounds across a
    power of two (124.9 -> 64), so we round first and the cast becomes exact."""
    e = tl.maximum(tl.floor(tl.log2(tl.maximum(tl.abs(q), 1e-30))), -6.0)
    step = tl.exp2(e - 3.0)
    t = q / step
    r = tl.floor(t + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    r = tl.where(((r - t) == 0.5) & odd, r - 1.0, r)
    return r * step


@triton.jit
def act_quant_fp8_kernel(x_ptr, q_ptr, s_ptr, K, KP, stride_xm, stride_qm, BLOCK_K: tl.constexpr,
                         ROUND_FIRST: tl.constexpr, ONE_PASS: tl.constexpr):
    """One program per token: scale = amax / 448, q = e4m3(x / scale); columns
    ``[K, KP)`` of ``q`` are written as zeros so the GEMM never masks fp8 loads."""
    row = tl.program_id(0)
    if ONE_PASS:
        # the whole (padded) row fits in registers: read x once
        offs = tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) / FP8_MAX
        tl.store(s_ptr + row, scale)
        q = tl.clamp(x / scale, -FP8_MAX, FP8_MAX)
        if ROUND_FIRST:
            q = round_to_e4m3_grid(q)
        tl.store(q_ptr + row * stride_qm + offs, q.to(q_ptr.dtype.element_ty), mask=offs < KP)
        return
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0), 1e-12) / FP8_MAX
    tl.store(s_ptr + row, scale)
    for k0 in range(0, KP, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
        q = tl.clamp(x / scale, -FP8_MAX, FP8_MAX)
        if ROUND_FIRST:
            q = round_to_e4m3_grid(q)
        tl.store(q_ptr + row * stride_qm + offs, q.to(q_ptr.dtype.element_ty), mask=offs < KP)


@triton.jit
def fp8_gemm_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, bias_ptr, res_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_om, stride_rm,
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
    m_ld = tl.where(offs_m < M, offs_m, 0)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + m_ld[:, None] * stride_xm + offs_k[None, :]
        w_ptrs = w_ptr + rows[:, None] * stride_wn + offs_k[None, :]
        x = tl.load(x_ptrs)  # zero-padded to a whole number of BLOCK_K by the quant kernel
        if EVEN_K:
            w = tl.load(w_ptrs)
        else:  # clamp, don't mask: finite codes times x == 0
            w = tl.load(w_ptr + rows[:, None] * stride_wn + tl.minimum(offs_k, K - 1)[None, :])
        acc = dot(x, tl.trans(w), acc, EMULATE_DOT)

    xs = tl.load(xs_ptr + m_ld)
    ws = tl.load(ws_ptr + rows).to(tl.float32)
    acc = acc * xs[:, None] * ws[None, :]
    if SPLIT_K > 1:
        tl.atomic_add(out_ptr + offs_m[:, None] * N + rows[None, :], acc,
                      mask=(offs_m[:, None] < M) & n_mask[None, :], sem="relaxed")
    else:
        store_epilogue(acc, offs_m, pid_n, M, N, rows, n_mask, out_ptr, stride_om, bias_ptr, res_ptr,
                       stride_rm, HAS_BIAS, HAS_RES, SILU_MUL, BLOCK_M, BLOCK_N)


def quantize_act_fp8(x2: torch.Tensor, pad_to: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token e4m3 quantization of ``x2 [M, K]``: codes ``[M, K rounded up to pad_to]``
    (zero padded) and fp32 scales ``[M]``."""
    M, K = x2.shape
    KP = triton.cdiv(K, pad_to) * pad_to
    q = torch.empty((M, KP), device=x2.device, dtype=torch.float8_e4m3fn)
    s = torch.empty((M,), device=x2.device, dtype=torch.float32)
    one_pass = triton.next_power_of_2(KP) <= 16384
    block = triton.next_power_of_2(KP) if one_pass else 2048
    before_launch()
    act_quant_fp8_kernel[(M,)](x2, q, s, K, KP, x2.stride(0), q.stride(0),
                               BLOCK_K=block, ROUND_FIRST=interpreting(), ONE_PASS=one_pass,
                               num_warps=max(4, min(16, block // 1024)))
    return q, s


def launch_fp8(x2: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, cfg: GemmConfig,
               bias: torch.Tensor | None, residual: torch.Tensor | None, silu_mul: bool) -> torch.Tensor:
    M, K = x2.shape
    N = data.shape[0]
    xq, xs = quantize_act_fp8(x2, pad_to=cfg.block_k)
    n_out = N // 2 if silu_mul else N
    out = new_output((M, n_out), x2.dtype, x2.device)
    split = cfg.split_k
    target = torch.zeros((M, N), device=x2.device, dtype=torch.float32) if split > 1 else out
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), split)
    before_launch()
    fp8_gemm_kernel[grid](
        xq, xs, data, scale.reshape(-1), bias if bias is not None else xs, residual if residual is not None else xs,
        target, M, N, K, xq.stride(0), data.stride(0), target.stride(0),
        residual.stride(0) if residual is not None else 0,
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, SILU_MUL=silu_mul,
        SPLIT_K=split, EMULATE_DOT=interpreting(), EVEN_K=K % cfg.block_k == 0,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split > 1:
        finish_split_k(target, out, bias, residual, silu_mul)
    return out
