"""Tile configurations: a small cached heuristic, never autotuning.

A generate loop calls the same GEMM shapes thousands of times with M = batch size;
autotuning there would stall the first tokens and make timings noisy. Instead the
config is a pure function of (M bucket, N, K, weight format, group), cached.
The numbers were chosen from the sweep in ``benchmarks/gemm.py`` on an H200
(see ``docs/kernels-gemm.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import triton

NUM_SMS_DEFAULT = 132


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


def m_bucket(M: int) -> int:
    """Round M up to a power of two (min 1): configs only change at these steps."""
    return 1 if M <= 1 else 1 << (M - 1).bit_length()


def _block_k_for_group(block_k: int, group: int, K: int) -> int:
    """BLOCK_K must divide the group or be a multiple of it (one scale load per tile row).
    ``group == 0`` (per channel) puts no constraint on BLOCK_K."""
    if group == 0:
        return block_k
    if group >= block_k:
        bk = block_k
        while group % bk:
            bk //= 2
        return bk
    return max(group, block_k - block_k % group)


@lru_cache(maxsize=4096)
def pick_config(M: int, N: int, K: int, kind: str, group: int, num_sms: int = NUM_SMS_DEFAULT) -> GemmConfig:
    """Config for one GEMM. ``kind``: ``"w4"`` (int4/fp4 weight-only), ``"w8"``
    (int8/fp8 weight-only) or ``"fp8"`` (W8A8). ``group`` = 0 for per-channel."""
    mb = m_bucket(M)
    if mb <= 16:
        # Decode: memory bound. Narrow N tiles, long K tiles, then split K until
        # there are >= 2 programs per SM so the whole HBM bandwidth is in use.
        block_n = 64 if kind == "w4" else 32
        block_k = 256 if kind == "w4" else 128
        block_k = _block_k_for_group(block_k, group, K)
        tiles = triton.cdiv(N, block_n)
        k_tiles = triton.cdiv(K, block_k)
        split = 1
        while tiles * split < 2 * num_sms and split * 2 <= max(1, k_tiles // 4):
            split *= 2
        return GemmConfig(16, block_n, block_k, split, 1, num_warps=4, num_stages=4)
    if mb <= 64:
        block_k = _block_k_for_group(128, group, K)
        return GemmConfig(mb, 64, block_k, 1, 8, num_warps=4, num_stages=4)
    if mb <= 256:
        block_k = _block_k_for_group(64 if kind != "fp8" else 128, group, K)
        return GemmConfig(64 if mb <= 128 else 128, 128, block_k, 1, 8, num_warps=4 if mb <= 128 else 8, num_stages=4)
    block_k = _block_k_for_group(64 if kind != "fp8" else 128, group, K)
    return GemmConfig(128, 256 if kind == "fp8" else 128, block_k, 1, 8, num_warps=8, num_stages=3 if kind == "fp8" else 4)
