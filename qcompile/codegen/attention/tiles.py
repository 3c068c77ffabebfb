"""Device functions of decode attention: the query, key and value tiles of the compressed store,
the online-softmax step over one tile, the bf16 residual ring's tile and the split merge.

Names used throughout (see ``decode.py`` for the kernel that calls these):

- ``q``: the query as the key path wants it, four tensors ``(q0, q1, q2, q3)``: packed keys
  (int4/int2, fast path) meet ``q[:, i::PER] / 2^k_i`` in fp16 (``q_i``); else ``q0`` is the
  whole query and ``q1..q3`` are unused copies.
- ``state``: the running softmax of the query rows, ``(m_i, l_i, am, a0, a1, a2, a3)``: maximum
  and sum (log2 units), the folded value-minimum term, and the value accumulators (packed values:
  channel ``PER*x + i`` in ``a_i[:, x]``; else ``a0``).
- ``vec``: a tile's small vectors, ``(s0, s1, s2, s3, m0, m1, m2, m3, vm)`` (:func:`tile_vectors`).
- ``bh``: the program's (batch row, KV head); ``S``: max_seq_len; ``NG``: key groups per head.
- Pointers ``K, Ks, Km`` (key codes, scales, minimums), ``V, Vs, Vm`` (values); layouts in
  ``qcompile.formats.kv``. Formats are ``kernel_codes.KV_*``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from qcompile.codegen.attention import bits
from qcompile.codegen.triton_env import dot
from qcompile.formats import kernel_codes

TAU = tl.constexpr(8.0)
"""Lazy rescaling threshold (log2 units): probabilities may reach 2**TAU before a rescale."""
KV_BF16 = tl.constexpr(kernel_codes.KV_BF16)
KV_FP8 = tl.constexpr(kernel_codes.KV_FP8)
KV_INT4 = tl.constexpr(kernel_codes.KV_INT4)
kv_grouped = triton.constexpr_function(kernel_codes.kv_grouped)
kv_per_token = triton.constexpr_function(kernel_codes.kv_per_token)


# ----------------------------------------------------------------------------- generic dequantization
@triton.jit
def generic_keys(K, Ks, Km, bh, S, NG, offs_n, nmask, SHIFT: tl.constexpr, D: tl.constexpr,
                 BLOCK_N: tl.constexpr, K_FMT: tl.constexpr, GROUP: tl.constexpr):
    """Fully dequantized key tile [BLOCK_N, D] in float32, columns rotated by SHIFT (RoPE)."""
    ch = (tl.arange(0, D) + SHIFT) % D
    if K_FMT == KV_BF16:
        ptr = K + (bh * S + offs_n)[:, None] * D + ch[None, :]
        return tl.load(ptr, mask=nmask[:, None], other=0.0).to(tl.float32)
    elif kv_per_token(K_FMT):
        code = tl.load(K + (bh * S + offs_n)[:, None] * D + ch[None, :], mask=nmask[:, None], other=0)
        val = bits.fp8_decode(code) if K_FMT == KV_FP8 else code.to(tl.float32)
        return val * tl.load(Ks + bh * S + offs_n, mask=nmask, other=0.0)[:, None]
    else:
        BITS: tl.constexpr = 4 if K_FMT == KV_INT4 else 2
        NB: tl.constexpr = D * BITS // 8
        PER: tl.constexpr = 8 // BITS
        byt = tl.load(K + (bh * S + offs_n)[:, None] * NB + (ch // PER)[None, :], mask=nmask[:, None], other=0)
        c = bits.channel_codes(byt, ch, BITS).to(tl.float32)
        g = tl.minimum(offs_n // GROUP, NG - 1)
        sidx = (bh * NG + g)[:, None] * D + ((ch % PER) * (D // PER) + ch // PER)[None, :]
        sc = tl.load(Ks + sidx, mask=nmask[:, None], other=0.0).to(tl.float32)
        mn = tl.load(Km + sidx, mask=nmask[:, None], other=0.0).to(tl.float32)
        return c * sc + mn


@triton.jit
def generic_values(V, Vs, Vm, bh, S, offs_n, nmask, D: tl.constexpr, BLOCK_N: tl.constexpr,
                   V_FMT: tl.constexpr, VGROUP: tl.constexpr, TB: tl.constexpr):
    """Fully dequantized value tile [BLOCK_N, D] in float32 (token-blocked codes)."""
    if kv_per_token(V_FMT):
        d = tl.arange(0, D)
        SV8 = (S + TB - 1) // TB * TB
        off = bh * SV8 * D + (offs_n // TB)[:, None] * (TB * D) + d[None, :] * TB + (offs_n % TB)[:, None]
        code = tl.load(V + off, mask=nmask[:, None], other=0)
        val = bits.fp8_decode(code) if V_FMT == KV_FP8 else code.to(tl.float32)
        return val * tl.load(Vs + bh * S + offs_n, mask=nmask, other=0.0)[:, None]
    BITS: tl.constexpr = 4 if V_FMT == KV_INT4 else 2
    NB: tl.constexpr = D * BITS // 8
    NGC: tl.constexpr = D // VGROUP
    SV = (S + TB - 1) // TB * TB
    d = tl.arange(0, D)
    jb = d // (8 // BITS)
    off = bh * SV * NB + (offs_n // TB)[:, None] * (TB * NB) + jb[None, :] * TB + (offs_n % TB)[:, None]
    byt = tl.load(V + off, mask=nmask[:, None], other=0)
    c = bits.channel_codes(byt, d, BITS).to(tl.float32)
    sidx = (bh * S + offs_n)[:, None] * NGC + (d // VGROUP)[None, :]
    sc = tl.load(Vs + sidx, mask=nmask[:, None], other=0.0).to(tl.float32)
    mn = tl.load(Vm + sidx, mask=nmask[:, None], other=0.0).to(tl.float32)
    return c * sc + mn


# ----------------------------------------------------------------------------- query
@triton.jit
def query_columns(Q, Had, qrow, rmask, cols, D: tl.constexpr, ROTATE: tl.constexpr, INTERP: tl.constexpr):
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
            acc = dot(q, h, acc, INTERP)
        return acc * (1.0 / tl.sqrt(D * 1.0))
    else:
        return tl.load(Q + qrow[:, None] * D + cols[None, :], mask=rmask[:, None],
                       other=0.0).to(tl.float32)


@triton.jit
def query_slices(Q, Had, K, qrow, rmask, D: tl.constexpr, K_FMT: tl.constexpr, PRE_ROPE: tl.constexpr,
                 ROTATE: tl.constexpr, KFAST: tl.constexpr, INTERP: tl.constexpr):
    """``q`` (see the module docstring) for the compressed store's key path (``K``: the key
    codes, whose dtype a bf16 cache's query takes). Packed keys: slice
    ``i`` meets codes ``1024 + 2^k_i c`` (``k_i`` = 4i for int4, 2i for int2), so it is
    ``q[:, i::PER] / 2^k_i`` in fp16."""
    if KFAST and kv_grouped(K_FMT):
        PER: tl.constexpr = 2 if K_FMT == KV_INT4 else 4
        x = tl.arange(0, D // PER)
        q0 = query_columns(Q, Had, qrow, rmask, PER * x, D, ROTATE, INTERP).to(tl.float16)
        if PER == 2:
            q1 = (query_columns(Q, Had, qrow, rmask, 2 * x + 1, D, ROTATE, INTERP) * 0.0625).to(tl.float16)
        else:
            q1 = (query_columns(Q, Had, qrow, rmask, 4 * x + 1, D, ROTATE, INTERP) * 0.25).to(tl.float16)
        if PER == 4:
            q2 = (query_columns(Q, Had, qrow, rmask, 4 * x + 2, D, ROTATE, INTERP) * 0.0625).to(tl.float16)
            q3 = (query_columns(Q, Had, qrow, rmask, 4 * x + 3, D, ROTATE, INTERP) * 0.015625).to(tl.float16)
        else:
            q2 = q0
            q3 = q1
    else:
        q0 = query_columns(Q, Had, qrow, rmask, tl.arange(0, D), D, ROTATE, INTERP)
        if KFAST:
            q0 = q0.to(tl.float16)
        elif K_FMT == KV_BF16 and not PRE_ROPE and not INTERP:
            q0 = q0.to(K.dtype.element_ty)
        q1 = q0
        q2 = q0
        q3 = q0
    return q0, q1, q2, q3


# ----------------------------------------------------------------------------- one tile
@triton.jit
def tile_vectors(n0, bh, S, NG, Ks, Km, Vm, D: tl.constexpr, BLOCK_N: tl.constexpr,
                 K_FMT: tl.constexpr, V_FMT: tl.constexpr, GROUP: tl.constexpr,
                 KFAST: tl.constexpr, VFAST: tl.constexpr):
    """``vec``, the small per-tile vectors of tile ``n0``: int4/int2 key scale and minimum slices
    (one group; slice-major storage, so each slice is contiguous) and int4/int2 value minimums.

    The main loop loads them one tile ahead (software prefetch): plain loads that the copy
    pipeline does not take, and that would otherwise expose their latency in every tile. Any
    ``n0`` is safe (the group is clamped, tokens past the cache masked); unused ones are zeros."""
    PER: tl.constexpr = 2 if K_FMT == KV_INT4 else 4
    NB: tl.constexpr = D // PER
    x = tl.arange(0, NB)
    if KFAST and kv_grouped(K_FMT):
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
    if VFAST and kv_grouped(V_FMT):
        offs = n0 + tl.arange(0, BLOCK_N)
        vm = tl.load(Vm + bh * S + offs, mask=offs < S, other=0.0)
    else:
        vm = tl.zeros([BLOCK_N], tl.float16)
    return s0, s1, s2, s3, m0, m1, m2, m3, vm


@triton.jit
def key_logits(n0, offs_n, nmask, q, vec, bh, S, NG, K, Ks, Km, sm_scale_log2, log2_theta,
               MASKED: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, K_FMT: tl.constexpr,
               GROUP: tl.constexpr, PRE_ROPE: tl.constexpr, KFAST: tl.constexpr,
               ASM: tl.constexpr, INTERP: tl.constexpr):
    """Logits of tile ``n0`` (tokens ``offs_n``; ``nmask``: those in the split) in log2 units, as
    ``(t, roff)`` with logits ``= t * sm_scale_log2 + roff`` (``roff`` per query row; sm_scale > 0),
    so that the maximum and the exponent take one FFMA per element. Not causally masked here."""
    q0, q1, q2, q3 = q
    s0, s1, s2, s3, m0, m1, m2, m3, _ = vec
    tok = tl.arange(0, BLOCK_N)
    rows_zero = tl.zeros([q0.shape[0]], tl.float32)
    if KFAST and kv_grouped(K_FMT):
        # Packed keys: q_i here is q[:, i::PER] / 2^k_i in fp16, and the codes come out of the
        # asm as 1024 + 2^k_i c (no fma). With A_i = q_i * s_i (key scale, this group):
        #   q·(c*s + m) = sum_i A_i·(1024 + 2^k_i c) - 1024 sum(A_i) + sum_i 2^k_i (q_i·m_i)
        # The two correction terms are small MMAs (every column holds the row's value). int4
        # multiplies q_i by the broadcast minimums; int2 dots q_i * m_i with ones instead (like
        # A_i): its 32-channel broadcast took a shared-memory round trip per tile, while for
        # int4 the ones form spills more (sm_90 SASS, `attention.py --sass`).
        PER: tl.constexpr = 2 if K_FMT == KV_INT4 else 4
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
            qm0 = dot(q0, tl.broadcast_to(m0[:, None], (NB, 16)), zc, INTERP)
            qm1 = dot(q1, tl.broadcast_to(m1[:, None], (NB, 16)), zc, INTERP)
        else:
            qm0 = dot(q0 * m0[None, :], ones, zc, INTERP)
            qm1 = dot(q1 * m1[None, :], ones, zc, INTERP)
        sa = dot(A1, ones, dot(A0, ones, zc, INTERP), INTERP)
        if PER == 2:
            c0, c1 = bits.i4_unpack(byt, True, ASM)
            t = dot(A1, tl.trans(c1), dot(A0, tl.trans(c0), zero, INTERP), INTERP)
            corr = qm0 + 16.0 * qm1 - 1024.0 * sa
        else:
            c0, c1, c2, c3 = bits.i2_unpack(byt, True, ASM)
            A2 = q2 * s2[None, :]
            A3 = q3 * s3[None, :]
            qm2 = dot(q2 * m2[None, :], ones, zc, INTERP)
            qm3 = dot(q3 * m3[None, :], ones, zc, INTERP)
            sa = dot(A3, ones, dot(A2, ones, sa, INTERP), INTERP)
            t = dot(A1, tl.trans(c1), dot(A0, tl.trans(c0), zero, INTERP), INTERP)
            t = dot(A3, tl.trans(c3), dot(A2, tl.trans(c2), t, INTERP), INTERP)
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
        t = dot(q0, tl.trans(bits.byte_values(byt, K_FMT, ASM)), zero, INTERP) * ks[None, :]
        roff = rows_zero
    elif K_FMT == KV_BF16 and not PRE_ROPE:
        d = tl.arange(0, D)
        kptr = K + (bh * S + n0) * D + tok[:, None] * D + d[None, :]
        k = tl.load(kptr, mask=nmask[:, None], other=0.0) if MASKED else tl.load(kptr)
        zero = tl.zeros([q0.shape[0], BLOCK_N], tl.float32)
        t = dot(q0, tl.trans(k.to(q0.dtype)), zero, INTERP)
        roff = rows_zero
    else:
        # generic: dequantize in float32, RoPE if the cache holds pre-RoPE keys, fp16 operands
        k = generic_keys(K, Ks, Km, bh, S, NG, offs_n, nmask, SHIFT=0, D=D, BLOCK_N=BLOCK_N,
                         K_FMT=K_FMT, GROUP=GROUP)
        if PRE_ROPE:
            HALF: tl.constexpr = D // 2
            kp = generic_keys(K, Ks, Km, bh, S, NG, offs_n, nmask, SHIFT=HALF, D=D, BLOCK_N=BLOCK_N,
                              K_FMT=K_FMT, GROUP=GROUP)
            d = tl.arange(0, D)
            inv_freq = tl.exp2(-((d % HALF).to(tl.float32) * (2.0 / D)) * log2_theta)
            ang = offs_n.to(tl.float32)[:, None] * inv_freq[None, :]
            sign = tl.where(d < HALF, -1.0, 1.0)
            k = k * tl.cos(ang) + (sign[None, :] * kp) * tl.sin(ang)
        zero = tl.zeros([q0.shape[0], BLOCK_N], tl.float32)
        t = dot(q0.to(tl.float16), tl.trans(k.to(tl.float16)), zero, INTERP)
        roff = rows_zero
    return t, roff


@triton.jit
def rescale(upd, m_i, m_new, l_i, am, a0, a1, a2, a3, NACC: tl.constexpr):
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
def value_products(p, n0, end, offs_n, nmask, am, a0, a1, a2, a3, vmv, bh, S, V, Vs, Vm,
                   MASKED: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, V_FMT: tl.constexpr,
                   VGROUP: tl.constexpr, TB: tl.constexpr, VFAST: tl.constexpr, ASM: tl.constexpr,
                   INTERP: tl.constexpr):
    """``p · v`` of tile ``n0`` (tokens ``offs_n``, ``nmask``: those before ``end``) added to the
    accumulators (and ``am``): ``(am, a0, a1, a2, a3)``."""
    tok = tl.arange(0, BLOCK_N)
    SV = (S + TB - 1) // TB * TB
    # Token-blocked value codes are masked per block of TB tokens, so that masked loads stay
    # vectorized: a block that starts before ``end`` lies inside the (padded) cache, and its
    # tokens past ``end`` hold finite codes that meet p = 0 (their scales load as 0).
    bmask = (n0 + (tok // TB) * TB) < end
    if VFAST and kv_grouped(V_FMT):
        # int4/int2 values, one scale and minimum per token: p·(c*s + m) = (p*s)·c + p·m
        VPER: tl.constexpr = 2 if V_FMT == KV_INT4 else 4
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
            c0, c1 = bits.i4_unpack(vb, False, ASM)
            a0 = dot(p16, c0, a0, INTERP)
            a1 = dot(p16, c1, a1, INTERP)
        else:
            c0, c1, c2, c3 = bits.i2_unpack(vb, False, ASM)
            a0 = dot(p16, c0, a0, INTERP)
            a1 = dot(p16, c1, a1, INTERP)
            a2 = dot(p16, c2, a2, INTERP)
            a3 = dot(p16, c3, a3, INTERP)
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
        a0 = dot(p16, bits.byte_values(vb, V_FMT, ASM), a0, INTERP)
    elif V_FMT == KV_BF16:
        d = tl.arange(0, D)
        vptr = V + (bh * S + n0) * D + tok[:, None] * D + d[None, :]
        v = tl.load(vptr, mask=nmask[:, None], other=0.0) if MASKED else tl.load(vptr)
        a0 = dot(p, v.to(tl.float32), a0, INTERP) if INTERP else dot(p.to(v.dtype), v, a0, INTERP)
    else:
        v = generic_values(V, Vs, Vm, bh, S, offs_n, nmask, D=D, BLOCK_N=BLOCK_N, V_FMT=V_FMT,
                           VGROUP=VGROUP, TB=TB)
        a0 = dot(p.to(tl.float16), v.to(tl.float16), a0, INTERP)
    return am, a0, a1, a2, a3


@triton.jit
def tile(n0, end, qpos, q, state, vec, bh, S, NG, K, Ks, Km, V, Vs, Vm, sm_scale_log2, log2_theta,
         MASKED: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, K_FMT: tl.constexpr,
         V_FMT: tl.constexpr, GROUP: tl.constexpr, VGROUP: tl.constexpr, TB: tl.constexpr,
         PRE_ROPE: tl.constexpr, KFAST: tl.constexpr, VFAST: tl.constexpr, LAZY: tl.constexpr,
         ASM: tl.constexpr, INTERP: tl.constexpr):
    """One BLOCK_N-token tile of the compressed store for all query rows of a KV head: logits,
    causal mask (``MASKED``: the tile reaches ``end`` or the last query's position ``qpos``),
    online softmax, ``p · v``. Returns the new ``state``."""
    m_i, l_i, am, a0, a1, a2, a3 = state
    offs_n = n0 + tl.arange(0, BLOCK_N)
    nmask = offs_n < end
    NACC: tl.constexpr = (2 if V_FMT == KV_INT4 else 4) if (VFAST and kv_grouped(V_FMT)) else 1
    t, roff = key_logits(n0, offs_n, nmask, q, vec, bh=bh, S=S, NG=NG, K=K, Ks=Ks, Km=Km,
                         sm_scale_log2=sm_scale_log2, log2_theta=log2_theta, MASKED=MASKED, D=D,
                         BLOCK_N=BLOCK_N, K_FMT=K_FMT, GROUP=GROUP, PRE_ROPE=PRE_ROPE, KFAST=KFAST,
                         ASM=ASM, INTERP=INTERP)
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
            l_i, am, a0, a1, a2, a3 = rescale(upd, m_i, m_new, l_i, am, a0, a1, a2, a3, NACC=NACC)
    else:
        l_i, am, a0, a1, a2, a3 = rescale(upd, m_i, m_new, l_i, am, a0, a1, a2, a3, NACC=NACC)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(t * sm_scale_log2 + (roff - m_use)[:, None])
    l_i += tl.sum(p, 1)
    am, a0, a1, a2, a3 = value_products(p, n0, end, offs_n, nmask, am, a0, a1, a2, a3, vmv=vec[8],
                                        bh=bh, S=S, V=V, Vs=Vs, Vm=Vm, MASKED=MASKED, D=D,
                                        BLOCK_N=BLOCK_N, V_FMT=V_FMT, VGROUP=VGROUP, TB=TB,
                                        VFAST=VFAST, ASM=ASM, INTERP=INTERP)
    return m_new, l_i, am, a0, a1, a2, a3


@triton.jit
def ring_tile(n0, L, QL, qpos, q, m_i, l_i, acc, bh, Kres, Vres, sm_scale_log2, log2_theta,
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
        s = dot(q.to(tl.float16), tl.trans(kr.to(tl.float16)), zero, INTERP)
    elif INTERP:
        s = dot(q, tl.trans(k.to(tl.float32)), zero, INTERP)
    else:
        s = dot(q.to(k.dtype), tl.trans(k), zero, INTERP)
    s = s * sm_scale_log2
    valid = nmask[None, :] & (offs_n[None, :] <= qpos[:, None])
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if INTERP:
        acc = dot(p, v.to(tl.float32), acc * alpha[:, None], INTERP)
    else:
        acc = dot(p.to(v.dtype), v, acc * alpha[:, None], INTERP)
    return m_new, l_i, acc


# ----------------------------------------------------------------------------- split outputs
@triton.jit
def store_part(Opart, part, rmask, a, am, inv, cols, D: tl.constexpr):
    """Columns ``cols`` of a split's normalized partial output ``(a + am) * inv``."""
    o = (a + am[:, None]) * inv[:, None]
    tl.store(Opart + part[:, None] * D + cols[None, :], o, mask=rmask[:, None])


@triton.jit
def merge_splits(Opart, Lpart, Out, qrow, rmask, NS_TOTAL, D: tl.constexpr, BLOCK_M: tl.constexpr):
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
