"""Triton quantize-on-append kernels for ``QuantizedKVCache``.

Two launches per append, in this order:

1. ``_flush_key_groups_kernel`` (int4/int2 keys only): every key group that the append completes
   is quantized per channel over its ``GROUP`` tokens, reading old tokens from the bf16 residual
   ring and new ones from the input. It runs first because step 2 may overwrite residual slots
   that it still reads.
2. ``_append_tokens_kernel``: one program per new token and KV head. Per-token formats (and the
   values of every format) are quantized in place; for int4/int2 keys the tokens past the last
   flush go to the residual ring, keys and values both. Compressed value codes are written into
   the token-blocked layout (``formats.kv.VALUE_TOKEN_BLOCK``): byte ``j`` of token ``p`` at
   ``[p // TB, j, p % TB]``; each byte belongs to one token, so programs never share a word.
"""

from __future__ import annotations

import triton
import triton.language as tl

from qcompile.codegen.triton_env import before_launch
from qcompile.formats import kernel_codes
from qcompile.formats.floating import E4M3_MAX
from qcompile.formats.kv import VALUE_TOKEN_BLOCK

KV_BF16 = tl.constexpr(kernel_codes.KV_BF16)
KV_FP8 = tl.constexpr(kernel_codes.KV_FP8)
KV_INT4 = tl.constexpr(kernel_codes.KV_INT4)
FP8_MAX = tl.constexpr(E4M3_MAX)
kv_grouped = triton.constexpr_function(kernel_codes.kv_grouped)
kv_per_token = triton.constexpr_function(kernel_codes.kv_per_token)


@triton.jit
def _fp8e4m3_encode(y):
    """float32 already in [-FP8_MAX, FP8_MAX] (448) -> e4m3fn bits (int32), round to nearest even.

    Written with integer arithmetic so that it gives the same bits on the GPU and under
    TRITON_INTERPRET (whose fp8 conversion is not reliable).
    """
    a = tl.abs(y)
    u = a.to(tl.int32, bitcast=True)
    normal = ((u + 0x7FFFF + ((u >> 20) & 1)) >> 20) - ((127 - 7) << 3)
    sub = ((a * 512.0 + 8388608.0) - 8388608.0).to(tl.int32)
    code = tl.where(a < 0.015625, sub, normal)
    code = tl.minimum(code, 0x7E)
    return tl.where(y < 0, code | 0x80, code)


