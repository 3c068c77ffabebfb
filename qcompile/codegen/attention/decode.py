"""Split-KV flash-decoding over a compressed KV cache, dequantizing on the fly.

One program per (batch row, KV head, split) runs an online softmax over its slice of the cache
for all ``GQA * T`` query rows that share the KV head (``T`` <= 8 query tokens, for speculative
decoding), so each compressed byte is read once. A last split per row reads the bf16 residual ring
of int4/int2 keys. The splits merge through their log-sum-exps: with few splits the last program
of a head to finish does it (an atomic ticket), so the call is one launch; with more, a second
kernel with a program per query row (``FUSED_MERGE_MAX_SPLITS``). The query rotation is fused.

Why it is built this way: decode attention is a few FLOPs per cache byte, so the kernel must
spend ~1 instruction per element or less, or it is bound by instruction issue and not by memory.

- **No int->float conversions.** On Hopper ``I2F``/``F2F`` issue at a quarter of the FMA rate;
  the previous kernel converted every element with them and ran at 5-10x its byte floor. Codes
  become fp16 with integer bit tricks (``inline_asm_elementwise``, 4 bytes per call): a nibble
  (int4) or crumb (int2) OR-ed into the mantissa of 1024.0 (fp16 ``0x6400``) is ``1024 + c`` (or
  ``1024 + 2^k c``), one ``fma.rn.f16x2`` removes the offset exactly, two codes at a time: per 8
  int4 codes 1 ``prmt``, 1 shift, 4 ``lop3``, 4 ``fma``. int8: a byte (sign flipped) into the
  mantissa of 1024.0, minus 1152. fp8 e4m3 uses the native paired ``cvt.rn.f16x2.e4m3x2``
  (2 elements per instruction).
- **Every asm is elementwise per byte** (channel ``PER*x + i`` of byte ``x`` goes to output ``i``),
  so it computes the same numbers whatever register layout the compiler gives it. Packed codes
  therefore come out as ``PER`` (2 for int4, 4 for int2) separate tensors, one per position in the
  byte: keys meet ``PER`` matching slices of the query (``q[:, i::PER]``) in ``PER`` dots; values
  feed ``PER`` accumulators whose columns are interleaved back on the final store. No
  ``join``/``reshape`` interleave, which would cost a shared-memory round trip.
- **Scales never touch elements.** Per-token scales (fp8, int8) multiply logits (keys) or
  probabilities (values); int4/int2 key scales and minimums (per channel, one token group per
  tile) fold into the query, ``q·(c*s + m) = (q*s)·c + q·m`` (``q·m`` is one small MMA per tile);
  int4/int2 value scales and minimums (per token) fold into the probabilities and one row sum.
  Key codes even skip the fma: the MMA takes ``1024 + 2^k c`` as the asm makes it, the query
  slices are pre-divided by ``2^k`` and ``1024 * sum(q*s)`` comes off with the ``q·m`` term.
- **Values are stored token-blocked** (``kv_formats.VALUE_TOKEN_BLOCK``): the P·V product runs over
  tokens, so with tokens contiguous per byte column the value bytes load straight into the tensor
  cores' operand layout (``ldmatrix.trans``) and the dequantization runs there, like the keys'.
- **One warp per program by default** (compressed formats): the query rows (GQA*T <= 16) fit one
  MMA tile, so a warp needs nothing from other warps (no probability exchange through shared
  memory, no barriers besides the copy pipeline); programs are many and small.
- Full tiles skip masking; the online softmax rescales lazily (only when a row's running maximum
  grows by more than ``2**TAU``), so most tiles skip the accumulator rescale.
- Code tiles stream through Triton's cp.async pipeline; the small per-tile vectors it does not
  take (key scales and minimums of the tile's group, value minimums) are prefetched one tile
  ahead by hand, so no tile waits on a global load.

Under ``TRITON_INTERPRET=1`` (``ASM=False``) the bit tricks are replaced by plain Triton that
computes the same numbers, so CPU tests exercise every index path; the PTX itself is checked on
CPU by an emulator (``tests/codegen/test_attention_ptx.py``) and on the GPU by
``benchmarks/check_attention.py``. Paths not worth a fast variant (pre-RoPE keys, value groups
smaller than the head, tiny head dims, key groups smaller than a tile) dequantize the full tile in
float32 first, as the previous kernel did.
"""

from __future__ import annotations

import math
import os
import struct

import torch
import triton
import triton.language as tl

from qcompile.codegen.attention.append import FMT_CODES
from qcompile.runtime.hadamard import hadamard_signs
from qcompile.runtime.kv_formats import VALUE_TOKEN_BLOCK

MAX_QUERY_TOKENS = 8
TAU = tl.constexpr(8.0)
"""Lazy rescaling threshold (log2 units): probabilities may reach 2**TAU before a rescale."""
UNPACK_MODES = ("auto", "generic")
ONE_WARP_TUNING = {"fp8_e4m3": (2, 4), "int8": (2, 4), "int4": (2, 8), "int2": (3, 8)}
"""(pipeline stages, programs per SM) of the one-warp compressed paths, by key format; rotated
keys (32-token tiles) take (3, 8). From the H100 sweeps at (8, 8192) and (8, 32768)
(benchmarks/attention.py --sweep-only, docs/benchmarks/attention-h100-80gb-hbm3.md): int4 / int2
are bound by each warp's latency, so the most programs that fit one wave (8 per SM, 255
registers a thread) won; 12 per SM (a second wave) was 30 % slower. int4 ran 6 % faster with two
stages than three (fewer live registers), int2 and rotated keys did not. fp8 / int8 spend fewer
instructions per byte: 3-4 per SM with two stages were fastest (fewer splits to merge)."""
MIN_SPLIT_TOKENS = 128
"""Fewest tokens a split streams: short contexts get fewer splits rather than shorter ones. On
the H100 at (batch 1, context 8192), 128 beat 256 by 10-15 % for int4 / int2 and 64 was slower
again (the fixed cost of a program and of its partial output)."""
FUSED_MERGE_MAX_SPLITS = 5
"""Most splits (ring included) that the last program of a head merges itself; more go to a
second kernel. The fused merge is one warp reading every split's partial output, one split after
the other: on the H100 it cost 1-9 µs at 8-32 splits and 37 µs at 129, where the second kernel
(a program per query row) takes a few µs; at 2-5 splits fusing saved about 1 µs."""

# ----------------------------------------------------------------------------- bit tricks (PTX)
def _byte_codes_asm(bits: int, subtract: bool) -> tl.constexpr:
    """PTX turning 4 bytes (``$<2·per>``, ``per = 8 // bits`` codes a byte) into fp16 codes.

    prmt gives p = [e0, e2, e1, e3] and q = p >> 8 = [e2, e1, e3, 0], so that
    ``(p & mask_i) | 0x6400`` is the fp16 pair (1024 + 2^(bits·i) c_i(e0), ... c_i(e1)) for code
    ``i`` of each byte (mask_i = ``2^bits - 1`` at bit ``bits·i`` of both halves), and q gives it
    for (e2, e3). Output ``i`` is registers ``$2i`` (from p) and ``$2i+1`` (from q). With
    ``subtract``, ``fma(x, 2^-(bits·i), -1024·2^-(bits·i))`` leaves the exact codes; without it
    the outputs stay ``1024 + 2^(bits·i) c`` (keys fold that into the query, see ``_tile``).
    """
    per = 8 // bits
    regs, movs, lops, fmas = ["p", "q"], [], [], []
    for i in range(per):
        mask = ((1 << bits) - 1) << (bits * i)
        lops += [f"lop3.b32 ${2 * i + j}, {src}, 0x{mask << 16 | mask:08X}, 0x64006400, 0xEA;"
                 for j, src in enumerate("pq")]
        if subtract:
            w = 1 << (bits * i)
            sc, nb = ("one", "nb") if w == 1 else (f"s{w}", f"nb{w}")
            regs += [sc, nb]
            movs += [f"mov.b32 {sc}, 0x{_f16_bits(1 / w) * 0x10001:08X};",
                     f"mov.b32 {nb}, 0x{_f16_bits(-1024 / w) * 0x10001:08X};"]
            fmas += [f"fma.rn.f16x2 ${2 * i + j}, ${2 * i + j}, {sc}, {nb};" for j in range(2)]
    lines = ["{", f".reg .b32 {', '.join(regs)};", *movs, f"prmt.b32 p, ${2 * per}, 0, 0x3120;",
             "shr.b32 q, p, 8;", *lops, *fmas, "}"]
    return tl.constexpr("\n" + "\n".join(lines) + "\n")


