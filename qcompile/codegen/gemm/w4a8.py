"""W4A8: int4 group-wise weights x fp8 (e4m3) per-token activations, on fp8 tensor cores.

QServe-style progressive dequantization, adapted to the canonical int4 layout:
the activations are quantized per token to e4m3 (``fp8.quantize_act_fp8``); inside
the GEMM each K tile is exactly one weight group, whose codes become ``q - zero``
(an integer in [-15, 15], exactly representable in e4m3) and go straight into an
e4m3 x e4m3 -> fp32 ``tl.dot``. The group scale is applied once per group to the
fp32 partial product, and the token scale once in the epilogue, so no
multiply-per-weight sits in the inner loop and the tensor cores run at fp8 rate.

Needs ``group_size`` a power of two >= 32 (the fp8 MMA's K step).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcompile.codegen import triton_env
from qcompile.codegen.gemm.common import (
    finish_split_k,
    new_output,
    store_epilogue,
    swizzle,
    virtual_rows,
)
from qcompile.codegen.triton_env import NUM_SMS_DEFAULT, before_launch, dot, interpreting
from qcompile.formats.spec import QuantizedTensor

W4A8_GROUPS = (32, 64, 128, 256)


@triton.jit
def w4a8_gemm_kernel(
    x_ptr, xs_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, res_ptr, out_ptr,
    M, N, K, G,
    stride_xm, stride_wn, stride_sn, stride_zn, stride_om, stride_rm,
    HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, SILU_MUL: tl.constexpr,
    EMULATE_DOT: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = swizzle(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_v = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_v < N
    rows = tl.where(n_mask, virtual_rows(offs_v, N, SILU_MUL), 0)
    m_ld = tl.where(offs_m < M, offs_m, 0)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(pid_k, G, SPLIT_K):  # split-K (decode): program pid_k takes every SPLIT_K-th group
        # one weight group per K step: x [BLOCK_M, GROUP] e4m3, padded with zeros past K
        offs_k = g * GROUP + tl.arange(0, GROUP)
        x = tl.load(x_ptr + m_ld[:, None] * stride_xm + offs_k[None, :])
        # int4 codes of this group (the weight is padded to whole groups: always in bounds)
        offs_b = g * (GROUP // 2) + tl.arange(0, GROUP // 2)
        packed = tl.load(w_ptr + rows[:, None] * stride_wn + offs_b[None, :])
        q = tl.reshape(tl.join(packed & 0xF, packed >> 4), (BLOCK_N, GROUP)).to(tl.float32)
        if HAS_ZERO:
            z = tl.load(z_ptr + rows * stride_zn + g).to(tl.float32)
            q = q - z[:, None]
        else:
            q = q - 8.0
        w = q.to(tl.float8e4nv)  # exact: |q - zero| <= 15
        part = dot(x, tl.trans(w), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), EMULATE_DOT)
        s = tl.load(s_ptr + rows * stride_sn + g).to(tl.float32)
        acc += part * s[None, :]

    xs = tl.load(xs_ptr + m_ld)
    acc = acc * xs[:, None]
    if SPLIT_K > 1:  # fp32 partials into the [M, N] workspace; common.finish_split_k does the epilogue
        tl.atomic_add(out_ptr + offs_m[:, None] * N + rows[None, :], acc,
                      mask=(offs_m[:, None] < M) & n_mask[None, :], sem="relaxed")
    else:
        store_epilogue(acc, offs_m, pid_n, M, N, rows, n_mask, out_ptr, stride_om, bias_ptr, res_ptr,
                       stride_rm, HAS_BIAS, HAS_RES, SILU_MUL, BLOCK_M, BLOCK_N)


def w4a8_config(M: int, N: int, G: int, num_sms: int = NUM_SMS_DEFAULT) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, SPLIT_K, num_warps, num_stages) from the M bucket; no autotuning.
    Decode splits the groups across programs until there are >= 2 programs per SM."""
    if M <= 16:
        split = 1
        while triton.cdiv(N, 64) * split < 2 * num_sms and split * 2 <= max(1, G // 4):
            split *= 2
        return 16, 64, split, 4, 4
    if M <= 64:
        return 64, 64, 1, 4, 4
    return 128, 128, 1, 8, 3


def launch_w4a8(x2: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None,
                residual: torch.Tensor | None, silu_mul: bool, split_k: int | None = None) -> torch.Tensor:
    """``x2 [M, K]`` bf16/fp16 (contiguous) times canonical int4 ``qt`` with fp8 activations."""
    from qcompile.codegen.gemm.fp8 import quantize_act_fp8

    group = qt.spec.group_size
    if group not in W4A8_GROUPS:
        raise NotImplementedError(f"W4A8 needs int4 group size in {W4A8_GROUPS}, got {group}")
    M, K = x2.shape
    N = qt.data.shape[0]
    G = qt.scale.shape[1]
    xq, xs = quantize_act_fp8(x2, pad_to=group)  # [M, G * group], zero padded
    n_out = N // 2 if silu_mul else N
    out = new_output((M, n_out), x2.dtype, x2.device)
    bm, bn, split, warps, stages = w4a8_config(M, N, G, triton_env.num_sms(x2.device))
    if split_k is not None:
        split = split_k
    target = torch.zeros((M, N), device=x2.device, dtype=torch.float32) if split > 1 else out
    data = qt.data.contiguous()
    scale = qt.scale.contiguous()
    zero = qt.zero.contiguous() if qt.zero is not None else None
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn), split)
    before_launch()
    w4a8_gemm_kernel[grid](
        xq, xs, data, scale, zero if zero is not None else data,
        bias if bias is not None else xs, residual if residual is not None else xs, target,
        M, N, K, G,
        xq.stride(0), data.stride(0), scale.stride(0), zero.stride(0) if zero is not None else 0,
        target.stride(0), residual.stride(0) if residual is not None else 0,
        HAS_ZERO=zero is not None, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        SILU_MUL=silu_mul, EMULATE_DOT=interpreting(), SPLIT_K=split,
        BLOCK_M=bm, BLOCK_N=bn, GROUP=group, GROUP_M=8, num_warps=warps, num_stages=stages,
    )
    if split > 1:
        finish_split_k(target, out, bias, residual, silu_mul)
    return out
