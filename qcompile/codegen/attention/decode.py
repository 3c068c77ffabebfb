"""Split-KV flash-decoding over a compressed KV cache, dequantizing on the fly.

One program per (batch row, KV head, split) runs an online softmax over its slice of the cache
for all ``GQA * T`` query rows that share the KV head (``T`` <= 8 query tokens, for speculative
decoding), so each compressed byte is read once. A last split per row reads the bf16 residual ring
of int4/int2 keys. The splits merge through their log-sum-exps: with few splits the last program
of a head to finish does it (an atomic ticket), so the call is one launch; with more, a second
kernel with a program per query row (``launch.FUSED_MERGE_MAX_SPLITS``). The query rotation is
fused. This module holds the two kernels and the host wrapper :func:`decode_attention`; the bit
tricks are in ``bits.py``, the tiles (query, keys, values, online softmax, ring, merge) in
``tiles.py``, the launch configuration in ``launch.py``, the scratch memory (partials, tickets) in
``qcompile.runtime.decode_workspace``.

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
- **Values are stored token-blocked** (``formats.kv.VALUE_TOKEN_BLOCK``): the P·V product runs over
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
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from qcompile.codegen import triton_env
from qcompile.codegen.attention.bits import FENCE
from qcompile.codegen.attention.launch import (
    MAX_QUERY_TOKENS,
    UNPACK_MODES,
    fuses_merge,
    kernel_paths,
    launch_config,
    split_tokens,
)
from qcompile.codegen.attention.tiles import (
    merge_splits,
    query_columns,
    query_slices,
    ring_tile,
    store_part,
    tile,
    tile_vectors,
)
from qcompile.formats import kernel_codes
from qcompile.formats.hadamard import hadamard_signs
from qcompile.formats.kv import VALUE_TOKEN_BLOCK

if TYPE_CHECKING:
    from qcompile.runtime.decode_workspace import DecodeWorkspace

__all__ = ["MAX_QUERY_TOKENS", "decode_attention"]

KV_INT4 = tl.constexpr(kernel_codes.KV_INT4)
kv_grouped = triton.constexpr_function(kernel_codes.kv_grouped)


# ----------------------------------------------------------------------------- kernels
# Split counts vary with the shape, and a layer's row of lengths with the layer index: not
# specializing on them (== 1, % 16, 16-byte alignment) avoids recompiles.
@triton.jit(do_not_specialize=["HKV", "NG", "NUM_SPLITS", "NS_TOTAL"],
            do_not_specialize_on_alignment=["Lengths", "Tickets"])
def _decode_kernel(
    # pointers: query, Hadamard signs, split partials, output, merge tickets, row lengths
    Q, Had, Opart, Lpart, Out, Tickets, Lengths,
    # pointers: the cache layer (key / value codes, scales, minimums; the bf16 residual ring)
    K, Ks, Km, V, Vs, Vm, Kres, Vres,
    # scalars: softmax scale times log2(e), log2 of the RoPE base (before the sizes: moving them
    # renumbers the PTX registers)
    sm_scale_log2, log2_theta,
    # sizes: KV heads, max_seq_len, key groups, compressed splits, all splits, tokens a split, T
    HKV, S, NG, NUM_SPLITS, NS_TOTAL, CHUNK, T,
    # constexprs: shapes (GQA group, head dim, query rows and tokens per tile, ring, value blocks)
    GQA: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    R: tl.constexpr, TB: tl.constexpr,
    # constexprs: formats (kernel_codes.KV_*), groups, key variants
    K_FMT: tl.constexpr, V_FMT: tl.constexpr, GROUP: tl.constexpr, VGROUP: tl.constexpr,
    PRE_ROPE: tl.constexpr, ROTATE: tl.constexpr,
    # constexprs: paths (launch.kernel_paths), fused merge, GPU / interpreter switches
    KFAST: tl.constexpr, VFAST: tl.constexpr, FUSED: tl.constexpr, LAZY: tl.constexpr,
    ASM: tl.constexpr, INTERP: tl.constexpr,
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
        q = query_columns(Q, Had, qrow, rmask, d, D=D, ROTATE=ROTATE, INTERP=INTERP)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        # R == 1 (no ring): this branch never runs, and Kres / Vres are placeholder pointers of
        # another dtype, so the ring code must not even be compiled.
        if R > 1:
            for n0 in range(QL, L, RING_N):
                m_i, l_i, acc = ring_tile(
                    n0, L=L, QL=QL, qpos=qpos, q=q, m_i=m_i, l_i=l_i, acc=acc, bh=bh, Kres=Kres,
                    Vres=Vres, sm_scale_log2=sm_scale_log2, log2_theta=log2_theta,
                    D=D, BLOCK_N=RING_N, R=R, PRE_ROPE=PRE_ROPE, INTERP=INTERP)
        has = l_i > 0
        inv = 1.0 / tl.where(has, l_i, 1.0)
        store_part(Opart, part, rmask, acc, tl.zeros([BLOCK_M], tl.float32), inv, d, D)
    else:
        # ---------------------------------------------------------------- the compressed store
        start = split * CHUNK
        end = tl.minimum(start + CHUNK, QL)
        # tiles before full_end need no mask: in range, and every query row sees every token
        full_end = start + tl.maximum(tl.minimum(end, L - T + 1) - start, 0) // BLOCK_N * BLOCK_N
        qs = query_slices(Q, Had, K, qrow, rmask, D=D, K_FMT=K_FMT, PRE_ROPE=PRE_ROPE,
                          ROTATE=ROTATE, KFAST=KFAST, INTERP=INTERP)
        am = tl.zeros([BLOCK_M], tl.float32)
        if VFAST and kv_grouped(V_FMT):
            VPER: tl.constexpr = 2 if V_FMT == KV_INT4 else 4
            a0 = tl.zeros([BLOCK_M, D // VPER], tl.float32)
            a1 = tl.zeros([BLOCK_M, D // VPER], tl.float32)
            a2 = tl.zeros([BLOCK_M, D // VPER], tl.float32)
            a3 = tl.zeros([BLOCK_M, D // VPER], tl.float32)
        else:
            a0 = tl.zeros([BLOCK_M, D], tl.float32)
            a1 = tl.zeros([BLOCK_M, 16], tl.float32)
            a2 = tl.zeros([BLOCK_M, 16], tl.float32)
            a3 = tl.zeros([BLOCK_M, 16], tl.float32)
        state = (m_i, l_i, am, a0, a1, a2, a3)
        # Two passes over the split's tiles (``phase`` is a constexpr): 0, the full tiles,
        # unmasked, each with the next tile's small vectors prefetched; 1, at most two masked ones
        # (the partial last tile and those the last T-1 query tokens reach).
        for phase in tl.static_range(2):
            lo = full_end if phase == 1 else start
            hi = end if phase == 1 else full_end
            if phase == 0:
                nxt = tile_vectors(lo, bh, S, NG, Ks, Km, Vm, D=D, BLOCK_N=BLOCK_N, K_FMT=K_FMT,
                                   V_FMT=V_FMT, GROUP=GROUP, KFAST=KFAST, VFAST=VFAST)
            for n0 in range(lo, hi, BLOCK_N):
                if phase == 1:
                    vec = tile_vectors(n0, bh, S, NG, Ks, Km, Vm, D=D, BLOCK_N=BLOCK_N, K_FMT=K_FMT,
                                       V_FMT=V_FMT, GROUP=GROUP, KFAST=KFAST, VFAST=VFAST)
                else:
                    vec = nxt
                    nxt = tile_vectors(n0 + BLOCK_N, bh, S, NG, Ks, Km, Vm, D=D, BLOCK_N=BLOCK_N,
                                       K_FMT=K_FMT, V_FMT=V_FMT, GROUP=GROUP, KFAST=KFAST, VFAST=VFAST)
                state = tile(n0, end, qpos, qs, state, vec, bh=bh, S=S, NG=NG, K=K, Ks=Ks, Km=Km,
                             V=V, Vs=Vs, Vm=Vm, sm_scale_log2=sm_scale_log2, log2_theta=log2_theta,
                             MASKED=phase == 1, D=D, BLOCK_N=BLOCK_N, K_FMT=K_FMT, V_FMT=V_FMT,
                             GROUP=GROUP, VGROUP=VGROUP, TB=TB, PRE_ROPE=PRE_ROPE, KFAST=KFAST,
                             VFAST=VFAST, LAZY=LAZY, ASM=ASM, INTERP=INTERP)
        m_i, l_i, am, a0, a1, a2, a3 = state
        has = l_i > 0
        inv = 1.0 / tl.where(has, l_i, 1.0)
        if VFAST and kv_grouped(V_FMT):
            # packed values: accumulator i holds channels PER*x + i
            VP: tl.constexpr = 2 if V_FMT == KV_INT4 else 4
            xv = tl.arange(0, D // VP)
            store_part(Opart, part, rmask, a0, am, inv, VP * xv, D)
            store_part(Opart, part, rmask, a1, am, inv, VP * xv + 1, D)
            if VP == 4:
                store_part(Opart, part, rmask, a2, am, inv, VP * xv + 2, D)
                store_part(Opart, part, rmask, a3, am, inv, VP * xv + 3, D)
        else:
            store_part(Opart, part, rmask, a0, am, inv, d, D)
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
            merge_splits(Opart, Lpart, Out, qrow, rmask, NS_TOTAL, D=D, BLOCK_M=BLOCK_M)
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
_CACHE_POINTERS = (("K", "k"), ("Ks", "k_scale"), ("Km", "k_min"), ("V", "v"), ("Vs", "v_scale"),
                   ("Vm", "v_min"), ("Kres", "k_res"), ("Vres", "v_res"))
"""Kernel argument -> ``cache.layer_tensors`` name."""


def decode_attention(q: torch.Tensor, cache, layer: int, *, sm_scale: float | None = None,
                     impl: str = "auto", num_splits: int | None = None,
                     block_n: int | None = None, num_warps: int | None = None,
                     num_stages: int | None = None, out: torch.Tensor | None = None,
                     unpack: str = "auto", fused_reduce: bool | None = None,
                     maxnreg: int | None = None,
                     workspace: DecodeWorkspace | None = None) -> torch.Tensor:
    """Attention of ``T`` new query tokens per row over ``cache``'s ``layer``.

    ``q``: ``[B, Hq, D]`` (one token) or ``[B, Hq, T, D]`` with ``T <= 8``, already RoPE'd; the
    ``T`` tokens' keys and values must already be appended (query ``t`` sits at position
    ``length - T + t`` and sees keys up to it). ``Hq`` must be a multiple of the cache's KV heads.
    Returns the shape of ``q``, in ``q``'s dtype. ``impl``: ``auto`` (Triton on CUDA, torch on
    CPU), ``triton`` (also on CPU under ``TRITON_INTERPRET=1``) or ``torch``.
    ``out`` (shaped and typed like ``q``, contiguous) receives the result if given.
    ``workspace`` (a ``qcompile.runtime.DecodeWorkspace`` on ``q``'s device) holds the split
    partials and merge tickets; by default one per device and stream is created on demand.
    The remaining keyword arguments override the launch heuristics (benchmarks, tests):
    ``unpack="generic"`` forces the dequantize-everything path (a baseline); ``fused_reduce``
    picks where the splits merge: in the last program of each head (``True``, one launch) or in
    a second kernel with a program per query row (``False``); ``None`` (default) fuses up to
    ``FUSED_MERGE_MAX_SPLITS`` splits, since the fused merge is one warp reading every split.
    ``maxnreg`` caps the registers of a thread (more programs per SM, at the price of spills).
    """
    from qcompile.codegen.attention.reference import reference_decode_attention
    from qcompile.runtime.decode_workspace import default_workspace
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
    interp = triton_env.interpreting() or q4.device.type != "cuda"
    bound = max(cache.max_length_bound(layer), 1)
    cfg = launch_config(spec, D, B, Hkv, bound, triton_env.num_sms(q4.device), interp, unpack)
    block_n = block_n or cfg.block_n
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    G = spec.group_size
    kfast, vfast = kernel_paths(spec, D, block_n, unpack)
    chunk, num_splits = split_tokens(bound, num_splits or cfg.num_splits, block_n)
    ns_total = num_splits + (1 if spec.grouped_keys else 0)
    if fused_reduce is None:
        fused_reduce = fuses_merge(spec, num_splits)
    R = spec.residual_length if spec.grouped_keys else 1

    ws = workspace if workspace is not None else default_workspace(q4.device)
    if ws.device != q4.device:
        raise ValueError(f"workspace is on {ws.device}, q on {q4.device}")
    tickets, opart, lpart = ws.buffers(B * Hkv if fused_reduce else 0, B * Hq * T, ns_total, D)
    t = cache.layer_tensors(layer)
    dummy = cache.lengths
    if out is not None:
        if out.shape != q.shape or out.dtype != q.dtype or not out.is_contiguous():
            raise ValueError("out must be contiguous, with q's shape and dtype")
        result = out.view(q4.shape)
    else:
        result = torch.empty_like(q4)
    triton_env.before_launch()
    _decode_kernel[(B * Hkv, ns_total)](
        Q=q4, Had=hadamard_signs(D, q4.dtype, q4.device) if spec.rotate_keys else dummy,
        Opart=opart, Lpart=lpart, Out=result, Tickets=tickets if fused_reduce else dummy,
        Lengths=cache.lengths[layer],
        **{arg: t[name] if t[name] is not None else dummy for arg, name in _CACHE_POINTERS},
        sm_scale_log2=sm_scale * 1.4426950408889634, log2_theta=math.log2(spec.rope_theta),
        HKV=Hkv, S=cache.max_seq_len, NG=cache.max_seq_len // G, NUM_SPLITS=num_splits,
        NS_TOTAL=ns_total, CHUNK=chunk, T=T,
        GQA=GQA, D=D, BLOCK_M=BLOCK_M, BLOCK_N=block_n, R=R, TB=VALUE_TOKEN_BLOCK,
        K_FMT=kernel_codes.kv_code(spec.key_format), V_FMT=kernel_codes.kv_code(spec.value_format),
        GROUP=G, VGROUP=spec.vgroup(D), PRE_ROPE=spec.pre_rope, ROTATE=spec.rotate_keys,
        KFAST=kfast, VFAST=vfast, FUSED=fused_reduce, LAZY=not interp, ASM=not interp, INTERP=interp,
        num_warps=num_warps or cfg.num_warps, num_stages=num_stages or cfg.num_stages,
        **({"maxnreg": maxnreg} if maxnreg else {}))
    if not fused_reduce:
        _decode_reduce_kernel[(B * Hq * T,)](
            Opart=opart, Lpart=lpart, Out=result, NS_TOTAL=ns_total, D=D,
            BLOCK_S=min(triton.next_power_of_2(ns_total), max(1, 4096 // D)), num_warps=4)
    if out is not None:
        return out
    return result.squeeze(2) if squeeze else result