def _f16_bits(x: float) -> int:
    return struct.unpack("<H", struct.pack("<e", x))[0]


I4_TO_F16 = _byte_codes_asm(4, subtract=True)     # (low nibble, high nibble) as fp16
I2_TO_F16 = _byte_codes_asm(2, subtract=True)     # the four 2-bit codes as fp16
I4_TO_MAGIC = _byte_codes_asm(4, subtract=False)  # keys: 1024 + c, 1024 + 16 c
I2_TO_MAGIC = _byte_codes_asm(2, subtract=False)  # keys: 1024 + 4^i c
# int8 (two's complement): flip the sign bit (u = q + 128), put u into the low byte of the fp16
# 1024.0 (0x64__), subtract 1152 = 1024 + 128: (q0, q1), (q2, q3) exactly.
I8_TO_F16 = tl.constexpr("""
{
.reg .b32 a, base, one, nb;
mov.b32 base, 0x64646464;
mov.b32 one, 0x3C003C00;
mov.b32 nb, 0xE480E480;
xor.b32 a, $2, 0x80808080;
prmt.b32 $0, a, base, 0x4140;
prmt.b32 $1, a, base, 0x4342;
fma.rn.f16x2 $0, $0, one, nb;
fma.rn.f16x2 $1, $1, one, nb;
}
""")
FENCE = tl.constexpr("fence.acq_rel.gpu; mov.b32 $0, 0;")


@triton.jit
def _i4_unpack(byt, MAGIC: tl.constexpr, ASM: tl.constexpr):
    """uint8 bytes -> (low nibble, high nibble) as fp16, elementwise (channels 2x, 2x + 1);
    with ``MAGIC`` (keys) as 1024 + low nibble and 1024 + 16 * high nibble, no fma."""
    if ASM:
        return tl.inline_asm_elementwise(I4_TO_MAGIC if MAGIC else I4_TO_F16, "=r,=r,=r,=r,r",
                                         [byt], dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    else:
        b = byt.to(tl.int32)
        if MAGIC:
            return ((b & 15) + 1024).to(tl.float16), ((b & 0xF0) + 1024).to(tl.float16)
        else:
            return (b & 15).to(tl.float16), (b >> 4).to(tl.float16)


@triton.jit
def _i2_unpack(byt, MAGIC: tl.constexpr, ASM: tl.constexpr):
    """uint8 bytes -> the four 2-bit codes (bits 2i..2i+1 = channel 4x + i) as fp16, elementwise;
    with ``MAGIC`` (keys) as 1024 + 4^i * code i, no fma."""
    if ASM:
        return tl.inline_asm_elementwise(I2_TO_MAGIC if MAGIC else I2_TO_F16,
                                         "=r,=r,=r,=r,=r,=r,=r,=r,r", [byt],
                                         dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
                                         is_pure=True, pack=4)
    else:
        b = byt.to(tl.int32)
        if MAGIC:
            return (((b & 3) + 1024).to(tl.float16), ((b & 0xC) + 1024).to(tl.float16),
                    ((b & 0x30) + 1024).to(tl.float16), ((b & 0xC0) + 1024).to(tl.float16))
        else:
            return ((b & 3).to(tl.float16), ((b >> 2) & 3).to(tl.float16),
                    ((b >> 4) & 3).to(tl.float16), ((b >> 6) & 3).to(tl.float16))


@triton.jit
def _fp8_decode(code):
    """e4m3fn bits -> float32 by hand (the interpreter's fp8 conversion is unreliable)."""
    c = code.to(tl.int32)
    e = (c >> 3) & 0xF
    m = c & 7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    val = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)
    return tl.where((c & 0x80) != 0, -val, val)


@triton.jit
def _byte_values(byt, FMT: tl.constexpr, ASM: tl.constexpr):
    """fp8 e4m3 bits (FMT 1) or int8 codes (FMT 2) -> fp16, exactly, elementwise."""
    if FMT == 1:
        if ASM:
            return byt.to(tl.float8e4nv, bitcast=True).to(tl.float16)
        else:
            return _fp8_decode(byt).to(tl.float16)
    else:
        if ASM:
            return tl.inline_asm_elementwise(I8_TO_F16, "=r,=r,r", [byt], dtype=tl.float16,
                                             is_pure=True, pack=4)
        else:
            return byt.to(tl.float16)


@triton.jit
def _dot(a, b, acc, INTERP: tl.constexpr):
    """``acc + a @ b`` in float32; the interpreter mishandles 16-bit dots, so upcast there."""
    if INTERP:
        return acc + tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


# ----------------------------------------------------------------------------- generic dequantization
@triton.jit
def _unpack(byt, ROWS: tl.constexpr, COLS: tl.constexpr, BITS: tl.constexpr):
    """[ROWS, COLS*BITS/8] int32 bytes -> [ROWS, COLS] int32 codes, channel order restored."""
    if BITS == 4:
        return tl.reshape(tl.join(byt & 0xF, (byt >> 4) & 0xF), (ROWS, COLS))
    else:
        c0 = byt & 3
        c1 = (byt >> 2) & 3
        c2 = (byt >> 4) & 3
        c3 = (byt >> 6) & 3
        return tl.reshape(tl.join(tl.join(c0, c2), tl.join(c1, c3)), (ROWS, COLS))


