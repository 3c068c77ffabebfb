"""Interpreter tests of the fused dequant-GEMM kernels against float64 references.

Small shapes (odd M, N not a multiple of the tile, several K groups, K not a
multiple of BLOCK_K) run every kernel family through ``TRITON_INTERPRET=1`` on CPU
with the Triton path forced.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from qcompile.codegen.gemm import (  # noqa: E402
    force_triton,
    triton_quantized_linear,
    unsupported_reason,
    use_triton,
)
from qcompile.codegen.gemm.configs import GemmConfig, m_bucket, pick_config  # noqa: E402
from qcompile.codegen.gemm.reference import dequantize_reference, random_quantized, reference_linear  # noqa: E402
from qcompile.formats.kernel_layouts import gemm_weight_operands  # noqa: E402
from qcompile.formats.spec import QuantSpec  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FP8_ACT = QuantSpec("fp8_e4m3", dynamic=True)
FP8_TOL = 1e-2


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


def run(x, qt, **kw):
    with force_triton():
        return triton_quantized_linear(x, qt, **kw)


SPECS = [
    (QuantSpec("int4", 32, True), 1e-2),
    (QuantSpec("int4", 32, False), 1e-2),
    (QuantSpec("int4", 64, False, "bfloat16"), 1e-2),
    (QuantSpec("int4", 0, True), 1e-2),
    (QuantSpec("int8", 0, True), 1e-2),
    (QuantSpec("fp8_e4m3", 0, True, "float32"), 1e-2),
    (QuantSpec("fp4_e2m1", 32, True), 1e-2),
    (QuantSpec("nvfp4"), 1e-2),
    (QuantSpec("mxfp4"), 1e-2),
    (QuantSpec("mxfp8"), 1e-2),
]


@pytest.mark.parametrize("spec,tol", SPECS, ids=[s.short() for s, _ in SPECS])
@pytest.mark.parametrize("M", [1, 17])
def test_weight_only(spec, tol, M):
    g = torch.Generator().manual_seed(M)
    N, K = 40, 160
    qt = random_quantized(spec, N, K, DEV, g)
    x = torch.randn(M, K, generator=g).to(DEV, torch.bfloat16)
    y = run(x, qt)
    assert y.shape == (M, N) and y.dtype == torch.bfloat16
    assert rel_err(y, reference_linear(x, qt)) < tol


@pytest.mark.parametrize("group,cfg", [
    (32, GemmConfig(16, 16, 32, split_k=3)),      # split-K, BLOCK_K == group
    (32, GemmConfig(16, 32, 64, split_k=1)),      # two groups per tile
    (64, GemmConfig(32, 16, 32, split_k=2)),      # group spans several tiles
    (32, GemmConfig(1, 16, 64, split_k=2)),       # GEMV (M tile of 1)
], ids=["split3-bk32", "2groups-per-tile", "group-spans-tiles", "gemv"])
def test_int4_tile_paths(group, cfg):
    """Every scale-broadcast path and the split-K epilogue, with bias + residual."""
    g = torch.Generator().manual_seed(1)
    M, N, K = 3, 24, 160
    qt = random_quantized(QuantSpec("int4", group, False), N, K, DEV, g)
    x = torch.randn(M, K, generator=g).to(DEV, torch.float16)
    bias = torch.randn(N, generator=g).to(DEV, torch.float16)
    res = torch.randn(M, N, generator=g).to(DEV, torch.float16)
    y = run(x, qt, bias=bias, residual=res, config=cfg)
    assert y.dtype == torch.float16
    assert rel_err(y, reference_linear(x, qt, bias=bias, residual=res)) < 1e-2


def test_weight_only_refuses_k_tiles_below_32():
    """``block_k`` 16 computed garbage natively on sm_90: the launcher refuses it by name."""
    qt = random_quantized(QuantSpec("int4", 32, True), 24, 160, DEV, torch.Generator().manual_seed(1))
    x = torch.randn(3, 160).to(DEV, torch.float16)
    with force_triton(), pytest.raises(ValueError, match="block_k=16"):
        triton_quantized_linear(x, qt, config=GemmConfig(32, 16, 16, split_k=2))


@pytest.mark.parametrize("M", [1, 3, 17])
def test_fp8_w8a8(M):
    g = torch.Generator().manual_seed(M)
    N, K = 40, 160
    qt = random_quantized(QuantSpec("fp8_e4m3", 0, True, "float32"), N, K, DEV, g)
    x = torch.randn(M, K, generator=g).to(DEV, torch.bfloat16)
    bias = torch.randn(N, generator=g).to(DEV, torch.bfloat16)
    y = run(x, qt, bias=bias, act_spec=FP8_ACT)
    assert rel_err(y, reference_linear(x, qt, bias=bias, act_spec=FP8_ACT)) < FP8_TOL


@pytest.mark.parametrize("act", [None, FP8_ACT], ids=["w4a16", "fp8"])
@pytest.mark.parametrize("M", [1, 17])
def test_silu_mul_residual(act, M):
    g = torch.Generator().manual_seed(10 + M)
    N, K = 48, 64  # merged gate/up: 24 + 24
    spec = QuantSpec("int4", 32, True) if act is None else QuantSpec("fp8_e4m3", 0, True, "float32")
    qt = random_quantized(spec, N, K, DEV, g, weight_std=0.2)
    x = torch.randn(2, M, K, generator=g).to(DEV, torch.bfloat16)
    bias = torch.randn(N, generator=g).to(DEV, torch.bfloat16)
    res = torch.randn(2, M, N // 2, generator=g).to(DEV, torch.bfloat16)
    y = run(x, qt, bias=bias, act_spec=act, residual=res, epilogue="silu_mul")
    assert y.shape == (2, M, N // 2)
    ref = reference_linear(x, qt, bias=bias, act_spec=act, residual=res, epilogue="silu_mul")
    assert rel_err(y, ref) < (1e-2 if act is None else FP8_TOL)


@pytest.mark.parametrize("spec", [QuantSpec("int4", 32, False), QuantSpec("int4", 0, True), QuantSpec("nvfp4"),
                                  QuantSpec("int8", 0, True)], ids=lambda s: s.short())
@pytest.mark.parametrize("epilogue", ["none", "silu_mul"])
def test_prefill_dequant_path(spec, epilogue):
    """Dequantize-then-matmul (large M): dequant kernel + torch GEMM + torch epilogue."""
    g = torch.Generator().manual_seed(7)
    M, N, K = 5, 40, 160
    qt = random_quantized(spec, N, K, DEV, g, weight_std=0.2)
    x = torch.randn(M, K, generator=g).to(DEV, torch.bfloat16)
    bias = torch.randn(N, generator=g).to(DEV, torch.bfloat16)
    n_out = N // 2 if epilogue == "silu_mul" else N
    res = torch.randn(M, n_out, generator=g).to(DEV, torch.bfloat16)
    cfg = GemmConfig(128, 128, 64, dequant=True)
    y = run(x, qt, bias=bias, residual=res, epilogue=epilogue, config=cfg)
    ref = reference_linear(x, qt, bias=bias, residual=res, epilogue=epilogue)
    assert rel_err(y, ref) < 1e-2


def test_silu_mul_split_k():
    g = torch.Generator().manual_seed(5)
    qt = random_quantized(QuantSpec("int4", 32, False), 40, 96, DEV, g, weight_std=0.2)
    x = torch.randn(3, 96, generator=g).to(DEV, torch.bfloat16)
    bias = torch.randn(40, generator=g).to(DEV, torch.bfloat16)
    y = run(x, qt, bias=bias, epilogue="silu_mul", config=GemmConfig(16, 16, 32, split_k=2))
    assert rel_err(y, reference_linear(x, qt, bias=bias, epilogue="silu_mul")) < 1e-2


def test_act_quant_two_pass():
    """Rows longer than 16384 take the two-pass (amax, then quantize) path."""
    from qcompile.codegen.gemm.fp8 import quantize_act_fp8
    from qcompile.codegen.gemm.reference import fake_quant_act_fp8
    x = torch.randn(2, 20000, generator=torch.Generator().manual_seed(3)).to(DEV, torch.bfloat16)
    with force_triton():
        q, s = quantize_act_fp8(x, pad_to=128)
    assert q.shape == (2, 20096) and (q[:, 20000:].float() == 0).all()
    assert torch.equal(q[:, :20000].double() * s[:, None].double(), fake_quant_act_fp8(x))


def test_reference_dequant_layout():
    """Element 2i sits in the low nibble; sym int4 offset is 8; K padding is dropped."""
    from qcompile.formats.spec import QuantizedTensor
    data = torch.tensor([[0x9F, 0x08]], dtype=torch.uint8)  # codes 15, 9, 8, 0
    qt = QuantizedTensor(QuantSpec("int4", 4), (1, 3), data, torch.tensor([[0.5]], dtype=torch.float16))
    assert dequantize_reference(qt).tolist() == [[3.5, 0.5, 0.0]]


def test_kernel_layouts_cached_and_flags():
    qt = random_quantized(QuantSpec("fp8_e4m3", 0, True), 8, 32)
    ops = gemm_weight_operands(qt)
    assert ops.per_channel and ops.scale.dtype == torch.float32 and ops.code == 3
    assert gemm_weight_operands(qt) is ops
    ops4 = gemm_weight_operands(random_quantized(QuantSpec("int4", 32, False), 8, 64))
    assert ops4.group == 32 and ops4.zero is not None and ops4.code == 0


def test_dispatch_switches(monkeypatch):
    x = torch.zeros(2, 4)
    monkeypatch.delenv("QCOMPILE_FORCE_TRITON", raising=False)
    assert not use_triton(x)
    with force_triton():
        assert use_triton(x)
        with force_triton(False):
            assert not use_triton(x)
    monkeypatch.setenv("QCOMPILE_FORCE_TRITON", "1")
    assert use_triton(x)
    monkeypatch.delenv("QCOMPILE_FORCE_TRITON")
    assert unsupported_reason(QuantSpec("int4", 128), None, "cpu") is not None
    with force_triton():
        assert unsupported_reason(QuantSpec("int4", 128), None, "cpu") is None
        assert unsupported_reason(QuantSpec("int3", 128), None, "cpu") is not None
        assert unsupported_reason(QuantSpec("nvfp4"), QuantSpec("nvfp4", dynamic=True), "cpu") is None
        assert unsupported_reason(QuantSpec("nvfp4"), QuantSpec("mxfp4", dynamic=True), "cpu") is not None
        assert unsupported_reason(QuantSpec("int4", 128), QuantSpec("fp8_e4m3", dynamic=True), "cpu") is None
        assert unsupported_reason(QuantSpec("int4", 0), QuantSpec("fp8_e4m3", dynamic=True), "cpu") is not None


def test_configs_heuristic():
    assert m_bucket(1) == 1 and m_bucket(3) == 4 and m_bucket(17) == 32
    c = pick_config(1, 4096, 4096, "w4", 128)
    assert c.block_m == 1 and c.split_k > 1 and (128 % c.block_k == 0 or c.block_k % 128 == 0)
    assert pick_config(16, 4096, 4096, "w4", 128).block_m == 16
    assert pick_config(2048, 4096, 4096, "w4", 128).dequant
    assert not pick_config(2048, 4096, 4096, "fp8", 0).dequant
    c = pick_config(2048, 4096, 4096, "w4", 32)
    assert c.block_k % 32 == 0
    assert pick_config(2048, 4096, 4096, "w4", 32) is c  # cached
