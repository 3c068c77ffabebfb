"""W4A4: NVFP4 / MXFP4 weights x activations quantized on the fly to the same format.

Two kernels:

- ``act_quant_fp4_kernel`` quantizes each token row in blocks (16 for NVFP4 with
  e4m3 block scales under an fp32 per-tensor global scale; 32 for MXFP4 with E8M0
  shared exponents) and writes the canonical packed layout of
  ``qcompile/formats/spec.py`` (element 2i in the low nibble).
- ``w4a4_gemm_kernel`` multiplies two canonical FP4 operands. For MXFP4 on a GPU it
  calls ``tl.dot_scaled(..., "e2m1", ...)``: native FP4 MMA on Blackwell; on Hopper
  Triton emulates it by upcasting both operands to bf16 (correct, not fast). NVFP4
  (e4m3 scales, block 16, which ``tl.dot_scaled`` does not take) and the Triton
  interpreter (which has no ``dot_scaled``) use the explicit path: decode e2m1,
  multiply by the block scale (exact in bf16: 2 + 4 significant bits), bf16 ``tl.dot``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcompile.codegen.gemm.common import (
    decode_fp4,
    decode_scale,
    new_output,
    store_epilogue,
    swizzle,
    virtual_rows,
)
from qcompile.codegen.triton_env import before_launch, dot, interpreting
from qcompile.formats import microscaling
from qcompile.formats.kernel_codes import scale_code
from qcompile.formats.spec import QuantizedTensor, QuantSpec

BLOCK = {"nvfp4": 16, "mxfp4": 32}
NVFP4_GLOBAL_DIVISOR: tl.constexpr = tl.constexpr(microscaling.NVFP4_GLOBAL_DIVISOR)  # 6 * 448
E4M3_MAX = tl.constexpr(microscaling.E4M3_MAX)
E4M3_MIN_NORMAL = tl.constexpr(microscaling.E4M3_MIN_NORMAL)
DOT_SCALED_STATUS: dict[str, str] = {}
"""Per device name: "ok" once ``tl.dot_scaled`` compiled there, else the error text."""


@triton.jit
def encode_e2m1(v):
    """float32 -> e2m1 code (uint8), round to nearest, ties to even, saturating at 6."""
    a = tl.abs(v)
    mag = ((a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
           + (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32)
           + (a > 5.0).to(tl.int32))
    sign = tl.where(v < 0, 8, 0)
    return (mag + sign).to(tl.uint8)


@triton.jit
def pow2(e):
    """Exact 2**e (float32) for integer e in [-126, 127], built from the exponent bits."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def round_to_e4m3(s):
    """Positive float32 -> nearest e4m3 value, ties to even (as float32), clamped to [2^-6, 448].

    Exponent read from the float's bits and power-of-two steps built from bits, so it
    is exact on GPUs too (``tl.log2`` / ``tl.exp2`` are approximate there), and no fp8
    cast (the Triton 3.6 interpreter gets that wrong when rounding carries into the
    next power of two)."""
    s = tl.minimum(tl.maximum(s, E4M3_MIN_NORMAL), E4M3_MAX)
    e = ((s.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    y = s * pow2(3 - e)  # in [8, 16): the integer part keeps 3 mantissa bits
    f = tl.floor(y)
    d = y - f
    odd = (f.to(tl.int32) & 1) == 1
    f = tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)  # ties to even, as the formats library
    return tl.minimum(f * pow2(e - 3), E4M3_MAX)


@triton.jit
def nvfp4_global_scale(amax):
    """``amax / 2688`` nudged to a fixed point of ``g -> fl(fl(2688 g) / 2688)``, 1 for amax = 0:
    bit-identical to ``qcompile.formats.microscaling.nvfp4_global_scale``, without its host loop."""
    d = tl.full(amax.shape, NVFP4_GLOBAL_DIVISOR, tl.float32)
    g = tl.div_rn(amax, d)
    for _ in tl.static_range(8):
        g = tl.div_rn(g * d, d)
    return tl.where((amax > 0) & (g > 0), g, 1.0)


@triton.jit
def act_quant_fp4_kernel(x_ptr, q_ptr, s_ptr, amax_ptr, gs_ptr, K, NBLK, stride_xm, stride_qm, stride_sm,
                         IS_NV: tl.constexpr, B: tl.constexpr, NB: tl.constexpr):
    """Program (row, chunk): NB blocks of B elements -> packed codes + one scale per block."""
    row = tl.program_id(0)
    blk = tl.program_id(1) * NB + tl.arange(0, NB)
    offs = blk[:, None] * B + tl.arange(0, B)[None, :]
    x = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)  # [NB]
    if IS_NV:
        gs = nvfp4_global_scale(tl.load(amax_ptr))
        if (row == 0) & (tl.program_id(1) == 0):
            tl.store(gs_ptr, gs)
        s = round_to_e4m3(tl.div_rn(tl.div_rn(amax, tl.full(amax.shape, 6.0, tl.float32)),
                                    tl.broadcast_to(gs, amax.shape)))  # e4m3 block scale
        # correctly rounded division: GPUs' default fp32 '/' is approximate and flips e2m1 ties
        v = tl.div_rn(x, tl.broadcast_to((s * gs)[:, None], (NB, B)))
        tl.store(s_ptr + row * stride_sm + blk, s.to(s_ptr.dtype.element_ty), mask=blk < NBLK)
    else:
        # shared exponent floor(log2(amax)) - 2, read from the float's bits (exact)
        e = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127 - 2
        e = tl.where(amax > 0, tl.minimum(tl.maximum(e, -127), 127), -127)
        v = x * pow2(-e)[:, None]  # -e in [-125, 127]: a normal float, exact product
        tl.store(s_ptr + row * stride_sm + blk, (e + 127).to(tl.uint8), mask=blk < NBLK)
    codes = encode_e2m1(v)
    lo, hi = tl.split(tl.reshape(codes, (NB, B // 2, 2)))
    packed = lo | (hi << 4)
    offs_b = blk[:, None] * (B // 2) + tl.arange(0, B // 2)[None, :]
    tl.store(q_ptr + row * stride_qm + offs_b, packed, mask=(blk < NBLK)[:, None])


@triton.jit
def _fp4_tile(ptr, s_ptr, rows, row_mask, k0, KD, NBLK, stride, stride_s,
              R: tl.constexpr, BLOCK_K: tl.constexpr, B: tl.constexpr, SCALE_KIND: tl.constexpr):
    """Load and dequantize an ``[R, BLOCK_K]`` FP4 tile (values times block scales) as bf16."""
    offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    packed = tl.load(ptr + rows[:, None] * stride + offs_b[None, :],
                     mask=row_mask[:, None] & (offs_b[None, :] < KD), other=0)
    v = decode_fp4(tl.reshape(tl.join(packed & 0xF, packed >> 4), (R, BLOCK_K)))
    NG: tl.constexpr = BLOCK_K // B
    offs_g = k0 // B + tl.arange(0, NG)
    s_mask = row_mask[:, None] & (offs_g[None, :] < NBLK)
    s = tl.load(s_ptr + rows[:, None] * stride_s + offs_g[None, :], mask=s_mask)
    s = tl.where(s_mask, decode_scale(s, SCALE_KIND), 0.0)  # no `other=`: fp8 has no literal 0
    s = tl.reshape(tl.broadcast_to(s[:, :, None], (R, NG, B)), (R, BLOCK_K))
    return (v * s).to(tl.bfloat16)


@triton.jit
def w4a4_gemm_kernel(
    x_ptr, xs_ptr, xgs_ptr, w_ptr, ws_ptr, wgs_ptr, bias_ptr, res_ptr, out_ptr,
    M, N, KD, NBLK,
    stride_xm, stride_xsm, stride_wn, stride_wsn, stride_om, stride_rm,
    SCALE_KIND: tl.constexpr, HAS_GS: tl.constexpr, USE_DOT_SCALED: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, SILU_MUL: tl.constexpr, EMULATE_DOT: tl.constexpr,
    B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = swizzle(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_v = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_v < N
    m_mask = offs_m < M
    rows = tl.where(n_mask, virtual_rows(offs_v, N, SILU_MUL), 0)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, KD * 2, BLOCK_K):
        if USE_DOT_SCALED:
            offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            offs_g = k0 // B + tl.arange(0, BLOCK_K // B)
            xb = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_b[None, :],
                         mask=m_mask[:, None] & (offs_b[None, :] < KD), other=0)
            wb = tl.load(w_ptr + rows[:, None] * stride_wn + offs_b[None, :],
                         mask=offs_b[None, :] < KD, other=0)
            xsc = tl.load(xs_ptr + offs_m[:, None] * stride_xsm + offs_g[None, :],
                          mask=m_mask[:, None] & (offs_g[None, :] < NBLK), other=0)
            wsc = tl.load(ws_ptr + rows[:, None] * stride_wsn + offs_g[None, :],
                          mask=offs_g[None, :] < NBLK, other=0)
            acc = tl.dot_scaled(xb, xsc, "e2m1", tl.trans(wb), wsc, "e2m1", acc)
        else:
            xv = _fp4_tile(x_ptr, xs_ptr, offs_m, m_mask, k0, KD, NBLK, stride_xm, stride_xsm,
                           BLOCK_M, BLOCK_K, B, SCALE_KIND)
            wv = _fp4_tile(w_ptr, ws_ptr, rows, n_mask, k0, KD, NBLK, stride_wn, stride_wsn,
                           BLOCK_N, BLOCK_K, B, SCALE_KIND)
            acc = dot(xv, tl.trans(wv), acc, EMULATE_DOT)

    if HAS_GS:
        acc = acc * (tl.load(xgs_ptr) * tl.load(wgs_ptr))
    store_epilogue(acc, offs_m, pid_n, M, N, rows, n_mask, out_ptr, stride_om, bias_ptr, res_ptr,
                   stride_rm, HAS_BIAS, HAS_RES, SILU_MUL, BLOCK_M, BLOCK_N)


def quantize_act_fp4(x2: torch.Tensor, fmt: str) -> QuantizedTensor:
    """Per-token dynamic NVFP4 / MXFP4 quantization of ``x2 [M, K]`` into a canonical
    QuantizedTensor (NVFP4's global scale: ``amax(x) / (6 * 448)``, one torch reduction)."""
    if fmt not in BLOCK:
        raise ValueError(f"FP4 activation format must be nvfp4 or mxfp4, got {fmt}")
    M, K = x2.shape
    B = BLOCK[fmt]
    nblk = triton.cdiv(K, B)
    q = torch.empty((M, nblk * B // 2), device=x2.device, dtype=torch.uint8)
    if fmt == "nvfp4":
        s = torch.empty((M, nblk), device=x2.device, dtype=torch.float8_e4m3fn)
        amax = x2.abs().amax().float().reshape(1)
        gs = torch.empty(1, device=x2.device, dtype=torch.float32)  # written by the kernel
    else:
        s = torch.empty((M, nblk), device=x2.device, dtype=torch.uint8)
        gs = amax = None
    NB = min(64, triton.next_power_of_2(nblk))
    before_launch()
    act_quant_fp4_kernel[(M, triton.cdiv(nblk, NB))](
        x2, q, s, amax if gs is not None else s, gs if gs is not None else s, K, nblk, x2.stride(0), q.stride(0), s.stride(0),
        IS_NV=fmt == "nvfp4", B=B, NB=NB,
    )
    return QuantizedTensor(QuantSpec(fmt, dynamic=True), (M, K), q, s, None,
                           gs.reshape(()) if gs is not None else None)


def w4a4_config(M: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) from the M bucket."""
    if M <= 16:
        return 16, 64, 128, 4, 3
    if M <= 64:
        return 64, 64, 128, 4, 3
    return 128, 128, 128, 8, 3


def _launch(xq: QuantizedTensor, qt: QuantizedTensor, out: torch.Tensor, bias, residual, silu_mul: bool,
            use_dot_scaled: bool) -> None:
    fmt = qt.spec.format
    M = xq.data.shape[0]
    N = qt.data.shape[0]
    bm, bn, bk, warps, stages = w4a4_config(M)
    has_gs = fmt == "nvfp4"
    xgs = xq.global_scale.reshape(1).float() if has_gs else xq.scale
    wgs = qt.global_scale.reshape(1).float().to(qt.data.device) if has_gs else xq.scale
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    before_launch()
    w4a4_gemm_kernel[grid](
        xq.data, xq.scale, xgs, qt.data, qt.scale, wgs,
        bias if bias is not None else out, residual if residual is not None else out, out,
        M, N, qt.data.shape[1], qt.scale.shape[1],
        xq.data.stride(0), xq.scale.stride(0), qt.data.stride(0), qt.scale.stride(0),
        out.stride(0), residual.stride(0) if residual is not None else 0,
        SCALE_KIND=scale_code(fmt), HAS_GS=has_gs, USE_DOT_SCALED=use_dot_scaled,
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, SILU_MUL=silu_mul,
        EMULATE_DOT=interpreting(), B=BLOCK[fmt],
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages,
    )


def launch_w4a4(x2: torch.Tensor, qt: QuantizedTensor, act_format: str, bias: torch.Tensor | None,
                residual: torch.Tensor | None, silu_mul: bool) -> torch.Tensor:
    """``x2 [M, K]`` quantized per token to ``act_format`` times the FP4 weight ``qt``."""
    fmt = qt.spec.format
    if fmt not in BLOCK or act_format != fmt:
        raise NotImplementedError(f"W4A4 needs matching nvfp4/mxfp4 weights and activations, got {fmt} x {act_format}")
    xq = quantize_act_fp4(x2, act_format)
    N = qt.data.shape[0]
    out = new_output((x2.shape[0], N // 2 if silu_mul else N), x2.dtype, x2.device)
    use_ds = fmt == "mxfp4" and x2.is_cuda and not interpreting()
    if use_ds:
        dev = torch.cuda.get_device_name(x2.device)
        if DOT_SCALED_STATUS.get(dev, "ok") == "ok":
            try:
                _launch(xq, qt, out, bias, residual, silu_mul, True)
                DOT_SCALED_STATUS[dev] = "ok"
                return out
            except Exception as e:  # noqa: BLE001 - compile failure: record it, take the explicit path
                DOT_SCALED_STATUS[dev] = f"tl.dot_scaled failed to compile: {e!r}"[:500]
    _launch(xq, qt, out, bias, residual, silu_mul, False)
    return out
