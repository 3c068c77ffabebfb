"""``int_mma`` (int4 / int8 weights x bf16 / fp16 activations on tensor cores) under the Triton
interpreter: every index path against float64, the split-K tickets, the dispatch rules. The
inline PTX itself is emulated in ``test_int_mma_ptx.py`` and run on the GPU by
``benchmarks/check_gemm.py``."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from qcompile.codegen.gemm import force_triton, triton_quantized_linear  # noqa: E402
from qcompile.codegen.gemm.configs import GemmConfig, int_mma_split, pick_int_mma_config  # noqa: E402
from qcompile.codegen.gemm.int_mma import launch_int_mma, supports  # noqa: E402
from qcompile.codegen.gemm.reference import random_quantized, reference_linear  # noqa: E402
from qcompile.formats.kernel_layouts import gemm_weight_operands  # noqa: E402
from qcompile.formats.spec import QuantSpec  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"

SPECS = [QuantSpec("int4", 64, True), QuantSpec("int4", 128, False), QuantSpec("int4", 0, True),
         QuantSpec("int4", 0, False), QuantSpec("int8", 0, True), QuantSpec("int8", 64, False)]


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


def launch(x, qt, cfg, **kw):
    ops = gemm_weight_operands(qt)
    return launch_int_mma(x, ops.data, ops.scale, ops.zero, qt.shape[1], ops.group, ops.code, cfg,
                          kw.get("bias"), kw.get("residual"), kw.get("silu", False))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("M,cfg", [
    (3, GemmConfig(16, 16, 64, split_k=3)),      # split-K with the ticket fix-up, rows < tile
    (1, GemmConfig(16, 32, 64, split_k=1)),      # one program per column tile, masked N
    (17, GemmConfig(32, 16, 64, split_k=2)),     # 32-row tile
], ids=["split3", "direct", "m32"])
def test_matches_float64(spec, dtype, M, cfg):
    g = torch.Generator().manual_seed(M)
    N, K = 40, 200  # N not a tile multiple; K not a multiple of 64 (masked activations)
    qt = random_quantized(spec, N, K, DEV, g)
    x = torch.randn(M, K, generator=g).to(DEV, dtype)
    bias = torch.randn(N, generator=g).to(DEV, dtype)
    y = launch(x, qt, cfg, bias=bias)
    assert y.shape == (M, N) and y.dtype == dtype
    assert rel_err(y, reference_linear(x, qt, bias=bias)) < 1e-2


def test_epilogue_silu_residual_and_tickets_reset():
    """silu(gate) * up + residual through the split-K fix-up; a second call reuses the tickets."""
    g = torch.Generator().manual_seed(5)
    N, K, M = 64, 256, 2
    qt = random_quantized(QuantSpec("int4", 128, True), N, K, DEV, g, weight_std=0.2)
    cfg = GemmConfig(16, 16, 64, split_k=4)
    for _ in range(2):
        x = torch.randn(M, K, generator=g).to(DEV, torch.bfloat16)
        res = torch.randn(M, N // 2, generator=g).to(DEV, torch.bfloat16)
        y = launch(x, qt, cfg, residual=res, silu=True)
        ref = reference_linear(x, qt, residual=res, epilogue="silu_mul")
        assert y.shape == (M, N // 2) and rel_err(y, ref) < 1e-2


def test_dispatch_uses_int_mma_for_small_m():
    """triton_quantized_linear routes int4 g128 at M <= 128 here (it computes the same numbers)."""
    g = torch.Generator().manual_seed(6)
    qt = random_quantized(QuantSpec("int4", 128, True), 48, 256, DEV, g)
    x = torch.randn(2, 3, 256, generator=g).to(DEV, torch.bfloat16)
    with force_triton():
        y = triton_quantized_linear(x, qt)
    assert y.shape == (2, 3, 48)
    assert rel_err(y, reference_linear(x, qt)) < 1e-2


def test_supports_and_config_rules():
    assert supports(0, 128, 4096) is None and supports(1, 0, 4096) is None
    assert "group" in supports(0, 32, 4096)
    assert "K" in supports(0, 128, 4098)
    assert "int4 and int8" in supports(2, 32, 4096)
    c = pick_int_mma_config(1, 14336, 4096, 0, 128, 132)
    assert (c.block_m, c.block_n, c.block_k) == (16, 128, 128) and 128 % c.block_k == 0
    assert pick_int_mma_config(64, 14336, 4096, 0, 64, 132).block_k == 64  # never across a group
    assert int_mma_split(1, 4096, 14336, 0, 16, 128, 128, 132) > 1  # few column tiles: split K
    assert int_mma_split(1, 28672, 8192, 0, 16, 128, 128, 132) == 1  # enough tiles already
    qt = random_quantized(QuantSpec("int4", 64, True), 8, 128, DEV)
    with pytest.raises(ValueError, match="block_k"):
        launch(torch.zeros(1, 128, dtype=torch.bfloat16, device=DEV), qt, GemmConfig(16, 16, 128))
    # four dots of block_k / 4 codes: 32-code tiles would be 8-deep dots (no GPU compiles them)
    with pytest.raises(ValueError, match="block_k=32 is below 64"):
        launch(torch.zeros(1, 128, dtype=torch.bfloat16, device=DEV), qt, GemmConfig(16, 16, 32))