@triton.jit
def _pack_along_last(c, ROWS: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """[ROWS, D] int32 codes -> [ROWS, D*BITS/8] bytes, low bits first (see formats.kv)."""
    if BITS == 4:
        lo, hi = tl.split(tl.reshape(c, (ROWS, D // 2, 2)))
        return (lo | (hi << 4)).to(tl.uint8)
    else:
        a, b = tl.split(tl.reshape(c, (ROWS, D // 4, 2, 2)))
        a0, a1 = tl.split(a)
        b0, b1 = tl.split(b)
        return (a0 | (b0 << 2) | (a1 << 4) | (b1 << 6)).to(tl.uint8)


@triton.jit
def _code_offsets(bh, S, pos, jb, NB: tl.constexpr, TB: tl.constexpr):
    """Element offsets of code bytes ``jb`` of token ``pos``: ``[S, NB]`` per head when TB == 0,
    else token-blocked ``[S_pad / TB, NB, TB]`` (values)."""
    if TB == 0:
        return (bh * S + pos) * NB + jb
    else:
        sv = (S + TB - 1) // TB * TB
        return bh * sv * NB + (pos // TB) * (TB * NB) + jb * TB + pos % TB


@triton.jit
def _store_token(x, pos, bh, S, Codes, Scale, Minv, d,
                 D: tl.constexpr, FMT: tl.constexpr, VGROUP: tl.constexpr, TB: tl.constexpr):
    """Quantize one token row ``x`` ([1, D] float32) of head ``bh`` and store it at ``pos``
    (code layout: see :func:`_code_offsets`)."""
    row = bh * S + pos
    if FMT == KV_BF16:
        tl.store(Codes + row * D + d, x.to(Codes.dtype.element_ty))
    elif kv_per_token(FMT):
        amax = tl.max(tl.abs(x), axis=1)                       # [1]
        qmax = FP8_MAX if FMT == KV_FP8 else 127.0
        scale = tl.where(amax > 0, amax / qmax, 1.0)
        y = x * (1.0 / scale)[:, None]
        if FMT == KV_FP8:
            code = _fp8e4m3_encode(tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX)).to(tl.uint8)
        else:
            code = tl.minimum(tl.maximum(tl.floor(y + 0.5), -127.0), 127.0).to(tl.int8)
        tl.store(Codes + _code_offsets(bh, S, pos, d, D, TB), code)
        tl.store(Scale + row + tl.arange(0, 1), scale)
    else:
        BITS: tl.constexpr = 4 if FMT == KV_INT4 else 2
        QMAX: tl.constexpr = (1 << BITS) - 1
        NGC: tl.constexpr = D // VGROUP
        xg = tl.reshape(x, (NGC, VGROUP))
        mn16 = tl.min(xg, axis=1).to(tl.float16)
        s16 = ((tl.max(xg, axis=1) - tl.min(xg, axis=1)) / QMAX).to(tl.float16)
        s = s16.to(tl.float32)
        inv = tl.where(s > 0, 1.0 / s, 0.0)
        c = tl.floor((xg - mn16.to(tl.float32)[:, None]) * inv[:, None] + 0.5)
        c = tl.minimum(tl.maximum(c, 0.0), QMAX).to(tl.int32)
        packed = _pack_along_last(tl.reshape(c, (1, D)), 1, D, BITS)
        jb = tl.arange(0, D * BITS // 8)[None, :]
        tl.store(Codes + _code_offsets(bh, S, pos, jb, D * BITS // 8, TB), packed)
        g = tl.arange(0, NGC)
        tl.store(Scale + row * NGC + g, s16)
        tl.store(Minv + row * NGC + g, mn16)


@triton.jit
def _append_tokens_kernel(
    # pointers: new keys and values, row lengths, new tokens per row
    Knew, Vnew, Lengths, Nnew,
    # pointers: the cache layer (codes, scales, value minimums, bf16 residual ring)
    K, Ks, V, Vs, Vm, Kres, Vres,
    # sizes: KV heads, new tokens (padded), max_seq_len
    H, T, S,
    # constexprs: head dim, formats (kernel_codes.KV_*), value group, ring, value token block
    D: tl.constexpr, K_FMT: tl.constexpr, V_FMT: tl.constexpr, VGROUP: tl.constexpr,
    R: tl.constexpr, TB: tl.constexpr,
):
    bh = tl.program_id(0)
    i = tl.program_id(1)
    b = bh // H
    l0 = tl.load(Lengths + b)
    nb = tl.load(Nnew + b)
    if i < nb:
        pos = l0 + i
        d = tl.arange(0, D)[None, :]
        x_k = tl.load(Knew + (bh * T + i) * D + d).to(tl.float32)
        x_v = tl.load(Vnew + (bh * T + i) * D + d).to(tl.float32)
        _store_token(x_v, pos, bh, S, V, Vs, Vm, d, D, V_FMT, VGROUP, TB)
        if kv_grouped(K_FMT):
            # int4/int2 keys: tokens past the last completed flush wait in the residual ring.
            q1 = ((l0 + nb) // R) * R
            if pos >= q1:
                slot = bh * R + pos % R
                tl.store(Kres + slot * D + d, x_k.to(Kres.dtype.element_ty))
                tl.store(Vres + slot * D + d, x_v.to(Vres.dtype.element_ty))
        else:
            _store_token(x_k, pos, bh, S, K, Ks, Ks, d, D, K_FMT, VGROUP, 0)


@triton.jit
def _flush_key_groups_kernel(
    # pointers: new keys, row lengths, new tokens per row; key codes, scales, minimums, ring
    Knew, Lengths, Nnew, K, Ks, Km, Kres,
    # sizes: KV heads, new tokens (padded), max_seq_len, key groups per head
    H, T, S, NG,
    # constexprs: head dim, key format (kernel_codes.KV_*), tokens per key group, ring
    D: tl.constexpr, K_FMT: tl.constexpr, GROUP: tl.constexpr, R: tl.constexpr,
):
    bh = tl.program_id(0)
    gi = tl.program_id(1)
    b = bh // H
    l0 = tl.load(Lengths + b)
    nb = tl.load(Nnew + b)
    q0 = (l0 // R) * R
    q1 = ((l0 + nb) // R) * R
    g = q0 // GROUP + gi
    if g * GROUP < q1:
        BITS: tl.constexpr = 4 if K_FMT == KV_INT4 else 2
        QMAX: tl.constexpr = (1 << BITS) - 1
        pos = g * GROUP + tl.arange(0, GROUP)
        d = tl.arange(0, D)[None, :]
        new = (pos >= l0)[:, None]
        x_new = tl.load(Knew + (bh * T + (pos - l0))[:, None] * D + d, mask=new, other=0.0)
        x_old = tl.load(Kres + (bh * R + pos % R)[:, None] * D + d, mask=~new, other=0.0)
        x = tl.where(new, x_new.to(tl.float32), x_old.to(tl.float32))
        mn16 = tl.min(x, axis=0).to(tl.float16)
        s16 = ((tl.max(x, axis=0) - tl.min(x, axis=0)) / QMAX).to(tl.float16)
        s = s16.to(tl.float32)
        inv = tl.where(s > 0, 1.0 / s, 0.0)
        c = tl.floor((x - mn16.to(tl.float32)[None, :]) * inv[None, :] + 0.5)
        c = tl.minimum(tl.maximum(c, 0.0), QMAX).to(tl.int32)
        packed = _pack_along_last(c, GROUP, D, BITS)
        jb = tl.arange(0, D * BITS // 8)[None, :]
        tl.store(K + (bh * S + pos)[:, None] * (D * BITS // 8) + jb, packed)
        # slice-major: channel PER*x + i at i * D/PER + x (see formats.kv)
        PER: tl.constexpr = 8 // BITS
        dd = tl.arange(0, D)
        sm = (dd % PER) * (D // PER) + dd // PER
        tl.store(Ks + (bh * NG + g) * D + sm, s16)
        tl.store(Km + (bh * NG + g) * D + sm, mn16)


def launch_append(cache, layer: int, k, v, num_new, max_new: int) -> None:
    """Run the two append kernels for ``layer`` (k, v: contiguous ``[B, Hkv, T, D]``)."""
    spec = cache.spec
    t = cache.layer_tensors(layer)
    B, H, T, D = k.shape
    lengths = cache.lengths[layer]
    kf, vf = kernel_codes.kv_code(spec.key_format), kernel_codes.kv_code(spec.value_format)
    dummy = lengths
    before_launch()
    if spec.grouped_keys:
        R, G = spec.residual_length, spec.group_size
        max_groups = (max_new + R - 1) // R * (R // G) + R // G
        _flush_key_groups_kernel[(B * H, max_groups)](
            k, lengths, num_new, t["k"], t["k_scale"], t["k_min"], t["k_res"],
            H, T, cache.max_seq_len, cache.max_seq_len // G,
            D=D, K_FMT=kf, GROUP=G, R=R)
    _append_tokens_kernel[(B * H, T)](
        k, v, lengths, num_new,
        t["k"], t.get("k_scale", dummy) if t.get("k_scale") is not None else dummy,
        t["v"], t["v_scale"] if t.get("v_scale") is not None else dummy,
        t["v_min"] if t.get("v_min") is not None else dummy,
        t["k_res"] if t.get("k_res") is not None else dummy,
        t["v_res"] if t.get("v_res") is not None else dummy,
        H, T, cache.max_seq_len,
        D=D, K_FMT=kf, V_FMT=vf, VGROUP=spec.vgroup(D),
        R=spec.residual_length if spec.grouped_keys else 1, TB=VALUE_TOKEN_BLOCK)