@triton.jit
def _generic_keys(K, Ks, Km, bh, S, NG, offs_n, nmask, SHIFT: tl.constexpr, D: tl.constexpr,
                  BLOCK_N: tl.constexpr, K_FMT: tl.constexpr, GROUP: tl.constexpr,
                  INTERP: tl.constexpr):
    """Fully dequantized key tile [BLOCK_N, D] in float32, columns rotated by SHIFT (RoPE)."""
    ch = (tl.arange(0, D) + SHIFT) % D
    if K_FMT == 0:
        ptr = K + (bh * S + offs_n)[:, None] * D + ch[None, :]
        return tl.load(ptr, mask=nmask[:, None], other=0.0).to(tl.float32)
    elif K_FMT == 1 or K_FMT == 2:
        code = tl.load(K + (bh * S + offs_n)[:, None] * D + ch[None, :], mask=nmask[:, None], other=0)
        val = _fp8_decode(code) if K_FMT == 1 else code.to(tl.float32)
        return val * tl.load(Ks + bh * S + offs_n, mask=nmask, other=0.0)[:, None]
    else:
        BITS: tl.constexpr = 4 if K_FMT == 3 else 2
        NB: tl.constexpr = D * BITS // 8
        jb = (tl.arange(0, NB) + SHIFT * BITS // 8) % NB
        byt = tl.load(K + (bh * S + offs_n)[:, None] * NB + jb[None, :], mask=nmask[:, None], other=0)
        c = _unpack(byt.to(tl.int32), BLOCK_N, D, BITS).to(tl.float32)
        g = tl.minimum(offs_n // GROUP, NG - 1)
        PER: tl.constexpr = 8 // BITS
        sidx = (bh * NG + g)[:, None] * D + ((ch % PER) * (D // PER) + ch // PER)[None, :]
        sc = tl.load(Ks + sidx, mask=nmask[:, None], other=0.0).to(tl.float32)
        mn = tl.load(Km + sidx, mask=nmask[:, None], other=0.0).to(tl.float32)
        return c * sc + mn


@triton.jit
def _generic_values(V, Vs, Vm, bh, S, offs_n, nmask, D: tl.constexpr, BLOCK_N: tl.constexpr,
                    V_FMT: tl.constexpr, VGROUP: tl.constexpr, TB: tl.constexpr):
    """Fully dequantized value tile [BLOCK_N, D] in float32 (token-blocked codes)."""
    if V_FMT == 1 or V_FMT == 2:
        d = tl.arange(0, D)
        SV8 = (S + TB - 1) // TB * TB
        off = bh * SV8 * D + (offs_n // TB)[:, None] * (TB * D) + d[None, :] * TB + (offs_n % TB)[:, None]
        code = tl.load(V + off, mask=nmask[:, None], other=0)
        val = _fp8_decode(code) if V_FMT == 1 else code.to(tl.float32)
        return val * tl.load(Vs + bh * S + offs_n, mask=nmask, other=0.0)[:, None]
    BITS: tl.constexpr = 4 if V_FMT == 3 else 2
    NB: tl.constexpr = D * BITS // 8
    NGC: tl.constexpr = D // VGROUP
    SV = (S + TB - 1) // TB * TB
    jb = tl.arange(0, NB)
    off = bh * SV * NB + (offs_n // TB)[:, None] * (TB * NB) + jb[None, :] * TB + (offs_n % TB)[:, None]
    byt = tl.load(V + off, mask=nmask[:, None], other=0)
    c = _unpack(byt.to(tl.int32), BLOCK_N, D, BITS).to(tl.float32)
    d = tl.arange(0, D)
    sidx = (bh * S + offs_n)[:, None] * NGC + (d // VGROUP)[None, :]
    sc = tl.load(Vs + sidx, mask=nmask[:, None], other=0.0).to(tl.float32)
    mn = tl.load(Vm + sidx, mask=nmask[:, None], other=0.0).to(tl.float32)
    return c * sc + mn


# ----------------------------------------------------------------------------- query
@triton.jit
def _query(Q, Had, qrow, rmask, cols, D: tl.constexpr, ROTATE: tl.constexpr, INTERP: tl.constexpr):
    """Query rows ``qrow`` at columns ``cols`` in float32, rotated (``q @ H``) when ROTATE.

    ``Had`` holds the ±1 Hadamard matrix in q's dtype: exact products, ``1/sqrt(D)`` applied in
    float32 (one rounding less than rotating in torch and storing q in bf16)."""
    if ROTATE:
        # in chunks of 32 input channels: a whole [D, cols] slice of H would take 128+
        # registers per thread of a one-warp program
        KC: tl.constexpr = 32 if D > 32 else D
        acc = tl.zeros([qrow.shape[0], cols.shape[0]], tl.float32)
        for c in tl.static_range(0, D, KC):
            dk = c + tl.arange(0, KC)
            q = tl.load(Q + qrow[:, None] * D + dk[None, :], mask=rmask[:, None], other=0.0)
            h = tl.load(Had + dk[:, None] * D + cols[None, :])
            acc = _dot(q, h, acc, INTERP)
        return acc * (1.0 / tl.sqrt(D * 1.0))
    else:
        return tl.load(Q + qrow[:, None] * D + cols[None, :], mask=rmask[:, None],
                       other=0.0).to(tl.float32)


# ----------------------------------------------------------------------------- one tile
@triton.jit
def _rescale(upd, m_i, m_new, l_i, am, a0, a1, a2, a3, NACC: tl.constexpr):
    """Scale the running sums of the rows whose maximum moved by ``2^(m_old - m_new)``."""
    alpha = tl.where(upd, tl.exp2(m_i - m_new), 1.0)
    l_i = l_i * alpha
    am = am * alpha
    a0 = a0 * alpha[:, None]
    if NACC >= 2:
        a1 = a1 * alpha[:, None]
    if NACC == 4:
        a2 = a2 * alpha[:, None]
        a3 = a3 * alpha[:, None]
    return l_i, am, a0, a1, a2, a3


@triton.jit
def _tile_vectors(n0, bh, S, NG, Ks, Km, Vm, D: tl.constexpr, BLOCK_N: tl.constexpr,
                  K_FMT: tl.constexpr, V_FMT: tl.constexpr, GROUP: tl.constexpr,
                  KFAST: tl.constexpr, VFAST: tl.constexpr):
    """The small per-tile vectors of tile ``n0``: int4/int2 key scale and minimum slices (one
    group; slice-major storage, so each slice is contiguous) and int4/int2 value minimums.

    The main loop loads them one tile ahead (software prefetch): plain loads that the copy
    pipeline does not take, and that would otherwise expose their latency in every tile. Any
    ``n0`` is safe (the group is clamped, tokens past the cache masked); unused ones are zeros."""
    PER: tl.constexpr = 2 if K_FMT == 3 else 4
    NB: tl.constexpr = D // PER
    x = tl.arange(0, NB)
    if KFAST and K_FMT >= 3:
        g = tl.minimum(n0 // GROUP, NG - 1)
        sb = Ks + (bh * NG + g) * D + x
        mb = Km + (bh * NG + g) * D + x
        s0 = tl.load(sb)
        s1 = tl.load(sb + NB)
        m0 = tl.load(mb)
        m1 = tl.load(mb + NB)
        if PER == 4:
            s2 = tl.load(sb + 2 * NB)
            s3 = tl.load(sb + 3 * NB)
            m2 = tl.load(mb + 2 * NB)
            m3 = tl.load(mb + 3 * NB)
        else:
            s2 = s0
            s3 = s0
            m2 = m0
            m3 = m0
    else:
        s0 = tl.zeros([NB], tl.float16)
        s1 = s0
        s2 = s0
        s3 = s0
        m0 = s0
        m1 = s0
        m2 = s0
        m3 = s0
    if VFAST and V_FMT >= 3:
        offs = n0 + tl.arange(0, BLOCK_N)
        vm = tl.load(Vm + bh * S + offs, mask=offs < S, other=0.0)
    else:
        vm = tl.zeros([BLOCK_N], tl.float16)
    return s0, s1, s2, s3, m0, m1, m2, m3, vm


@triton.jit
def _tile(n0, end, qpos, q0, q1, q2, q3, m_i, l_i, am, a0, a1, a2, a3, bh, S, NG,
          K, Ks, Km, V, Vs, Vm, sm_scale_log2, log2_theta,
          s0, s1, s2, s3, m0, m1, m2, m3, vmv,
          MASKED: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, K_FMT: tl.constexpr,
          V_FMT: tl.constexpr, GROUP: tl.constexpr, VGROUP: tl.constexpr, TB: tl.constexpr,
          PRE_ROPE: tl.constexpr, KFAST: tl.constexpr, VFAST: tl.constexpr, LAZY: tl.constexpr,
          ASM: tl.constexpr, INTERP: tl.constexpr):
    """One BLOCK_N-token tile of the compressed store for all query rows of a KV head.

    ``q0..q3``: the query as the key path wants it (packed keys: ``q[:, i::PER]`` in fp16; else
    ``q0`` is the whole query). ``a0..a3``: value accumulators (packed values: channel
    ``PER*x + i`` in ``a_i[:, x]``; else ``a0``), ``am``: the folded value-minimum term."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    nmask = offs_n < end
    tok = tl.arange(0, BLOCK_N)
    NACC: tl.constexpr = (2 if V_FMT == 3 else 4) if (VFAST and V_FMT >= 3) else 1
    # ------------------------------------------------------------------ logits (log2 units)
    # Each path yields ``t`` and a per-row ``roff`` with logits = t * sm_scale_log2 + roff
    # (sm_scale > 0), so that the maximum and the exponent take one FFMA per element.
    rows_zero = tl.zeros([q0.shape[0]], tl.float32)
    if KFAST and K_FMT >= 3:
        # Packed keys: q_i here is q[:, i::PER] / 2^k_i in fp16, and the codes come out of the
        # asm as 1024 + 2^k_i c (no fma). With A_i = q_i * s_i (key scale, this group):
        #   q·(c*s + m) = sum_i A_i·(1024 + 2^k_i c) - 1024 sum(A_i) + sum_i 2^k_i (q_i·m_i)
        # The two correction terms are small MMAs (every column holds the row's value). int4
        # multiplies q_i by the broadcast minimums; int2 dots q_i * m_i with ones instead (like
        # A_i): its 32-channel broadcast took a shared-memory round trip per tile, while for
        # int4 the ones form spills more (sm_90 SASS, `attention.py --sass`).
        PER: tl.constexpr = 2 if K_FMT == 3 else 4
        NB: tl.constexpr = D // PER
        x = tl.arange(0, NB)
        kptr = K + (bh * S + n0) * NB + tok[:, None] * NB + x[None, :]
        byt = tl.load(kptr, mask=nmask[:, None], other=0) if MASKED else tl.load(kptr)
        zero = tl.zeros([q0.shape[0], BLOCK_N], tl.float32)
        zc = tl.zeros([q0.shape[0], 16], tl.float32)
        ones = tl.full([NB, 16], 1.0, tl.float16)
        A0 = q0 * s0[None, :]
        A1 = q1 * s1[None, :]
        if PER == 2:
            qm0 = _dot(q0, tl.broadcast_to(m0[:, None], (NB, 16)), zc, INTERP)
            qm1 = _dot(q1, tl.broadcast_to(m1[:, None], (NB, 16)), zc, INTERP)
        else:
            qm0 = _dot(q0 * m0[None, :], ones, zc, INTERP)
            qm1 = _dot(q1 * m1[None, :], ones, zc, INTERP)
        sa = _dot(A1, ones, _dot(A0, ones, zc, INTERP), INTERP)
        if PER == 2:
            c0, c1 = _i4_unpack(byt, True, ASM)
            t = _dot(A1, tl.trans(c1), _dot(A0, tl.trans(c0), zero, INTERP), INTERP)
            corr = qm0 + 16.0 * qm1 - 1024.0 * sa
        else:
            c0, c1, c2, c3 = _i2_unpack(byt, True, ASM)
            A2 = q2 * s2[None, :]
            A3 = q3 * s3[None, :]
            qm2 = _dot(q2 * m2[None, :], ones, zc, INTERP)
            qm3 = _dot(q3 * m3[None, :], ones, zc, INTERP)
            sa = _dot(A3, ones, _dot(A2, ones, sa, INTERP), INTERP)
            t = _dot(A1, tl.trans(c1), _dot(A0, tl.trans(c0), zero, INTERP), INTERP)
            t = _dot(A3, tl.trans(c3), _dot(A2, tl.trans(c2), t, INTERP), INTERP)
            corr = qm0 + 4.0 * qm1 + 16.0 * qm2 + 64.0 * qm3 - 1024.0 * sa
        roff = tl.max(corr, 1) * sm_scale_log2
    elif KFAST:
        # fp8 / int8 keys: per-token scale on the logits
        d = tl.arange(0, D)
        kptr = K + (bh * S + n0) * D + tok[:, None] * D + d[None, :]
        if MASKED:
            byt = tl.load(kptr, mask=nmask[:, None], other=0)
            ks = tl.load(Ks + bh * S + offs_n, mask=nmask, other=0.0)
        else:
            byt = tl.load(kptr)
            ks = tl.load(Ks + bh * S + offs_n)
        zero = tl.zeros([q0.shape[0], BLOCK_N], tl.float32)
        t = _dot(q0, tl.trans(_byte_values(byt, K_FMT, ASM)), zero, INTERP) * ks[None, :]
        roff = rows_zero
    elif K_FMT == 0 and not PRE_ROPE:
        d = tl.arange(0, D)
        kptr = K + (bh * S + n0) * D + tok[:, None] * D + d[None, :]
        k = tl.load(kptr, mask=nmask[:, None], other=0.0) if MASKED else tl.load(kptr)
        zero = tl.zeros([q0.shape[0], BLOCK_N], tl.float32)
        t = _dot(q0, tl.trans(k.to(q0.dtype)), zero, INTERP)
        roff = rows_zero
    else:
        # generic: dequantize in float32, RoPE if the cache holds pre-RoPE keys, fp16 operands
        k = _generic_keys(K, Ks, Km, bh, S, NG, offs_n, nmask, 0, D, BLOCK_N, K_FMT, GROUP, INTERP)
        if PRE_ROPE:
            HALF: tl.constexpr = D // 2
            kp = _generic_keys(K, Ks, Km, bh, S, NG, offs_n, nmask, HALF, D, BLOCK_N, K_FMT,
                               GROUP, INTERP)
            d = tl.arange(0, D)
            inv_freq = tl.exp2(-((d % HALF).to(tl.float32) * (2.0 / D)) * log2_theta)
            ang = offs_n.to(tl.float32)[:, None] * inv_freq[None, :]
            sign = tl.where(d < HALF, -1.0, 1.0)
            k = k * tl.cos(ang) + (sign[None, :] * kp) * tl.sin(ang)
        zero = tl.zeros([q0.shape[0], BLOCK_N], tl.float32)
        t = _dot(q0.to(tl.float16), tl.trans(k.to(tl.float16)), zero, INTERP)
        roff = rows_zero
    if MASKED:
        valid = nmask[None, :] & (offs_n[None, :] <= qpos[:, None])
        t = tl.where(valid, t, float("-inf"))
    # ------------------------------------------------------------------ online softmax (base 2)
    # The running maximum only moves when a row's tile maximum exceeds it by TAU: then p <= 2^TAU
    # and most tiles skip the rescale of the accumulators.
    m_tile = tl.max(t, 1) * sm_scale_log2 + roff
    upd = m_tile > m_i + TAU
    m_new = tl.where(upd, m_tile, m_i)
    if LAZY:
        if tl.max(upd.to(tl.int32), 0) > 0:
            l_i, am, a0, a1, a2, a3 = _rescale(upd, m_i, m_new, l_i, am, a0, a1, a2, a3, NACC)
    else:
        l_i, am, a0, a1, a2, a3 = _rescale(upd, m_i, m_new, l_i, am, a0, a1, a2, a3, NACC)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(t * sm_scale_log2 + (roff - m_use)[:, None])
    l_i += tl.sum(p, 1)
    # ------------------------------------------------------------------ p·v
    SV = (S + TB - 1) // TB * TB
    # Token-blocked value codes are masked per block of TB tokens, so that masked loads stay
    # vectorized: a block that starts before ``end`` lies inside the (padded) cache, and its
    # tokens past ``end`` hold finite codes that meet p = 0 (their scales load as 0).
    bmask = (n0 + (tok // TB) * TB) < end
    if VFAST and V_FMT >= 3:
        # int4/int2 values, one scale and minimum per token: p·(c*s + m) = (p*s)·c + p·m
        VPER: tl.constexpr = 2 if V_FMT == 3 else 4
        NBV: tl.constexpr = D // VPER
        xv = tl.arange(0, NBV)
        if MASKED:
            vs = tl.load(Vs + bh * S + offs_n, mask=nmask, other=0.0).to(tl.float32)
        else:
            vs = tl.load(Vs + bh * S + offs_n).to(tl.float32)
        vm = tl.where(nmask, vmv.to(tl.float32), 0.0) if MASKED else vmv.to(tl.float32)
        am += tl.sum(p * vm[None, :], 1)
        p16 = (p * vs[None, :]).to(tl.float16)
        vptr = (V + bh * SV * NBV + n0 * NBV + (tok // TB)[:, None] * (TB * NBV)
                + xv[None, :] * TB + (tok % TB)[:, None])
        vb = tl.load(vptr, mask=bmask[:, None], other=0) if MASKED else tl.load(vptr)
        if VPER == 2:
            c0, c1 = _i4_unpack(vb, False, ASM)
            a0 = _dot(p16, c0, a0, INTERP)
            a1 = _dot(p16, c1, a1, INTERP)
        else:
            c0, c1, c2, c3 = _i2_unpack(vb, False, ASM)
            a0 = _dot(p16, c0, a0, INTERP)
            a1 = _dot(p16, c1, a1, INTERP)
            a2 = _dot(p16, c2, a2, INTERP)
            a3 = _dot(p16, c3, a3, INTERP)
    elif VFAST:
        # fp8 / int8 values: per-token scale on p
        d = tl.arange(0, D)
        vptr = (V + bh * SV * D + n0 * D + (tok // TB)[:, None] * (TB * D) + d[None, :] * TB
                + (tok % TB)[:, None])
        if MASKED:
            vs = tl.load(Vs + bh * S + offs_n, mask=nmask, other=0.0)
            vb = tl.load(vptr, mask=bmask[:, None], other=0)
        else:
            vs = tl.load(Vs + bh * S + offs_n)
            vb = tl.load(vptr)
        p16 = (p * vs[None, :]).to(tl.float16)
        a0 = _dot(p16, _byte_values(vb, V_FMT, ASM), a0, INTERP)
    elif V_FMT == 0:
        d = tl.arange(0, D)
        vptr = V + (bh * S + n0) * D + tok[:, None] * D + d[None, :]
        v = tl.load(vptr, mask=nmask[:, None], other=0.0) if MASKED else tl.load(vptr)
        a0 = _dot(p, v.to(tl.float32), a0, INTERP) if INTERP else _dot(p.to(v.dtype), v, a0, INTERP)
    else:
        v = _generic_values(V, Vs, Vm, bh, S, offs_n, nmask, D, BLOCK_N, V_FMT, VGROUP, TB)
        a0 = _dot(p.to(tl.float16), v.to(tl.float16), a0, INTERP)
    return m_new, l_i, am, a0, a1, a2, a3


@triton.jit
def _ring_tile(n0, L, QL, qpos, q, m_i, l_i, acc, bh, Kres, Vres, sm_scale_log2, log2_theta,
               D: tl.constexpr, BLOCK_N: tl.constexpr, R: tl.constexpr, PRE_ROPE: tl.constexpr,
               INTERP: tl.constexpr):
    """One tile of the bf16 residual ring (tokens [QL, L), slot = token - QL), always masked."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    nmask = offs_n < L
    d = tl.arange(0, D)
    slot = (bh * R + offs_n - QL)[:, None] * D
    k = tl.load(Kres + slot + d[None, :], mask=nmask[:, None], other=0.0)
    v = tl.load(Vres + slot + d[None, :], mask=nmask[:, None], other=0.0)
    zero = tl.zeros([q.shape[0], BLOCK_N], tl.float32)
    if PRE_ROPE:
        # RoPE (rotate-half) at the key's position; the partner channel is d +- D/2
        HALF: tl.constexpr = D // 2
        kp = tl.load(Kres + slot + ((d + HALF) % D)[None, :], mask=nmask[:, None], other=0.0)
        inv_freq = tl.exp2(-((d % HALF).to(tl.float32) * (2.0 / D)) * log2_theta)
        ang = offs_n.to(tl.float32)[:, None] * inv_freq[None, :]
        sign = tl.where(d < HALF, -1.0, 1.0)
        kr = k.to(tl.float32) * tl.cos(ang) + (sign[None, :] * kp.to(tl.float32)) * tl.sin(ang)
        s = _dot(q.to(tl.float16), tl.trans(kr.to(tl.float16)), zero, INTERP)
    elif INTERP:
        s = _dot(q, tl.trans(k.to(tl.float32)), zero, INTERP)
    else:
        s = _dot(q.to(k.dtype), tl.trans(k), zero, INTERP)
    s = s * sm_scale_log2
    valid = nmask[None, :] & (offs_n[None, :] <= qpos[:, None])
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if INTERP:
        acc = _dot(p, v.to(tl.float32), acc * alpha[:, None], INTERP)
    else:
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], INTERP)
    return m_new, l_i, acc


@triton.jit
def _store_part(Opart, part, rmask, a, am, inv, cols, D: tl.constexpr):
    """Columns ``cols`` of a split's normalized partial output ``(a + am) * inv``."""
    o = (a + am[:, None]) * inv[:, None]
    tl.store(Opart + part[:, None] * D + cols[None, :], o, mask=rmask[:, None])


@triton.jit
def _merge(Opart, Lpart, Out, qrow, rmask, NS_TOTAL, D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Merge the splits of the query rows ``qrow`` through their log-sum-exps (base 2)."""
    d = tl.arange(0, D)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    w = tl.zeros([BLOCK_M], tl.float32)
    o = tl.zeros([BLOCK_M, D], tl.float32)
    for sp in range(0, NS_TOTAL):
        part = qrow * NS_TOTAL + sp
        lse = tl.load(Lpart + part, mask=rmask, other=float("-inf"), cache_modifier=".cg")
        op = tl.load(Opart + part[:, None] * D + d[None, :], mask=rmask[:, None], other=0.0,
                     cache_modifier=".cg")
        m_new = tl.maximum(m, lse)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        a = tl.exp2(m - m_use)
        e = tl.exp2(lse - m_use)
        w = w * a + e
        o = o * a[:, None] + op * e[:, None]
        m = m_new
    o = o / tl.where(w > 0, w, 1.0)[:, None]
    tl.store(Out + qrow[:, None] * D + d[None, :], o.to(Out.dtype.element_ty), mask=rmask[:, None])


# ----------------------------------------------------------------------------- kernels
# Split counts vary with the shape, and a layer's row of lengths / tickets with the layer index:
# not specializing on them (== 1, % 16, 16-byte alignment) avoids recompiles.
@triton.jit(do_not_specialize=["HKV", "NG", "NUM_SPLITS", "NS_TOTAL"],
            do_not_specialize_on_alignment=["Lengths", "Tickets"])
def _decode_kernel(
    Q, Had, Opart, Lpart, Out, Tickets, Lengths,
    K, Ks, Km, V, Vs, Vm, Kres, Vres,
    sm_scale_log2, log2_theta,
    HKV, S, NG, NUM_SPLITS, NS_TOTAL, CHUNK, T,
    GQA: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    K_FMT: tl.constexpr, V_FMT: tl.constexpr, GROUP: tl.constexpr, VGROUP: tl.constexpr,
    R: tl.constexpr, TB: tl.constexpr, PRE_ROPE: tl.constexpr, ROTATE: tl.constexpr,
    KFAST: tl.constexpr, VFAST: tl.constexpr, FUSED: tl.constexpr, LAZY: tl.constexpr,
    ASM: tl.constexpr, INTERP: tl.constexpr, ITERS: tl.constexpr, RES_ITERS: tl.constexpr,
):
    """Split ``program_id(1)`` of (batch row, KV head) ``program_id(0)``; see the module docstring."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // HKV
    L = tl.load(Lengths + b)
    QL = (L // R) * R          # tokens in the compressed store, the rest in the ring (R=1: all)
    # Query rows (head in group, token) of this KV head; q is [B, Hq, T, D] contiguous.
    rows = tl.arange(0, BLOCK_M)
    rmask = rows < GQA * T
    qrow = bh * GQA * T + rows
    qpos = L - T + rows % T
    part = qrow * NS_TOTAL + split
    d = tl.arange(0, D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    if split >= NUM_SPLITS:
        # ---------------------------------------------------------------- the bf16 residual ring
        RING_N: tl.constexpr = 16 if BLOCK_N > 16 else BLOCK_N   # few tokens: keep registers low
        q = _query(Q, Had, qrow, rmask, d, D, ROTATE, INTERP)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        # R == 1 (no ring): this branch never runs, and Kres / Vres are placeholder pointers of
        # another dtype, so the ring code must not even be compiled.
        if R > 1:
            if INTERP:
                for it in range(0, RES_ITERS):
                    n0 = QL + it * RING_N
                    if n0 < L:
                        m_i, l_i, acc = _ring_tile(n0, L, QL, qpos, q, m_i, l_i, acc, bh, Kres, Vres,
                                                   sm_scale_log2, log2_theta, D, RING_N, R,
                                                   PRE_ROPE, INTERP)
            else:
                for n0 in range(QL, L, RING_N):
                    m_i, l_i, acc = _ring_tile(n0, L, QL, qpos, q, m_i, l_i, acc, bh, Kres, Vres,
                                               sm_scale_log2, log2_theta, D, RING_N, R,
                                               PRE_ROPE, INTERP)
        has = l_i > 0
        inv = 1.0 / tl.where(has, l_i, 1.0)
        _store_part(Opart, part, rmask, acc, tl.zeros([BLOCK_M], tl.float32), inv, d, D)
    else:
        # ---------------------------------------------------------------- the compressed store
        start = split * CHUNK
        end = tl.minimum(start + CHUNK, QL)
        # tiles before full_end need no mask: in range, and every query row sees every token
        full_end = start + tl.maximum(tl.minimum(end, L - T + 1) - start, 0) // BLOCK_N * BLOCK_N
        if KFAST and K_FMT >= 3:
            PER: tl.constexpr = 2 if K_FMT == 3 else 4
            # slice i meets codes 1024 + 2^k_i c (k_i = 4i for int4, 2i for int2): q / 2^k_i
            x = tl.arange(0, D // PER)
            q0 = _query(Q, Had, qrow, rmask, PER * x, D, ROTATE, INTERP).to(tl.float16)
            if PER == 2:
                q1 = (_query(Q, Had, qrow, rmask, 2 * x + 1, D, ROTATE, INTERP) * 0.0625).to(tl.float16)
            else:
                q1 = (_query(Q, Had, qrow, rmask, 4 * x + 1, D, ROTATE, INTERP) * 0.25).to(tl.float16)
            if PER == 4:
                q2 = (_query(Q, Had, qrow, rmask, 4 * x + 2, D, ROTATE, INTERP) * 0.0625).to(tl.float16)
                q3 = (_query(Q, Had, qrow, rmask, 4 * x + 3, D, ROTATE, INTERP) * 0.015625).to(tl.float16)
            else:
                q2 = q0
                q3 = q1
        else:
            q0 = _query(Q, Had, qrow, rmask, d, D, ROTATE, INTERP)
            if KFAST:
                q0 = q0.to(tl.float16)
            elif K_FMT == 0 and not PRE_ROPE and not INTERP:
                q0 = q0.to(K.dtype.element_ty)
            q1 = q0
            q2 = q0
            q3 = q0
        am = tl.zeros([BLOCK_M], tl.float32)
        if VFAST and V_FMT >= 3:
            VPER: tl.constexpr = 2 if V_FMT == 3 else 4
            a0 = tl.zeros([BLOCK_M, D // VPER], tl.float32)
            a1 = tl.zeros([BLOCK_M, D // VPER], tl.float32)
            a2 = tl.zeros([BLOCK_M, D // VPER], tl.float32)
            a3 = tl.zeros([BLOCK_M, D // VPER], tl.float32)
        else:
            a0 = tl.zeros([BLOCK_M, D], tl.float32)
            a1 = tl.zeros([BLOCK_M, 16], tl.float32)
            a2 = tl.zeros([BLOCK_M, 16], tl.float32)
            a3 = tl.zeros([BLOCK_M, 16], tl.float32)
        if INTERP:
            # The interpreter cannot bound a loop by a loaded scalar (numpy >= 2.4): fixed trip
            # counts, tiles past the bounds skipped.
            for it in range(0, ITERS):
                n0 = start + it * BLOCK_N
                if n0 < full_end:
                    s0, s1, s2, s3, m0, m1, m2, m3, vm = _tile_vectors(
                        n0, bh, S, NG, Ks, Km, Vm, D, BLOCK_N, K_FMT, V_FMT, GROUP, KFAST, VFAST)
                    m_i, l_i, am, a0, a1, a2, a3 = _tile(
                        n0, end, qpos, q0, q1, q2, q3, m_i, l_i, am, a0, a1, a2, a3, bh, S, NG,
                        K, Ks, Km, V, Vs, Vm, sm_scale_log2, log2_theta,
                        s0, s1, s2, s3, m0, m1, m2, m3, vm, False, D, BLOCK_N, K_FMT,
                        V_FMT, GROUP, VGROUP, TB, PRE_ROPE, KFAST, VFAST, LAZY, ASM, INTERP)
            for it in range(0, 2):
                n0 = full_end + it * BLOCK_N
                if n0 < end:
                    s0, s1, s2, s3, m0, m1, m2, m3, vm = _tile_vectors(
                        n0, bh, S, NG, Ks, Km, Vm, D, BLOCK_N, K_FMT, V_FMT, GROUP, KFAST, VFAST)
                    m_i, l_i, am, a0, a1, a2, a3 = _tile(
                        n0, end, qpos, q0, q1, q2, q3, m_i, l_i, am, a0, a1, a2, a3, bh, S, NG,
                        K, Ks, Km, V, Vs, Vm, sm_scale_log2, log2_theta,
                        s0, s1, s2, s3, m0, m1, m2, m3, vm, True, D, BLOCK_N, K_FMT,
                        V_FMT, GROUP, VGROUP, TB, PRE_ROPE, KFAST, VFAST, LAZY, ASM, INTERP)
        else:
            # full tiles, each with the next tile's small vectors prefetched
            n0 = start
            p0, p1, p2, p3, r0, r1, r2, r3, pv = _tile_vectors(
                n0, bh, S, NG, Ks, Km, Vm, D, BLOCK_N, K_FMT, V_FMT, GROUP, KFAST, VFAST)
            for n0 in range(start, full_end, BLOCK_N):
                s0, s1, s2, s3, m0, m1, m2, m3, vm = p0, p1, p2, p3, r0, r1, r2, r3, pv
                p0, p1, p2, p3, r0, r1, r2, r3, pv = _tile_vectors(
                    n0 + BLOCK_N, bh, S, NG, Ks, Km, Vm, D, BLOCK_N, K_FMT, V_FMT, GROUP,
                    KFAST, VFAST)
                m_i, l_i, am, a0, a1, a2, a3 = _tile(
                    n0, end, qpos, q0, q1, q2, q3, m_i, l_i, am, a0, a1, a2, a3, bh, S, NG,
                    K, Ks, Km, V, Vs, Vm, sm_scale_log2, log2_theta,
                    s0, s1, s2, s3, m0, m1, m2, m3, vm, False, D, BLOCK_N, K_FMT,
                    V_FMT, GROUP, VGROUP, TB, PRE_ROPE, KFAST, VFAST, LAZY, ASM, INTERP)
            # at most two tiles: the partial last one and those the last T-1 tokens reach
            for n0 in range(full_end, end, BLOCK_N):
                s0, s1, s2, s3, m0, m1, m2, m3, vm = _tile_vectors(
                    n0, bh, S, NG, Ks, Km, Vm, D, BLOCK_N, K_FMT, V_FMT, GROUP, KFAST, VFAST)
                m_i, l_i, am, a0, a1, a2, a3 = _tile(
                    n0, end, qpos, q0, q1, q2, q3, m_i, l_i, am, a0, a1, a2, a3, bh, S, NG,
                    K, Ks, Km, V, Vs, Vm, sm_scale_log2, log2_theta,
                    s0, s1, s2, s3, m0, m1, m2, m3, vm, True, D, BLOCK_N, K_FMT,
                    V_FMT, GROUP, VGROUP, TB, PRE_ROPE, KFAST, VFAST, LAZY, ASM, INTERP)
        has = l_i > 0
        inv = 1.0 / tl.where(has, l_i, 1.0)
        if VFAST and V_FMT >= 3:
            VP: tl.constexpr = 2 if V_FMT == 3 else 4
            xv = tl.arange(0, D // VP)
            _store_part(Opart, part, rmask, a0, am, inv, VP * xv, D)
            _store_part(Opart, part, rmask, a1, am, inv, VP * xv + 1, D)
            if VP == 4:
                _store_part(Opart, part, rmask, a2, am, inv, VP * xv + 2, D)
                _store_part(Opart, part, rmask, a3, am, inv, VP * xv + 3, D)
        else:
            _store_part(Opart, part, rmask, a0, am, inv, d, D)
    has = l_i > 0
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(Lpart + part, lse, mask=rmask)
    if FUSED:
        # The last split of this head to finish merges them all (its ticket says so).
        if ASM:
            tl.inline_asm_elementwise(FENCE, "=r,r", [rows], dtype=tl.int32, is_pure=False, pack=1)
        tl.debug_barrier()
        ticket = tl.atomic_add(Tickets + bh, 1, sem="acq_rel")
        if ticket == NS_TOTAL - 1:
            _merge(Opart, Lpart, Out, qrow, rmask, NS_TOTAL, D, BLOCK_M)
            tl.atomic_xchg(Tickets + bh, 0)   # ready for the next call


@triton.jit
def _decode_reduce_kernel(Opart, Lpart, Out, NS_TOTAL, D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Merge the splits of one query row (when not fused): weights 2^(lse - max).

    Two passes over chunks of ``BLOCK_S`` splits (the maximum, then the weighted sum), so any
    number of splits merges with ``BLOCK_S * D / threads`` registers and every chunk's loads in
    flight at once; many rows run in parallel (the fused merge has one warp per KV head).
    """
    row = tl.program_id(0)
    sp = tl.arange(0, BLOCK_S)
    d = tl.arange(0, D)
    m = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for s0 in range(0, NS_TOTAL, BLOCK_S):
        lse = tl.load(Lpart + row * NS_TOTAL + s0 + sp, mask=s0 + sp < NS_TOTAL, other=float("-inf"))
        m = tl.maximum(m, lse)
    mx = tl.max(m, axis=0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    total = tl.zeros([BLOCK_S], tl.float32)
    acc = tl.zeros([BLOCK_S, D], tl.float32)
    for s0 in range(0, NS_TOTAL, BLOCK_S):
        smask = s0 + sp < NS_TOTAL
        w = tl.exp2(tl.load(Lpart + row * NS_TOTAL + s0 + sp, mask=smask, other=float("-inf")) - mx)
        o = tl.load(Opart + (row * NS_TOTAL + s0 + sp)[:, None] * D + d[None, :],
                    mask=smask[:, None], other=0.0)
        total += w
        acc += w[:, None] * o
    t = tl.sum(total, axis=0)
    out = tl.sum(acc, axis=0) / tl.where(t > 0, t, 1.0)
    tl.store(Out + row * D + d, out.to(Out.dtype.element_ty))


# ----------------------------------------------------------------------------- host side
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def launch_config(spec, head_dim: int, batch: int, num_kv_heads: int, length: int,
                  sm_count: int, interp: bool = False, unpack: str = "auto") -> dict:
    """Default launch configuration: ``block_n``, ``num_warps``, ``num_stages``, ``num_splits``.

    When keys and values both take the fast (compressed) paths, one warp per program and many
    programs (``ONE_WARP_TUNING``; each with >= ``MIN_SPLIT_TOKENS`` tokens; see the module
    docstring). Otherwise (a bf16 side, or a generic path: a 16-bit or
    float32 tile needs the registers of 4 warps) the previous kernel's 4 warps.
    int4/int2 key tiles stay inside one key group.
    """
    sixteen_bit = spec.key_format == "bf16" and spec.value_format == "bf16"
    block_n = 32 if interp or spec.pre_rope or sixteen_bit or spec.rotate_keys else 64
    if spec.grouped_keys and not spec.pre_rope:
        block_n = max(16, min(block_n, spec.group_size))
    kfast, vfast = kernel_paths(spec, head_dim, block_n, unpack)
    if kfast and vfast:
        num_warps = 1
        num_stages, per_sm = (3, 8) if spec.rotate_keys else ONE_WARP_TUNING.get(spec.key_format, (3, 8))
    else:
        num_warps, num_stages, per_sm = 4, (3 if spec.key_format == "bf16" else 2), (2 if sixteen_bit else 4)
    heads = batch * num_kv_heads
    # whole programs per head that fit the target (the interpreter: a few splits, to test merging)
    wanted = triton.cdiv(3, heads) if interp else sm_count * per_sm // heads
    splits = max(1, min(wanted, triton.cdiv(length, max(MIN_SPLIT_TOKENS, block_n))))
    return dict(block_n=block_n, num_warps=num_warps, num_stages=num_stages, num_splits=splits)


def split_tokens(length: int, num_splits: int, block_n: int) -> tuple[int, int]:
    """(tokens per split, splits actually launched): splits hold whole tiles, so asking for
    ``num_splits`` may launch fewer (131072 tokens in 132 splits of 64-token tiles: 128)."""
    chunk = triton.cdiv(triton.cdiv(length, num_splits), block_n) * block_n
    return chunk, triton.cdiv(length, chunk)


def fuses_merge(spec, num_splits: int) -> bool:
    """Whether ``num_splits`` splits (plus the ring's, for int4/int2 keys) merge in the kernel by
    default, rather than in the second kernel (``FUSED_MERGE_MAX_SPLITS``)."""
    return num_splits + (1 if spec.grouped_keys else 0) <= FUSED_MERGE_MAX_SPLITS


def kernel_paths(spec, head_dim: int, block_n: int, unpack: str = "auto") -> tuple[bool, bool]:
    """Whether keys and values take the fast paths (bit-trick dequantization, scales folded) or
    the generic one (dequantize the tile in float32): pre-RoPE keys, int4/int2 key groups smaller
    than a tile, value groups smaller than the head and code slices narrower than 16 (one MMA
    step: int4 needs D >= 32, int2 D >= 64) are generic; bf16 has no dequantization."""
    kf, vf = FMT_CODES[spec.key_format], FMT_CODES[spec.value_format]
    kper, vper = (2 if kf == 3 else 4), (2 if vf == 3 else 4)
    fast = unpack == "auto"
    fold = spec.grouped_keys and not spec.pre_rope and spec.group_size % block_n == 0
    kfast = fast and ((kf in (1, 2) and not spec.pre_rope)
                      or (kf >= 3 and fold and head_dim // kper >= 16))
    vfast = fast and (vf in (1, 2) or (vf >= 3 and spec.vgroup(head_dim) == head_dim
                                       and head_dim // vper >= 16))
    return kfast, vfast


def decode_attention(q: torch.Tensor, cache, layer: int, *, sm_scale: float | None = None,
                     impl: str = "auto", num_splits: int | None = None,
                     block_n: int | None = None, num_warps: int | None = None,
                     num_stages: int | None = None, out: torch.Tensor | None = None,
                     unpack: str = "auto", fused_reduce: bool | None = None,
                     maxnreg: int | None = None) -> torch.Tensor:
    """Attention of ``T`` new query tokens per row over ``cache``'s ``layer``.

    ``q``: ``[B, Hq, D]`` (one token) or ``[B, Hq, T, D]`` with ``T <= 8``, already RoPE'd; the
    ``T`` tokens' keys and values must already be appended (query ``t`` sits at position
    ``length - T + t`` and sees keys up to it). ``Hq`` must be a multiple of the cache's KV heads.
    Returns the shape of ``q``, in ``q``'s dtype. ``impl``: ``auto`` (Triton on CUDA, torch on
    CPU), ``triton`` (also on CPU under ``TRITON_INTERPRET=1``) or ``torch``.
    ``out`` (shaped and typed like ``q``, contiguous) receives the result if given.
    The remaining keyword arguments override the launch heuristics (benchmarks, tests):
    ``unpack="generic"`` forces the dequantize-everything path (a baseline); ``fused_reduce``
    picks where the splits merge: in the last program of each head (``True``, one launch) or in
    a second kernel with a program per query row (``False``); ``None`` (default) fuses up to
    ``FUSED_MERGE_MAX_SPLITS`` splits, since the fused merge is one warp reading every split.
    ``maxnreg`` caps the registers of a thread (more programs per SM, at the price of spills).
    """
    from qcompile.codegen.attention.reference import reference_decode_attention
    from qcompile.runtime.kv_cache import resolve_impl

    squeeze = q.dim() == 3
    q4 = q.unsqueeze(2) if squeeze else q
    if q4.dim() != 4:
        raise ValueError(f"q must be [B, Hq, D] or [B, Hq, T, D], got shape {tuple(q.shape)}")
    B, Hq, T, D = q4.shape
    Hkv = cache.num_kv_heads
    if cache.batch != B or cache.head_dim != D or Hq % Hkv != 0:
        raise ValueError(f"q shape {tuple(q.shape)} does not fit the cache (batch={cache.batch}, "
                         f"num_kv_heads={Hkv}, head_dim={cache.head_dim}; Hq must be a multiple "
                         f"of num_kv_heads)")
    if not 1 <= T <= MAX_QUERY_TOKENS:
        raise ValueError(f"decode_attention takes 1..{MAX_QUERY_TOKENS} query tokens, got {T}; "
                         "use prefill_attention for longer blocks")
    if q4.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"q must be bfloat16 or float16, got {q4.dtype}")
    if unpack not in UNPACK_MODES:
        raise ValueError(f"unknown unpack {unpack!r}; valid: {', '.join(UNPACK_MODES)}")
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    if not sm_scale > 0:
        raise ValueError(f"sm_scale must be > 0, got {sm_scale}")
    if resolve_impl(impl, q4.device) == "torch":
        res = reference_decode_attention(q4, cache, layer, sm_scale=sm_scale,
                                         dtype=torch.float32).to(q4.dtype)
        res = res.squeeze(2) if squeeze else res
        if out is not None:
            out.copy_(res)
            return out
        return res

    spec = cache.spec
    q4 = q4.contiguous()
    GQA = Hq // Hkv
    BLOCK_M = max(16, triton.next_power_of_2(GQA * T))
    interp = _interpreting() or q4.device.type != "cuda"
    bound = max(cache.max_length_bound(layer), 1)
    cfg = launch_config(spec, D, B, Hkv, bound, _sm_count(q4.device), interp, unpack)
    block_n = block_n or cfg["block_n"]
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    G = spec.group_size
    kf, vf = FMT_CODES[spec.key_format], FMT_CODES[spec.value_format]
    kfast, vfast = kernel_paths(spec, D, block_n, unpack)
    chunk, num_splits = split_tokens(bound, num_splits or cfg["num_splits"], block_n)
    ns_total = num_splits + (1 if spec.grouped_keys else 0)
    if fused_reduce is None:
        fused_reduce = fuses_merge(spec, num_splits)
    R = spec.residual_length if spec.grouped_keys else 1

    t = cache.layer_tensors(layer)
    dummy = cache.lengths
    ptrs = [t[n] if t[n] is not None else dummy
            for n in ("k", "k_scale", "k_min", "v", "v_scale", "v_min", "k_res", "v_res")]
    had = hadamard_signs(D, q4.dtype, q4.device) if spec.rotate_keys else dummy
    opart = torch.empty(B * Hq * T, ns_total, D, dtype=torch.float32, device=q4.device)
    lpart = torch.empty(B * Hq * T, ns_total, dtype=torch.float32, device=q4.device)
    if out is not None:
        if out.shape != q.shape or out.dtype != q.dtype or not out.is_contiguous():
            raise ValueError("out must be contiguous, with q's shape and dtype")
        result = out.view(q4.shape)
    else:
        result = torch.empty_like(q4)
    tickets = cache.tickets[layer] if fused_reduce else dummy
    _decode_kernel[(B * Hkv, ns_total)](
        q4, had, opart, lpart, result, tickets, cache.lengths[layer], *ptrs,
        sm_scale * 1.4426950408889634, math.log2(spec.rope_theta),
        Hkv, cache.max_seq_len, cache.max_seq_len // G, num_splits, ns_total, chunk, T,
        GQA=GQA, D=D, BLOCK_M=BLOCK_M, BLOCK_N=block_n, K_FMT=kf, V_FMT=vf,
        GROUP=G, VGROUP=spec.vgroup(D), R=R, TB=VALUE_TOKEN_BLOCK,
        PRE_ROPE=spec.pre_rope, ROTATE=spec.rotate_keys, KFAST=kfast, VFAST=vfast,
        FUSED=fused_reduce, LAZY=not interp, ASM=not interp, INTERP=interp,
        ITERS=triton.cdiv(chunk, block_n) if interp else 0,
        RES_ITERS=triton.cdiv(R, 16) if interp else 0,
        num_warps=num_warps or cfg["num_warps"], num_stages=num_stages or cfg["num_stages"],
        **({"maxnreg": maxnreg} if maxnreg else {}))
    if not fused_reduce:
        _decode_reduce_kernel[(B * Hq * T,)](
            opart, lpart, result, ns_total, D=D,
            BLOCK_S=min(triton.next_power_of_2(ns_total), max(1, 4096 // D)), num_warps=4)
    if out is not None:
        return out
    return result.squeeze(2) if squeeze else result
