"""Split-KV flash-decoding over a compressed KV cache, dequantizing on the fly.

One program per (batch row, KV head, split) runs an online softmax over its slice of the cache
for all ``GQA * T`` query rows that share the KV head (``T`` <= 8 query tokens, for speculative
decoding), so each compressed byte is read once. A last split per row reads the bf16 residual ring
of int4/int2 keys. A second kernel merges the splits through their log-sum-exps.

Dequantization is arranged to cost little arithmetic per element:

- per-token scales (fp8, int8) multiply the logits (keys) or the probabilities (values), not
  the tiles;
- int4/int2 keys, whose scale and minimum are per channel for a group of tokens, fold them into
  the query when a tile lies in one group: ``q·(c*s + m) = (q*s)·c + q·m``.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from qcompile.codegen.attention.append import FMT_CODES
from qcompile.runtime.hadamard import rotate

MAX_QUERY_TOKENS = 8


@triton.jit
def _fp8_bits_to(code, DT: tl.constexpr, NATIVE: tl.constexpr):
    """e4m3fn bits (uint8) -> DT. The interpreter's fp8 conversion is unreliable: decode by hand."""
    if NATIVE:
        return code.to(tl.float8e4nv, bitcast=True).to(DT)
    else:
        c = code.to(tl.int32)
        e = (c >> 3) & 0xF
        m = c & 7
        normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
        val = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)
        return tl.where((c & 0x80) != 0, -val, val).to(DT)


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
def _load_keys(K, Ks, Km, Kres, bh, S, NG, offs_n, nmask, RES: tl.constexpr, SHIFT: tl.constexpr,
               D: tl.constexpr, BLOCK_N: tl.constexpr, K_FMT: tl.constexpr, GROUP: tl.constexpr,
               R: tl.constexpr, FOLD: tl.constexpr, FP8_NATIVE: tl.constexpr,
               GATHER: tl.constexpr):
    """Key tile [BLOCK_N, D] in float32, columns rotated by SHIFT (for RoPE's partner channel).

    Per-token scales are left out (applied to the logits); grouped scales too when FOLD.
    """
    ch = (tl.arange(0, D) + SHIFT) % D
    if RES:
        ptr = Kres + (bh * R + offs_n % R)[:, None] * D + ch[None, :]
        return tl.load(ptr, mask=nmask[:, None], other=0.0).to(tl.float32)
    if K_FMT == 0:
        ptr = K + (bh * S + offs_n)[:, None] * D + ch[None, :]
        return tl.load(ptr, mask=nmask[:, None], other=0.0).to(tl.float32)
    elif K_FMT == 1:
        code = tl.load(K + (bh * S + offs_n)[:, None] * D + ch[None, :], mask=nmask[:, None], other=0)
        return _fp8_bits_to(code, tl.float32, FP8_NATIVE)
    elif K_FMT == 2:
        code = tl.load(K + (bh * S + offs_n)[:, None] * D + ch[None, :], mask=nmask[:, None], other=0)
        return code.to(tl.float32)
    else:
        BITS: tl.constexpr = 4 if K_FMT == 3 else 2
        NB: tl.constexpr = D * BITS // 8
        if GATHER:
            # each element loads its own byte (repeats hit L1) and shifts: no join / reshape
            byt = tl.load(K + (bh * S + offs_n)[:, None] * NB + (ch // (8 // BITS))[None, :],
                          mask=nmask[:, None], other=0).to(tl.int32)
            c = ((byt >> ((ch % (8 // BITS)) * BITS)[None, :]) & ((1 << BITS) - 1)).to(tl.float32)
        else:
            jb = (tl.arange(0, NB) + SHIFT * BITS // 8) % NB
            byt = tl.load(K + (bh * S + offs_n)[:, None] * NB + jb[None, :], mask=nmask[:, None],
                          other=0)
            c = _unpack(byt.to(tl.int32), BLOCK_N, D, BITS).to(tl.float32)
        if FOLD:
            return c
        sidx = (bh * NG + offs_n // GROUP)[:, None] * D + ch[None, :]
        sc = tl.load(Ks + sidx, mask=nmask[:, None], other=0.0).to(tl.float32)
        mn = tl.load(Km + sidx, mask=nmask[:, None], other=0.0).to(tl.float32)
        return c * sc + mn


@triton.jit
def _load_values(V, Vs, Vm, Vres, bh, S, offs_n, nmask, RES: tl.constexpr, DT: tl.constexpr,
                 D: tl.constexpr, BLOCK_N: tl.constexpr, V_FMT: tl.constexpr,
                 VGROUP: tl.constexpr, R: tl.constexpr, FOLD: tl.constexpr,
                 FP8_NATIVE: tl.constexpr, GATHER: tl.constexpr):
    """Value tile [BLOCK_N, D] in DT; per-token scales are left out (applied to p), and so are
    int4/int2 scales and minimums when FOLD (one group per token)."""
    d = tl.arange(0, D)
    if RES:
        ptr = Vres + (bh * R + offs_n % R)[:, None] * D + d[None, :]
        return tl.load(ptr, mask=nmask[:, None], other=0.0).to(DT)
    if V_FMT == 0:
        return tl.load(V + (bh * S + offs_n)[:, None] * D + d[None, :], mask=nmask[:, None],
                       other=0.0).to(DT)
    elif V_FMT == 1:
        code = tl.load(V + (bh * S + offs_n)[:, None] * D + d[None, :], mask=nmask[:, None], other=0)
        return _fp8_bits_to(code, DT, FP8_NATIVE)
    elif V_FMT == 2:
        code = tl.load(V + (bh * S + offs_n)[:, None] * D + d[None, :], mask=nmask[:, None], other=0)
        return code.to(DT)
    else:
        BITS: tl.constexpr = 4 if V_FMT == 3 else 2
        NB: tl.constexpr = D * BITS // 8
        NGC: tl.constexpr = D // VGROUP
        row = bh * S + offs_n
        if GATHER:
            byt = tl.load(V + row[:, None] * NB + (d // (8 // BITS))[None, :], mask=nmask[:, None],
                          other=0).to(tl.int32)
            c = (byt >> ((d % (8 // BITS)) * BITS)[None, :]) & ((1 << BITS) - 1)
        else:
            byt = tl.load(V + row[:, None] * NB + tl.arange(0, NB)[None, :], mask=nmask[:, None],
                          other=0)
            c = _unpack(byt.to(tl.int32), BLOCK_N, D, BITS)
        if FOLD:
            return c.to(DT)
        c = c.to(tl.float32)
        sidx = row[:, None] * NGC + (d // VGROUP)[None, :]
        sc = tl.load(Vs + sidx, mask=nmask[:, None], other=0.0).to(tl.float32)
        mn = tl.load(Vm + sidx, mask=nmask[:, None], other=0.0).to(tl.float32)
        return (c * sc + mn).to(DT)


@triton.jit
def _dot(a, b, INTERP: tl.constexpr):
    """``a @ b`` accumulated in float32; the interpreter mishandles bf16 dots, so upcast there."""
    if INTERP:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _attend_tile(q, m_i, l_i, acc, qpos, n0, end, bh, S, NG,
                 K, Ks, Km, V, Vs, Vm, Kres, Vres, sm_scale_log2, log2_theta,
                 RES: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                 K_FMT: tl.constexpr, V_FMT: tl.constexpr, GROUP: tl.constexpr,
                 VGROUP: tl.constexpr, R: tl.constexpr, PRE_ROPE: tl.constexpr,
                 FOLD: tl.constexpr, FP8_NATIVE: tl.constexpr, INTERP: tl.constexpr,
                 GATHER: tl.constexpr):
    """One BLOCK_N-token tile of the online softmax for all query rows of a KV head."""
    DT: tl.constexpr = q.dtype
    offs_n = n0 + tl.arange(0, BLOCK_N)
    nmask = offs_n < end
    # ---- logits q·k
    if FOLD and not RES:
        # int4/int2 keys, tile inside one token group: fold scale and minimum into q.
        g = n0 // GROUP
        d = tl.arange(0, D)
        in_range = (n0 + d * 0) < end  # a vector mask: scalar masks fail in newer interpreters
        sc = tl.load(Ks + (bh * NG + g) * D + d, mask=in_range, other=0.0).to(tl.float32)
        mn = tl.load(Km + (bh * NG + g) * D + d, mask=in_range, other=0.0).to(tl.float32)
        qf = q.to(tl.float32) * sm_scale_log2
        c = _load_keys(K, Ks, Km, Kres, bh, S, NG, offs_n, nmask, RES, 0, D, BLOCK_N, K_FMT,
                       GROUP, R, FOLD, FP8_NATIVE, GATHER)
        # float16 operands: codes are exact, and q*s keeps 3 more bits than in bfloat16
        s = _dot((qf * sc[None, :]).to(tl.float16), tl.trans(c.to(tl.float16)), INTERP)
        s += tl.sum(qf * mn[None, :], axis=1)[:, None]
    else:
        k = _load_keys(K, Ks, Km, Kres, bh, S, NG, offs_n, nmask, RES, 0, D, BLOCK_N, K_FMT,
                       GROUP, R, False, FP8_NATIVE, GATHER)
        if PRE_ROPE:
            # RoPE (rotate-half) at the key's slot position, applied after dequantization.
            HALF: tl.constexpr = D // 2
            kp = _load_keys(K, Ks, Km, Kres, bh, S, NG, offs_n, nmask, RES, HALF, D, BLOCK_N,
                            K_FMT, GROUP, R, False, FP8_NATIVE, GATHER)
            d = tl.arange(0, D)
            inv_freq = tl.exp2(-((d % HALF).to(tl.float32) * (2.0 / D)) * log2_theta)
            ang = offs_n.to(tl.float32)[:, None] * inv_freq[None, :]
            sign = tl.where(d < HALF, -1.0, 1.0)
            k = k * tl.cos(ang) + (sign[None, :] * kp) * tl.sin(ang)
        # Dequantized keys go through float16 (3 more mantissa bits than bfloat16: keys with
        # outlier channels lose too much in bfloat16); a bf16 cache stays in q's dtype.
        KDT: tl.constexpr = DT if K_FMT == 0 else tl.float16
        s = _dot(q.to(KDT), tl.trans(k.to(KDT)), INTERP)
        if (K_FMT == 1 or K_FMT == 2) and not RES:
            ks = tl.load(Ks + bh * S + offs_n, mask=nmask, other=0.0)
            s = s * ks[None, :]
        s = s * sm_scale_log2
    valid = nmask[None, :] & (offs_n[None, :] <= qpos[:, None])
    s = tl.where(valid, s, float("-inf"))
    # ---- online softmax (base 2), safe for rows that have seen no key yet
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    # ---- p·v
    VDT: tl.constexpr = DT if V_FMT == 0 else tl.float16
    acc = acc * alpha[:, None]
    if (V_FMT == 1 or V_FMT == 2) and not RES:
        # per-token value scale folded into p
        vs = tl.load(Vs + bh * S + offs_n, mask=nmask, other=0.0)
        p = p * vs[None, :]
    if V_FMT >= 3 and VGROUP == D and not RES:
        # int4/int2 values, one scale and minimum per token: p·(c*s + m) = (p*s)·c + p·m
        vs = tl.load(Vs + bh * S + offs_n, mask=nmask, other=0.0).to(tl.float32)
        vm = tl.load(Vm + bh * S + offs_n, mask=nmask, other=0.0).to(tl.float32)
        acc += tl.sum(p * vm[None, :], axis=1)[:, None]
        p = p * vs[None, :]
        v = _load_values(V, Vs, Vm, Vres, bh, S, offs_n, nmask, RES, VDT, D, BLOCK_N, V_FMT,
                         VGROUP, R, True, FP8_NATIVE, GATHER)
    else:
        v = _load_values(V, Vs, Vm, Vres, bh, S, offs_n, nmask, RES, VDT, D, BLOCK_N, V_FMT,
                         VGROUP, R, False, FP8_NATIVE, GATHER)
    acc += _dot(p.to(VDT), v, INTERP)
    return m_new, l_i, acc


@triton.jit
def _attend_range(q, m_i, l_i, acc, qpos, start, end, bh, S, NG,
                  K, Ks, Km, V, Vs, Vm, Kres, Vres, sm_scale_log2, log2_theta,
                  RES: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                  K_FMT: tl.constexpr, V_FMT: tl.constexpr, GROUP: tl.constexpr,
                  VGROUP: tl.constexpr, R: tl.constexpr, PRE_ROPE: tl.constexpr,
                  FOLD: tl.constexpr, FP8_NATIVE: tl.constexpr, INTERP: tl.constexpr,
                  ITERS: tl.constexpr, GATHER: tl.constexpr):
    """The online softmax over tokens [start, end), BLOCK_N at a time."""
    if INTERP:
        # The interpreter cannot bound a loop by a loaded scalar (numpy >= 2.4): run a fixed
        # trip count; the tiles past ``end`` are fully masked.
        for it in range(0, ITERS):
            m_i, l_i, acc = _attend_tile(
                q, m_i, l_i, acc, qpos, start + it * BLOCK_N, end, bh, S, NG, K, Ks, Km, V, Vs,
                Vm, Kres, Vres, sm_scale_log2, log2_theta, RES, D, BLOCK_N, K_FMT, V_FMT, GROUP,
                VGROUP, R, PRE_ROPE, FOLD, FP8_NATIVE, INTERP, GATHER)
    else:
        for n0 in range(start, end, BLOCK_N):
            m_i, l_i, acc = _attend_tile(
                q, m_i, l_i, acc, qpos, n0, end, bh, S, NG, K, Ks, Km, V, Vs,
                Vm, Kres, Vres, sm_scale_log2, log2_theta, RES, D, BLOCK_N, K_FMT, V_FMT, GROUP,
                VGROUP, R, PRE_ROPE, FOLD, FP8_NATIVE, INTERP, GATHER)
    return m_i, l_i, acc


@triton.jit
def _decode_split_kernel(
    Q, Opart, Lpart, Lengths,
    K, Ks, Km, V, Vs, Vm, Kres, Vres,
    sm_scale_log2, log2_theta,
    HKV, S, NG, NUM_SPLITS, NS_TOTAL, CHUNK,
    T: tl.constexpr, GQA: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    K_FMT: tl.constexpr, V_FMT: tl.constexpr, GROUP: tl.constexpr, VGROUP: tl.constexpr,
    R: tl.constexpr, PRE_ROPE: tl.constexpr, FOLD: tl.constexpr, FP8_NATIVE: tl.constexpr,
    INTERP: tl.constexpr, ITERS: tl.constexpr, GATHER: tl.constexpr,
):
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
    d = tl.arange(0, D)
    q = tl.load(Q + qrow[:, None] * D + d[None, :], mask=rmask[:, None], other=0.0)
    if INTERP:
        q = q.to(tl.float32)   # the interpreter keeps bf16 as raw bits: compute in float32 there

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    # Split NUM_SPLITS (if any) reads the residual ring: tokens [QL, L).
    is_res = split >= NUM_SPLITS
    start = tl.where(is_res, QL, split * CHUNK)
    end = tl.where(is_res, L, tl.minimum(split * CHUNK + CHUNK, QL))
    if is_res:
        m_i, l_i, acc = _attend_range(
            q, m_i, l_i, acc, qpos, start, end, bh, S, NG, K, Ks, Km, V, Vs, Vm, Kres, Vres,
            sm_scale_log2, log2_theta, True, D, BLOCK_N, K_FMT, V_FMT, GROUP, VGROUP, R,
            PRE_ROPE, FOLD, FP8_NATIVE, INTERP, ITERS, GATHER)
    else:
        m_i, l_i, acc = _attend_range(
            q, m_i, l_i, acc, qpos, start, end, bh, S, NG, K, Ks, Km, V, Vs, Vm, Kres, Vres,
            sm_scale_log2, log2_theta, False, D, BLOCK_N, K_FMT, V_FMT, GROUP, VGROUP, R,
            PRE_ROPE, FOLD, FP8_NATIVE, INTERP, ITERS, GATHER)
    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    part = qrow * NS_TOTAL + split
    tl.store(Opart + part[:, None] * D + d[None, :], o, mask=rmask[:, None])
    tl.store(Lpart + part, lse, mask=rmask)


@triton.jit
def _decode_reduce_kernel(Opart, Lpart, Out, NS_TOTAL, D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Merge the splits of one query row: weights 2^(lse - max)."""
    row = tl.program_id(0)
    sp = tl.arange(0, BLOCK_S)
    smask = sp < NS_TOTAL
    lse = tl.load(Lpart + row * NS_TOTAL + sp, mask=smask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    d = tl.arange(0, D)
    o = tl.load(Opart + (row * NS_TOTAL + sp)[:, None] * D + d[None, :], mask=smask[:, None], other=0.0)
    total = tl.sum(w, axis=0)
    out = tl.sum(w[:, None] * o, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(Out + row * D + d, out.to(Out.dtype.element_ty))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def decode_attention(q: torch.Tensor, cache, layer: int, *, sm_scale: float | None = None,
                     impl: str = "auto", num_splits: int | None = None,
                     block_n: int | None = None, num_warps: int | None = None,
                     num_stages: int | None = None, out: torch.Tensor | None = None,
                     unpack: str = "join") -> torch.Tensor:
    """Attention of ``T`` new query tokens per row over ``cache``'s ``layer``.

    ``q``: ``[B, Hq, D]`` (one token) or ``[B, Hq, T, D]`` with ``T <= 8``, already RoPE'd; the
    ``T`` tokens' keys and values must already be appended (query ``t`` sits at position
    ``length - T + t`` and sees keys up to it). ``Hq`` must be a multiple of the cache's KV heads.
    Returns the shape of ``q``, in ``q``'s dtype. ``impl``: ``auto`` (Triton on CUDA, torch on
    CPU), ``triton`` (also on CPU under ``TRITON_INTERPRET=1``) or ``torch``.
    ``out`` (shaped and typed like ``q``, contiguous) receives the result if given.
    The remaining keyword arguments override the launch heuristics (benchmarks, tests);
    ``unpack`` picks how int4/int2 codes are unpacked (``join``: load bytes, split nibbles and
    interleave; ``gather``: every element loads its byte and shifts).
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
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    if resolve_impl(impl, q4.device) == "torch":
        res = reference_decode_attention(q4, cache, layer, sm_scale=sm_scale,
                                         dtype=torch.float32).to(q4.dtype)
        res = res.squeeze(2) if squeeze else res
        if out is not None:
            out.copy_(res)
            return out
        return res

    spec = cache.spec
    if spec.rotate_keys:
        q4 = rotate(q4)
    q4 = q4.contiguous()
    GQA = Hq // Hkv
    BLOCK_M = max(16, triton.next_power_of_2(GQA * T))
    interp = _interpreting() or q4.device.type != "cuda"
    G = spec.group_size
    if block_n is None:
        block_n = 32 if interp else 64
        if spec.grouped_keys and not spec.pre_rope:
            block_n = max(16, min(block_n, G))
    fold = spec.grouped_keys and not spec.pre_rope and G % block_n == 0
    bound = max(cache.max_length_bound(layer), 1)
    if num_splits is None:
        target = 4 * _sm_count(q4.device) if not interp else 3
        num_splits = max(1, min(triton.cdiv(target, B * Hkv), triton.cdiv(bound, 4 * block_n)))
    chunk = triton.cdiv(triton.cdiv(bound, num_splits), block_n) * block_n
    num_splits = triton.cdiv(bound, chunk)
    ns_total = num_splits + (1 if spec.grouped_keys else 0)

    t = cache.layer_tensors(layer)
    dummy = cache.lengths
    ptrs = [t[n] if t[n] is not None else dummy
            for n in ("k", "k_scale", "k_min", "v", "v_scale", "v_min", "k_res", "v_res")]
    opart = torch.empty(B * Hq * T, ns_total, D, dtype=torch.float32, device=q4.device)
    lpart = torch.empty(B * Hq * T, ns_total, dtype=torch.float32, device=q4.device)
    if out is not None:
        if out.shape != q.shape or out.dtype != q.dtype or not out.is_contiguous():
            raise ValueError("out must be contiguous, with q's shape and dtype")
        result = out.view(q4.shape)
    else:
        result = torch.empty_like(q4)
    extra = {}
    if num_warps is not None:
        extra["num_warps"] = num_warps
    if num_stages is not None:
        extra["num_stages"] = num_stages
    _decode_split_kernel[(B * Hkv, ns_total)](
        q4, opart, lpart, cache.lengths[layer], *ptrs,
        sm_scale * 1.4426950408889634, math.log2(spec.rope_theta),
        Hkv, cache.max_seq_len, cache.max_seq_len // G, num_splits, ns_total, chunk,
        T=T, GQA=GQA, D=D, BLOCK_M=BLOCK_M, BLOCK_N=block_n,
        K_FMT=FMT_CODES[spec.key_format], V_FMT=FMT_CODES[spec.value_format],
        GROUP=G, VGROUP=spec.vgroup(D), R=spec.residual_length if spec.grouped_keys else 1,
        PRE_ROPE=spec.pre_rope, FOLD=fold, FP8_NATIVE=not interp, INTERP=interp,
        ITERS=triton.cdiv(max(chunk, spec.residual_length), block_n) if interp else 0,
        GATHER=unpack == "gather", **extra)
    _decode_reduce_kernel[(B * Hq * T,)](
        opart, lpart, result, ns_total, D=D, BLOCK_S=triton.next_power_of_2(ns_total))
    if out is not None:
        return out
    return result.squeeze(2) if squeeze else result
