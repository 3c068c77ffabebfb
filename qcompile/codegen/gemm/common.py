"""Pieces shared by the GEMM kernel families: code/scale decoders and epilogues (the dot that
also runs under the interpreter is ``triton_env.dot``).

Every kernel computes ``acc[m, v] = sum_k x[m, k] * W[row(v), k]`` over a tile of
*virtual* output columns ``v``. Normally ``row(v) = v``. For the fused
``silu_mul`` epilogue on a merged gate/up weight (rows ``[0, N/2)`` gate, rows
``[N/2, N)`` up), virtual column ``2j`` reads gate row ``j`` and ``2j + 1`` reads
up row ``j + N/2``, so one tile holds matching gate/up pairs side by side and the
epilogue can split them without any re-layout of the weight.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from qcompile.codegen.triton_env import before_launch
from qcompile.formats import kernel_codes

SCALE_E8M0 = tl.constexpr(kernel_codes.SCALE_E8M0)


def new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output buffer; NaN-filled when ``QCOMPILE_GEMM_POISON=1`` so that a GPU check
    catches any element a kernel forgets to write."""
    if os.environ.get("QCOMPILE_GEMM_POISON", "0") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def virtual_rows(offs_v, N, SILU_MUL: tl.constexpr):
    """Map virtual output columns to physical weight rows (see module docstring)."""
    if SILU_MUL:
        return (offs_v // 2) + (offs_v % 2) * (N // 2)
    else:
        return offs_v


@triton.jit
def decode_fp4(q):
    """e2m1 code (uint8 0..15) -> float32: magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6; bit 3 = sign."""
    mag = q & 7
    e = (mag >> 1).to(tl.float32)
    m = (mag & 1).to(tl.float32)
    normal = (1.0 + 0.5 * m) * tl.exp2(e - 1.0)
    v = tl.where(e == 0.0, 0.5 * m, normal)
    return tl.where((q & 8) != 0, -v, v)


@triton.jit
def decode_scale(s, SCALE_KIND: tl.constexpr):
    """Stored scale (``kernel_codes.SCALE_*``) -> float32."""
    if SCALE_KIND == SCALE_E8M0:
        return tl.exp2(s.to(tl.float32) - 127.0)
    else:
        return s.to(tl.float32)


@triton.jit
def swizzle(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order (Triton matmul tutorial): neighbouring programs share W tiles in L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    group_id = pid // width
    first_m = group_id * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def store_epilogue(acc, offs_m, pid_n, M, N, rows, n_mask,
                   out_ptr, stride_om, bias_ptr, res_ptr, stride_rm,
                   HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, SILU_MUL: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """bias -> (silu(gate) * up) -> + residual -> cast -> store, all in registers."""
    if HAS_BIAS:
        b = tl.load(bias_ptr + rows, mask=n_mask, other=0.0).to(tl.float32)
        acc = acc + b[None, :]
    m_mask = offs_m < M
    if SILU_MUL:
        gate, up = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N // 2, 2)))
        y = gate * tl.sigmoid(gate) * up
        cols = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        mask = m_mask[:, None] & (cols[None, :] < N // 2)
    else:
        y = acc
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = m_mask[:, None] & (cols[None, :] < N)
    if HAS_RES:
        r = tl.load(res_ptr + offs_m[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0)
        y = y + r.to(tl.float32)
    tl.store(out_ptr + offs_m[:, None] * stride_om + cols[None, :],
             y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def splitk_epilogue_kernel(ws_ptr, bias_ptr, res_ptr, out_ptr, M, N_OUT, N,
                           stride_rm, stride_om,
                           HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, SILU_MUL: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Finish a split-K GEMM: the fp32 workspace ``ws [M, N]`` (physical columns)
    holds the reduced products; apply bias / silu_mul / residual and cast."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (cols[None, :] < N_OUT)
    y = tl.load(ws_ptr + offs_m[:, None] * N + cols[None, :], mask=mask, other=0.0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=cols < N_OUT, other=0.0).to(tl.float32)[None, :]
    if SILU_MUL:
        up = tl.load(ws_ptr + offs_m[:, None] * N + (cols[None, :] + N_OUT), mask=mask, other=0.0)
        if HAS_BIAS:
            up += tl.load(bias_ptr + N_OUT + cols, mask=cols < N_OUT, other=0.0).to(tl.float32)[None, :]
        y = y * tl.sigmoid(y) * up
    if HAS_RES:
        y += tl.load(res_ptr + offs_m[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_m[:, None] * stride_om + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def finish_split_k(ws: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None,
                   residual: torch.Tensor | None, silu_mul: bool) -> None:
    """Launch :func:`splitk_epilogue_kernel` over ``out [M, N_OUT]``."""
    M, N = ws.shape
    n_out = out.shape[1]
    grid = (triton.cdiv(M, 16), triton.cdiv(n_out, 128))
    before_launch()
    splitk_epilogue_kernel[grid](
        ws, bias if bias is not None else ws, residual if residual is not None else ws, out,
        M, n_out, N,
        residual.stride(0) if residual is not None else 0, out.stride(0),
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, SILU_MUL=silu_mul,
        BLOCK_M=16, BLOCK_N=128,
    )
