"""Launch configuration of decode attention: tiles, warps, pipeline stages, splits and where the
splits merge, from the cache's spec and the call's shape (no autotuning: a generate loop calls the
same shapes thousands of times). The numbers come from H100 sweeps
(``benchmarks/attention.py --sweep-only`` / ``--merge``, docs/benchmarks/attention-h100-80gb-hbm3.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import triton

from qcompile.formats.kernel_codes import KV_INT4, kv_code, kv_grouped, kv_per_token

MAX_QUERY_TOKENS = 8
"""Most query tokens per row one decode call takes (speculative decoding)."""
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


@dataclass(frozen=True)
class DecodeLaunch:
    """One decode-attention launch configuration.

    ``block_n``: tokens per tile; ``num_warps`` / ``num_stages``: per program; ``num_splits``:
    splits of the compressed store asked for per (batch row, KV head) (``split_tokens`` says how
    many launch; int4/int2 keys add one for the residual ring); ``fused_merge``: whether those
    splits merge in the last program of each head (one launch) rather than in a second kernel.
    """

    block_n: int
    num_warps: int
    num_stages: int
    num_splits: int
    fused_merge: bool


def kernel_paths(spec, head_dim: int, block_n: int, unpack: str = "auto") -> tuple[bool, bool]:
    """Whether keys and values take the fast paths (bit-trick dequantization, scales folded) or
    the generic one (dequantize the tile in float32): pre-RoPE keys, int4/int2 key groups smaller
    than a tile, value groups smaller than the head and code slices narrower than 16 (one MMA
    step: int4 needs D >= 32, int2 D >= 64) are generic; bf16 has no dequantization."""
    kf, vf = kv_code(spec.key_format), kv_code(spec.value_format)
    kper, vper = (2 if kf == KV_INT4 else 4), (2 if vf == KV_INT4 else 4)
    fast = unpack == "auto"
    fold = spec.grouped_keys and not spec.pre_rope and spec.group_size % block_n == 0
    kfast = fast and ((kv_per_token(kf) and not spec.pre_rope)
                      or (kv_grouped(kf) and fold and head_dim // kper >= 16))
    vfast = fast and (kv_per_token(vf) or (kv_grouped(vf) and spec.vgroup(head_dim) == head_dim
                                           and head_dim // vper >= 16))
    return kfast, vfast


def split_tokens(length: int, num_splits: int, block_n: int) -> tuple[int, int]:
    """(tokens per split, splits actually launched): splits hold whole tiles, so asking for
    ``num_splits`` may launch fewer (131072 tokens in 132 splits of 64-token tiles: 128)."""
    chunk = triton.cdiv(triton.cdiv(length, num_splits), block_n) * block_n
    return chunk, triton.cdiv(length, chunk)


def fuses_merge(spec, num_splits: int) -> bool:
    """Whether ``num_splits`` launched splits (plus the ring's, for int4/int2 keys) merge in the
    kernel by default, rather than in the second kernel (``FUSED_MERGE_MAX_SPLITS``)."""
    return num_splits + (1 if spec.grouped_keys else 0) <= FUSED_MERGE_MAX_SPLITS


def launch_config(spec, head_dim: int, batch: int, num_kv_heads: int, length: int,
                  sm_count: int, interp: bool = False, unpack: str = "auto") -> DecodeLaunch:
    """Default launch configuration for ``batch`` rows of ``num_kv_heads`` heads over ``length``
    tokens on ``sm_count`` SMs (``interp``: under the Triton interpreter).

    When keys and values both take the fast (compressed) paths, one warp per program and many
    programs (``ONE_WARP_TUNING``; each with >= ``MIN_SPLIT_TOKENS`` tokens; see
    ``decode.py``'s docstring). Otherwise (a bf16 side, or a generic path: a 16-bit or float32
    tile needs the registers of 4 warps) the previous kernel's 4 warps. int4/int2 key tiles stay
    inside one key group.
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
    fused = fuses_merge(spec, split_tokens(max(length, 1), splits, block_n)[1])
    return DecodeLaunch(block_n=block_n, num_warps=num_warps, num_stages=num_stages,
                        num_splits=splits, fused_merge=fused)
