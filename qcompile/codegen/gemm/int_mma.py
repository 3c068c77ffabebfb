"""Integer-weight GEMM on tensor cores with register dequantization: int4 / int8 weights
(symmetric or with zero points, per group or per channel) times bf16/fp16 activations.

Why a kernel of its own: converting a weight code with ``int -> float`` (``I2F``) issues at a
quarter of the FMA rate on Hopper, so a kernel that converts every code that way is bound by the
conversion, not by the bytes it reads (the weight-only kernel took as long for int4 as for int8).
Here no code is converted by a conversion instruction. Codes become 16-bit floats with integer
bit tricks (PTX ``lop3``/``prmt`` through ``tl.inline_asm_elementwise``):

- int4: a nibble ``q`` OR-ed into the mantissa of 128.0 (bf16 ``0x4300``) or 1024.0 (fp16
  ``0x6400``) *is* the float ``128 + q``; one ``fma.rn.{bf16,f16}x2`` subtracts ``128 + zero``
  exactly, two codes at a time. Per 8 codes: 1 shift, 4 ``prmt``, 4 ``lop3``, 4 ``fma``.
- int8: a byte placed by ``prmt`` into the mantissa of 2^23 is ``2^23 + u`` in fp32; one
  subtraction gives the code exactly and its upper half is the bf16 value (fp16: the byte goes
  straight into the mantissa of 1024.0).

The weights stay in the canonical layout (no second copy on the GPU): byte ``i`` of an int4 row
holds codes ``2i`` (low nibble) and ``2i + 1``. The bytes are read as int16 so that each thread
holds whole 32-bit words in the MMA operand layout; the dequantizer returns a tile's codes as four
matrices (``w_i[:, 2a + e]`` = code ``8a + 2i + e``) and the activations are loaded in the same
order, so a K tile is four ``tl.dot``s with no interleave. Group scales multiply each tile's fp32
partial product (tiles never straddle a group); per-channel scales multiply the accumulator once.

Small M is split along K so that every SM streams weights. The split partials go to an fp32
workspace and the last program of each output tile (an atomic ticket) sums them and runs the
epilogue, so a call is one launch: no zero-fill, no second kernel. The tickets reset themselves.

Under ``TRITON_INTERPRET=1`` (``ASM=False``) the bit tricks are replaced by plain loads and
arithmetic that compute the same numbers, so the tests exercise every index path on CPU; the
PTX is checked bit for bit by an emulator (``tests/codegen/test_int_mma_ptx.py``) and on the GPU
by ``benchmarks/check_gemm.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcompile.codegen.gemm.common import (
    new_output,
    store_epilogue,
    swizzle,
    virtual_rows,
)
from qcompile.codegen.gemm.configs import GemmConfig
from qcompile.codegen.triton_env import before_launch, dot, interpreting
from qcompile.formats import kernel_codes

W_INT4 = tl.constexpr(kernel_codes.W_INT4)

# int4 → 16-bit float, 8 codes (4 bytes B0..B3, codes c0..c7, c2i = Bi & 15, c2i+1 = Bi >> 4)
# per call. With s = w >> 4, prmt puts Bi in byte 0 and (Bi >> 4) in byte 2 of p, so
# p & 0x000F000F | MAGIC is the pair (MAGIC + c2i, MAGIC + c2i+1); fma(v, 1, -(MAGIC + zero)) leaves
# (c - zero) exactly. Four outputs, two codes each: (c0, c1), (c2, c3), (c4, c5), (c6, c7).
_INT4_ASM = """
{
.reg .b32 s, p0, p1, p2, p3, one, neg;
mov.b32 one, ONE;
NEG_SETUP
shr.b32 s, $4, 4;
prmt.b32 p0, $4, s, 0x0400;
prmt.b32 p1, $4, s, 0x0501;
prmt.b32 p2, $4, s, 0x0602;
prmt.b32 p3, $4, s, 0x0703;
lop3.b32 p0, p0, 0x000F000F, MAGIC, 0xEA;
lop3.b32 p1, p1, 0x000F000F, MAGIC, 0xEA;
lop3.b32 p2, p2, 0x000F000F, MAGIC, 0xEA;
lop3.b32 p3, p3, 0x000F000F, MAGIC, 0xEA;
fma.rn.TY $0, p0, one, neg;
fma.rn.TY $1, p1, one, neg;
fma.rn.TY $2, p2, one, neg;
fma.rn.TY $3, p3, one, neg;
}
"""
_BF16 = {"MAGIC": "0x43004300", "ONE": "0x3F803F80", "TY": "bf16x2"}
_F16 = {"MAGIC": "0x64006400", "ONE": "0x3C003C00", "TY": "f16x2"}


def _fill(template: str, values: dict) -> tl.constexpr:
    for k, v in values.items():
        template = template.replace(k, v)
    return tl.constexpr(template)


# symmetric codes: the offset is the constant 8 (-(128 + 8) = 0xC308 in bf16, -(1024 + 8) = 0xE408 in fp16)
SYM4_TO_BF16 = _fill(_INT4_ASM, {**_BF16, "NEG_SETUP": "mov.b32 neg, 0xC308C308;"})
SYM4_TO_F16 = _fill(_INT4_ASM, {**_F16, "NEG_SETUP": "mov.b32 neg, 0xE408E408;"})
# zero points: the negated offset pair comes in as the second operand
ASYM4_TO_BF16 = _fill(_INT4_ASM, {**_BF16, "NEG_SETUP": "mov.b32 neg, $5;"})
ASYM4_TO_F16 = _fill(_INT4_ASM, {**_F16, "NEG_SETUP": "mov.b32 neg, $5;"})

# int8 → bf16, 4 codes per call: u = code bits (signed codes are flipped to u = q + 128 by the
# caller's XOR); prmt puts u into the low mantissa byte of 2^23; minus (2^23 + offset) is exact;
# the upper halves of two such fp32 values are two exact bf16 values.
INT8_TO_BF16 = tl.constexpr("""
{
.reg .b32 base, f0, f1, f2, f3;
mov.b32 base, 0x4B000000;
prmt.b32 f0, $2, base, 0x7650;
prmt.b32 f1, $2, base, 0x7651;
prmt.b32 f2, $2, base, 0x7652;
prmt.b32 f3, $2, base, 0x7653;
sub.f32 f0, f0, $3;
sub.f32 f1, f1, $3;
sub.f32 f2, f2, $3;
sub.f32 f3, f3, $3;
prmt.b32 $0, f0, f1, 0x7632;
prmt.b32 $1, f2, f3, 0x7632;
}
""")
# int8 → fp16: u into the mantissa of 1024.0 (bytes [u0, 0x64, u1, 0x64]), minus (1024 + offset).
INT8_TO_F16 = tl.constexpr("""
{
.reg .b32 base, h0, h1, one;
mov.b32 base, 0x64646464;
mov.b32 one, 0x3C003C00;
prmt.b32 h0, $2, base, 0x4140;
prmt.b32 h1, $2, base, 0x4342;
fma.rn.f16x2 $0, h0, one, $3;
fma.rn.f16x2 $1, h1, one, $3;
}
""")
MEMBAR = tl.constexpr("membar.gl; mov.b32 $0, 0;")


@triton.jit
def _neg_offset_pair(off, BF16: tl.constexpr):
    """Bits of the 16-bit pair (-(MAGIC + off), -(MAGIC + off)) for the magic-number fma:
    MAGIC is 128.0 in bf16 (off < 128) and 1024.0 in fp16 (off < 1024)."""
    h = off.to(tl.uint32) | (0xC300 if BF16 else 0xE400)
    return (h | (h << 16)).to(tl.int32, bitcast=True)


@triton.jit
def _nibbles_minus(base, byte, KD, sh, o, DT: tl.constexpr):
    """Interpreter twin of the int4 asm: nibble ``sh`` of ``base[byte]`` minus ``o``, in DT."""
    return (((tl.load(base + tl.minimum(byte, KD - 1)).to(tl.int32) >> sh) & 0xF).to(tl.float32) - o).to(DT)


@triton.jit
def _int4_tile(w_ptr, rows, kb, KD, stride_wn, off, HAS_ZERO: tl.constexpr, DT: tl.constexpr,
               BF16: tl.constexpr, HALF: tl.constexpr, W_FULL: tl.constexpr, ASM: tl.constexpr):
    """Codes of W[rows, 2 kb : 2 kb + 2 HALF] as ``q - off`` in DT, as four [BLOCK_N, HALF // 2]
    matrices: ``w_i[:, 2a + e]`` is code ``8a + 2i + e``. The bytes are read as int16 (four codes
    each) so that the MMA operand layout gives every thread whole pairs of codes: the asm's
    ``pack=2`` then always sees the two int16 of one 32-bit word. ``off`` ([BLOCK_N] int32) is
    the zero point (8 for symmetric codes). ``W_FULL``: every code of the tile is stored (K is
    padded to whole groups, and a tile never straddles one), so the load takes no bound: the asm
    needs each thread to hold the two int16 of a word in consecutive registers, which the
    compiler's layout gives a contiguous load but not a clamped one (the clamped tail tile of a
    grouped asymmetric weight ran the asm in a layout pairing rows 8 apart: garbage on an H200). Otherwise
    (per-channel scales, K not a tile multiple) int16 past the ``KD`` stored bytes load as 0 under
    a mask, which keeps the addresses contiguous; those codes meet zero activations."""
    Q: tl.constexpr = HALF // 2
    offs = kb // 2 + tl.arange(0, Q)
    ptrs = w_ptr.to(tl.pointer_type(tl.int16)) + rows[:, None] * (stride_wn // 2) + offs[None, :]
    if ASM:
        if W_FULL:  # noqa: SIM108 (constexpr branch)
            w16 = tl.load(ptrs)
        else:
            w16 = tl.load(ptrs, mask=(offs < KD // 2)[None, :], other=0)
        if not HAS_ZERO:
            if BF16:
                w0, w1, w2, w3 = tl.inline_asm_elementwise(
                    SYM4_TO_BF16, "=r,=r,=r,=r,r", [w16], dtype=(tl.bfloat16,) * 4, is_pure=True, pack=2)
            else:
                w0, w1, w2, w3 = tl.inline_asm_elementwise(
                    SYM4_TO_F16, "=r,=r,=r,=r,r", [w16], dtype=(tl.float16,) * 4, is_pure=True, pack=2)
        else:
            zneg = tl.broadcast_to(_neg_offset_pair(off, BF16)[:, None], w16.shape)
            if BF16:
                w0, w1, w2, w3 = tl.inline_asm_elementwise(
                    ASYM4_TO_BF16, "=r,=r,=r,=r,r,r,r", [w16, zneg], dtype=(tl.bfloat16,) * 4, is_pure=True,
                    pack=2)
            else:
                w0, w1, w2, w3 = tl.inline_asm_elementwise(
                    ASYM4_TO_F16, "=r,=r,=r,=r,r,r,r", [w16, zneg], dtype=(tl.float16,) * 4, is_pure=True,
                    pack=2)
    else:
        # element 2a + e of w_i is code 8a + 2i + e: byte 4a + i, nibble e
        j = tl.arange(0, Q)
        byte = (kb + (j // 2) * 4)[None, :]
        sh = ((j % 2) * 4)[None, :]
        base = w_ptr + rows[:, None] * stride_wn
        o = off.to(tl.float32)[:, None]
        w0 = _nibbles_minus(base, byte, KD, sh, o, DT)
        w1 = _nibbles_minus(base, byte + 1, KD, sh, o, DT)
        w2 = _nibbles_minus(base, byte + 2, KD, sh, o, DT)
        w3 = _nibbles_minus(base, byte + 3, KD, sh, o, DT)
    return w0, w1, w2, w3


@triton.jit
def _int8_tile(w_ptr, rows, k0, KD, stride_wn, off, SIGNED: tl.constexpr, DT: tl.constexpr,
               BF16: tl.constexpr, BLOCK_K: tl.constexpr, W_FULL: tl.constexpr, ASM: tl.constexpr):
    """W[rows, k0 : k0 + BLOCK_K] as ``q - off`` in DT (signed codes: off = 0). Like
    :func:`_int4_tile` (the asm takes 4 consecutive bytes of a thread): no bound when ``W_FULL``,
    else a masked load (codes past ``KD`` are 0 and meet zero activations)."""
    offs = k0 + tl.arange(0, BLOCK_K)
    ptrs = w_ptr + rows[:, None] * stride_wn + offs[None, :]
    if ASM:
        if W_FULL:
            u = tl.load(ptrs.to(tl.pointer_type(tl.uint8)))
        else:
            u = tl.load(ptrs.to(tl.pointer_type(tl.uint8)), mask=(offs < KD)[None, :], other=0)
        if SIGNED:
            u = u ^ 0x80  # two's complement -> q + 128
            off = off + 128
        if BF16:
            sub = tl.broadcast_to((off.to(tl.float32) + 8388608.0)[:, None], u.shape)
            return tl.inline_asm_elementwise(INT8_TO_BF16, "=r,=r,r,r,r,r,r", [u, sub],
                                             dtype=tl.bfloat16, is_pure=True, pack=4)
        else:
            zneg = tl.broadcast_to(_neg_offset_pair(off, BF16)[:, None], u.shape)
            return tl.inline_asm_elementwise(INT8_TO_F16, "=r,=r,r,r,r,r,r", [u, zneg],
                                             dtype=tl.float16, is_pure=True, pack=4)
    else:
        q = tl.load(ptrs, mask=(offs < KD)[None, :], other=0).to(tl.float32)
        return (q - off.to(tl.float32)[:, None]).to(DT)


@triton.jit
def _x_tile(x_ptr, offs_m, M, k0, K, stride_xm, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """x[offs_m, k0 : k0 + BLOCK_K], zero for rows >= M and past K."""
    offs = k0 + tl.arange(0, BLOCK_K)
    ptrs = x_ptr + offs_m[:, None] * stride_xm + offs[None, :]
    m_ok = (offs_m < M)[:, None]
    if EVEN_K:
        return tl.load(ptrs, mask=m_ok, other=0.0)
    else:
        return tl.load(ptrs, mask=m_ok & (offs[None, :] < K), other=0.0)


@triton.jit
def _x_pairs(x_ptr, offs_m, M, k0, K, stride_xm, i: tl.constexpr, Q: tl.constexpr, EVEN_K: tl.constexpr):
    """The activations that meet :func:`_int4_tile`'s ``w_i``: x[m, k0 + 8a + 2i + e] at column
    2a + e (pairs of contiguous elements). Rows >= M are masked (zero-filled without a read: at
    M = 1 the 15 padding rows of the tile cost no traffic)."""
    j = tl.arange(0, Q)
    k = k0 + (j // 2) * 8 + 2 * i + j % 2
    ptrs = x_ptr + offs_m[:, None] * stride_xm + k[None, :]
    mask = (offs_m < M)[:, None]
    if not EVEN_K:
        mask = mask & (k[None, :] < K)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _group_params(s_ptr, z_ptr, rows, t, t_end, G, stride_sn, stride_zn, off, HAS_ZERO: tl.constexpr,
                  GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """Scale (fp32) and zero point of K tile ``t`` (clamped to the last tile and group: tiles
    past the stored groups only meet zero activations)."""
    g = tl.minimum((tl.minimum(t, t_end - 1) * BLOCK_K) // GROUP, G - 1)
    s = tl.load(s_ptr + rows * stride_sn + g).to(tl.float32)
    if HAS_ZERO:
        off = tl.load(z_ptr + rows * stride_zn + g).to(tl.int32)
    return s, off


@triton.jit
def _release_fence(x, ASM: tl.constexpr):
    """Make this thread's global writes visible GPU-wide before the ticket is taken."""
    if ASM:
        tl.inline_asm_elementwise(MEMBAR, "=r,r", [x], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def int_mma_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, res_ptr, out_ptr, ws_ptr, ticket_ptr,
    M, N, K, KD, G, SPLIT_K, TILES_PER_SPLIT, NUM_K_TILES,
    stride_xm, stride_wn, stride_sn, stride_zn, stride_om, stride_rm, WS_M, WS_N,
    CODE: tl.constexpr, SIGNED: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, SILU_MUL: tl.constexpr,
    SPLIT: tl.constexpr, EVEN_K: tl.constexpr, W_FULL: tl.constexpr, ASM: tl.constexpr,
    EMULATE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``out = x @ dequant(W).T`` (+ epilogue) for one [BLOCK_M, BLOCK_N] tile and one K split.
    GROUP = 0: per-channel scales (applied once); else BLOCK_K divides GROUP (one scale and zero
    point per row and K tile)."""
    DT: tl.constexpr = x_ptr.dtype.element_ty
    BF16: tl.constexpr = DT == tl.bfloat16  # noqa: SIM300
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = swizzle(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_v = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_v < N
    rows = tl.where(n_mask, virtual_rows(offs_v, N, SILU_MUL), 0)

    HALF: tl.constexpr = BLOCK_K // 2
    Q: tl.constexpr = BLOCK_K // 4
    off = tl.full((BLOCK_N,), 8 if CODE == W_INT4 else 0, tl.int32)  # symmetric offsets
    if GROUP == 0 and HAS_ZERO:
        off = tl.load(z_ptr + rows * stride_zn).to(tl.int32)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t_begin = pid_k * TILES_PER_SPLIT
    t_end = tl.minimum(t_begin + TILES_PER_SPLIT, NUM_K_TILES)
    # Group scales and zero points are small loads the pipeliner does not prefetch; a
    # synchronous load per tile would stall every iteration for a DRAM round trip, so they are
    # fetched one tile ahead in registers.
    s_next = tl.zeros((BLOCK_N,), tl.float32)
    if GROUP > 0:
        s_next, off = _group_params(s_ptr, z_ptr, rows, t_begin, t_end, G, stride_sn, stride_zn, off,
                                    HAS_ZERO, GROUP, BLOCK_K)
    off_next = off
    for t in range(t_begin, t_end):
        k0 = t * BLOCK_K
        s = s_next
        if GROUP > 0:
            s_next, off_next = _group_params(s_ptr, z_ptr, rows, t + 1, t_end, G, stride_sn, stride_zn, off,
                                             HAS_ZERO, GROUP, BLOCK_K)
        if CODE == W_INT4:
            w0, w1, w2, w3 = _int4_tile(w_ptr, rows, k0 // 2, KD, stride_wn, off, HAS_ZERO, DT, BF16, HALF,
                                        W_FULL, ASM)
            part = dot(_x_pairs(x_ptr, offs_m, M, k0, K, stride_xm, 0, Q, EVEN_K), tl.trans(w0),
                       tl.zeros((BLOCK_M, BLOCK_N), tl.float32), EMULATE_DOT)
            part = dot(_x_pairs(x_ptr, offs_m, M, k0, K, stride_xm, 1, Q, EVEN_K), tl.trans(w1), part, EMULATE_DOT)
            part = dot(_x_pairs(x_ptr, offs_m, M, k0, K, stride_xm, 2, Q, EVEN_K), tl.trans(w2), part, EMULATE_DOT)
            part = dot(_x_pairs(x_ptr, offs_m, M, k0, K, stride_xm, 3, Q, EVEN_K), tl.trans(w3), part, EMULATE_DOT)
        else:
            w = _int8_tile(w_ptr, rows, k0, KD, stride_wn, off, SIGNED, DT, BF16, BLOCK_K, W_FULL, ASM)
            xt = _x_tile(x_ptr, offs_m, M, k0, K, stride_xm, BLOCK_K, EVEN_K)
            part = dot(xt, tl.trans(w), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), EMULATE_DOT)
        if GROUP > 0:
            acc += part * s[None, :]
            off = off_next
        else:
            acc += part
    if GROUP == 0:
        acc = acc * tl.load(s_ptr + rows * stride_sn).to(tl.float32)[None, :]

    if not SPLIT:
        store_epilogue(acc, offs_m, pid_n, M, N, rows, n_mask, out_ptr, stride_om, bias_ptr, res_ptr,
                       stride_rm, HAS_BIAS, HAS_RES, SILU_MUL, BLOCK_M, BLOCK_N)
    else:
        # Partial tile to the workspace [SPLIT_K, WS_M, WS_N] (rows < M only: at M = 1 the other
        # 15 rows of the tile are padding); the last of the SPLIT_K programs of this tile (its
        # ticket says so) sums the partials and runs the epilogue.
        ws_tile = ws_ptr + offs_m[:, None] * WS_N + offs_v[None, :]
        m_ok = (offs_m < M)[:, None]
        tl.store(ws_tile + pid_k * WS_M * WS_N, acc, mask=m_ok)
        _release_fence(offs_m, ASM)
        tl.debug_barrier()
        ticket = tl.atomic_add(ticket_ptr + pid, 1, sem="acq_rel")
        if ticket == SPLIT_K - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(SPLIT_K):
                total += tl.load(ws_tile + s * WS_M * WS_N, mask=m_ok, other=0.0, cache_modifier=".cg")
            store_epilogue(total, offs_m, pid_n, M, N, rows, n_mask, out_ptr, stride_om, bias_ptr,
                           res_ptr, stride_rm, HAS_BIAS, HAS_RES, SILU_MUL, BLOCK_M, BLOCK_N)
            tl.atomic_xchg(ticket_ptr + pid, 0)  # ready for the next call


MIN_BLOCK_K = 64
"""Smallest K tile of :func:`launch_int_mma`: an int4 tile is four ``tl.dot`` of ``block_k / 4``
codes, and a 16-bit tensor-core dot needs K >= 16 (the interpreter does not check)."""

_TICKETS: dict[tuple, torch.Tensor] = {}


def _tickets(device: torch.device, count: int) -> torch.Tensor:
    """Zeroed int32 tickets for split-K fix-up, one buffer per (device, stream), grown on demand.
    Each call leaves them zero again, so they are allocated (and zero-filled) once."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    buf = _TICKETS.get(key)
    if buf is None or buf.numel() < count:
        buf = torch.zeros(max(count, 1024), dtype=torch.int32, device=device)
        _TICKETS[key] = buf
    return buf


def supports(code: int, group: int, K: int) -> str | None:
    """``None`` if :func:`launch_int_mma` takes this weight, else why not."""
    if code not in (kernel_codes.W_INT4, kernel_codes.W_INT8):
        return "int_mma takes int4 and int8 weights"
    if K % 4:
        return f"int_mma needs K divisible by 4 (got {K})"
    if group and (group < 64 or group & (group - 1)):
        return f"int_mma needs per-channel scales or a power-of-two group >= 64 (got {group})"
    return None


def launch_int_mma(x2: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                   K: int, group: int, code: int, cfg: GemmConfig, bias: torch.Tensor | None,
                   residual: torch.Tensor | None, silu_mul: bool) -> torch.Tensor:
    """Run :func:`int_mma_kernel` on ``x2 [M, K]`` (contiguous, even row stride, 4-byte aligned)
    and canonical int4 / int8 weight tensors."""
    if cfg.block_k < MIN_BLOCK_K:
        raise ValueError(f"int_mma: block_k={cfg.block_k} is below {MIN_BLOCK_K} (a K tile is four dots of "
                         "block_k / 4 codes, and a tensor-core dot takes at least 16)")
    if group and group % cfg.block_k:
        raise ValueError(f"int_mma: block_k={cfg.block_k} must divide the group size {group}")
    M = x2.shape[0]
    N = data.shape[0]
    n_out = N // 2 if silu_mul else N
    out = new_output((M, n_out), x2.dtype, x2.device)
    num_k_tiles = triton.cdiv(K, cfg.block_k)
    split = max(1, min(cfg.split_k, num_k_tiles))
    per_split = triton.cdiv(num_k_tiles, split)
    split = triton.cdiv(num_k_tiles, per_split)  # no empty splits
    m_tiles, n_tiles = triton.cdiv(M, cfg.block_m), triton.cdiv(N, cfg.block_n)
    dummy = data
    if split > 1:
        ws = torch.empty((split, m_tiles * cfg.block_m, n_tiles * cfg.block_n), device=x2.device,
                         dtype=torch.float32)
        tickets = _tickets(x2.device, m_tiles * n_tiles)
    else:
        ws = tickets = dummy
    before_launch()
    int_mma_kernel[(m_tiles * n_tiles, split)](
        x2, data, scale, zero if zero is not None else dummy, bias if bias is not None else dummy,
        residual if residual is not None else dummy, out, ws, tickets,
        M, N, K, data.shape[1], scale.shape[1], split, per_split, num_k_tiles,
        x2.stride(0), data.stride(0), scale.stride(0), zero.stride(0) if zero is not None else 0,
        out.stride(0), residual.stride(0) if residual is not None else 0,
        m_tiles * cfg.block_m, n_tiles * cfg.block_n,
        CODE=code, SIGNED=data.dtype == torch.int8, GROUP=group, HAS_ZERO=zero is not None,
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, SILU_MUL=silu_mul,
        SPLIT=split > 1, EVEN_K=K % cfg.block_k == 0,
        W_FULL=data.shape[1] * (2 if code == kernel_codes.W_INT4 else 1) >= num_k_tiles * cfg.block_k,
        ASM=not interpreting(), EMULATE_DOT=interpreting(),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
