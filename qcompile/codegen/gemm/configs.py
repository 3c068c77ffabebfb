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

from qcompile.codegen.triton_env import NUM_SMS_DEFAULT
from qcompile.formats.kernel_codes import W_INT4


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    dequant: bool = False  # prefill: dequantize W once, then cuBLAS (weight-only kernels)


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


def _split_k(tiles: int, k_tiles: int, target_programs: int) -> int:
    """Smallest power-of-two K split giving >= ``target_programs`` (each keeps >= 4 K tiles)."""
    split = 1
    while tiles * split < target_programs and split * 2 <= max(1, k_tiles // 4):
        split *= 2
    return split


@lru_cache(maxsize=4096)
def pick_config(M: int, N: int, K: int, kind: str, group: int, num_sms: int = NUM_SMS_DEFAULT) -> GemmConfig:
    """Config for one GEMM. ``kind``: ``"w4"`` (int4/fp4 weight-only), ``"w8"``
    (int8/fp8 weight-only) or ``"fp8"`` (W8A8). ``group`` = 0 for per-channel."""
    mb = m_bucket(M)
    if mb <= 64:
        # Decode / small batch: memory bound. Narrow N tiles, long K tiles, then split K
        # until there are >= 2 programs per SM so that all of HBM's bandwidth is in use.
        if mb == 1 and kind != "fp8":
            block_m, block_n, block_k, warps = 1, 32, 256, 4  # GEMV: FMAs, no tensor-core padding
        elif mb <= 16:
            block_m, block_n, block_k, warps = 16, 32, (256 if kind == "w4" else 128), 4
        else:
            block_m, block_n, block_k, warps = mb, 64, 128, 4
        tiles = triton.cdiv(N, block_n) * triton.cdiv(M, block_m)
        if mb >= 32 and tiles < num_sms // 2:
            block_k = 64  # few tiles (N = 4096): split K in short tiles (H200 sweep: 58.6 vs 100 us)
        block_k = _block_k_for_group(block_k, group, K)
        # M >= 32: fp32 atomics on 32-64-row tiles are costly; split only when under half a wave
        if mb >= 32 and tiles >= num_sms // 2:
            split = 1
        else:
            split = _split_k(tiles, triton.cdiv(K, block_k), 2 * num_sms)
        return GemmConfig(block_m, block_n, block_k, split, 1 if mb <= 16 else 8, num_warps=warps, num_stages=4)
    if kind != "fp8" and mb >= 256:
        # Prefill: compute bound; one dequant pass + cuBLAS beats re-dequantizing per M tile.
        return GemmConfig(128, 128, 64, dequant=True)
    if mb <= 256:
        block_k = _block_k_for_group(64 if kind != "fp8" else 128, group, K)
        return GemmConfig(64 if mb <= 128 else 128, 128, block_k, 1, 8, num_warps=4 if mb <= 128 else 8, num_stages=4)
    block_k = _block_k_for_group(64 if kind != "fp8" else 128, group, K)
    return GemmConfig(128, 256 if kind == "fp8" else 128, block_k, 1, 8, num_warps=8, num_stages=3 if kind == "fp8" else 4)


INT_MMA_MAX_M = 128
"""Above this M the weight-only GEMM takes the general kernels (dequantize + cuBLAS from M = 256)."""


def int_mma_split(M: int, N: int, K: int, code: int, block_m: int, block_n: int, block_k: int,
                  num_sms: int = NUM_SMS_DEFAULT) -> int:
    """K split for ``int_mma``: double it until the grid has >= 1.5 programs per SM, keeping
    >= 2 K tiles per split and the fp32 partials (split x M x N x 4 B, written and read once)
    under a quarter of the weight bytes."""
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    k_tiles = triton.cdiv(K, block_k)
    weight_bytes = N * K // (2 if code == W_INT4 else 1)
    split = 1
    while (tiles * split < 3 * num_sms // 2 and k_tiles // (split * 2) >= 2
           and (split * 2) * M * N * 4 * 4 <= weight_bytes):
        split *= 2
    return split


@lru_cache(maxsize=4096)
def pick_int_mma_config(M: int, N: int, K: int, code: int, group: int,
                        num_sms: int = NUM_SMS_DEFAULT) -> GemmConfig:
    """Tile config for ``int_mma`` (``code``: ``kernel_codes.W_INT4`` / ``W_INT8``, M <= 128).

    From the graph-timed sweeps on an H100 (``benchmarks/gemm.py --sweep-only``, see
    docs/kernels-gemm.md): 16-row M tiles up to M = 16 (the smallest tensor-core tile), 32-row
    tiles above (64-row tiles ran slower at M = 64); int4: 128 columns x 128 codes per tile;
    int8: 32 columns x 256 codes (256 contiguous bytes per row and tile ran 20% faster than 64).
    A K tile never straddles a group."""
    block_m = 16 if M <= 16 else (32 if M <= 64 else 64)
    if code == W_INT4:
        block_n, block_k = 128, 128
    else:
        block_n, block_k = 32, 256
    if group:
        block_k = min(block_k, group)
    split = int_mma_split(M, N, K, code, block_m, block_n, block_k, num_sms)
    return GemmConfig(block_m, block_n, block_k, split, 8, num_warps=4, num_stages=3)
