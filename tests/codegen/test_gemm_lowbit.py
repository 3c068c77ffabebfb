"""Interpreter tests of the W4A8 (int4 x fp8) and W4A4 (NVFP4/MXFP4 x same) kernels.

Small shapes: odd M, N not a multiple of the tile, several groups along K, K not a
multiple of BLOCK_K. References are float64 matmuls of the dequantized operands.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from qcompile.codegen.gemm.reference import (  # noqa: E402
    dequantize_reference,
    fake_quant_act_fp8,
    random_quantized,
)
from qcompile.codegen.gemm.w4a4 import launch_w4a4, quantize_act_fp4  # noqa: E402
from qcompile.codegen.gemm.w4a8 import launch_w4a8  # noqa: E402
from qcompile.formats.spec import QuantSpec  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(y).all()
    return ((y.double() - ref).norm() / ref.norm()).item()


def epilogue_ref(y, bias, residual, silu_mul):
    if bias is not None:
        y = y + bias.double()
    if silu_mul:
        n = y.shape[-1] // 2
        y = y[..., :n] * torch.sigmoid(y[..., :n]) * y[..., n:]
    if residual is not None:
        y = y + residual.double()
    return y


@pytest.mark.parametrize("spec", [QuantSpec("int4", 32, True), QuantSpec("int4", 64, False)],
                         ids=lambda s: s.short())
@pytest.mark.parametrize("M", [1, 17])
def test_w4a8(spec, M):
    g = torch.Generator().manual_seed(M)
    N, K = 40, 160
    qt = random_quantized(spec, N, K, DEV, g)
    x = torch.randn(M, K, generator=g).to(DEV, torch.bfloat16)
    y = launch_w4a8(x, qt, None, None, False)
    assert y.shape == (M, N) and y.dtype == torch.bfloat16
    ref = fake_quant_act_fp8(x) @ dequantize_reference(qt).T
    assert rel_err(y, ref) < 1e-2


@pytest.mark.parametrize("split_k", [1, 2])
def test_w4a8_epilogues(split_k):
    g = torch.Generator().manual_seed(3)
    N, K, M = 48, 160, 3  # 5 groups: with split 2 the programs take 3 and 2 groups
    qt = random_quantized(QuantSpec("int4", 32, False), N, K, DEV, g, weight_std=0.2)
    x = torch.randn(M, K, generator=g).to(DEV, torch.float16)
    bias = torch.randn(N, generator=g).to(DEV, torch.float16)
    res = torch.randn(M, N // 2, generator=g).to(DEV, torch.float16)
    y = launch_w4a8(x, qt, bias, res, True, split_k=split_k)
    assert y.shape == (M, N // 2) and y.dtype == torch.float16
    ref = epilogue_ref(fake_quant_act_fp8(x) @ dequantize_reference(qt).T, bias, res, True)
    assert rel_err(y, ref) < 1e-2


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_act_quant_fp4_matches_formats_library(fmt):
    """The kernel's per-token quantization is the formats library's (up to rounding ties)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 200, generator=g)
    x[:, 3] *= 30  # an outlier channel
    xq = quantize_act_fp4(x.to(DEV, torch.bfloat16), fmt)
    assert xq.data.shape == (5, xq.padded_k // 2) and xq.data.dtype == torch.uint8
    mine = dequantize_reference(xq)
    assert rel_err(mine, x.to(DEV, torch.bfloat16).double()) < 0.2
    try:
        from qcompile.formats import fake_quantize
    except ImportError:  # formats library not importable: the round trip bound above stands
        return
    theirs = fake_quantize(x.to(torch.bfloat16).float(), QuantSpec(fmt)).to(DEV)
    assert rel_err(mine, theirs.double()) < 2e-2


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("M", [1, 17])
def test_w4a4(fmt, M):
    g = torch.Generator().manual_seed(M)
    N, K = 40, 160
    qt = random_quantized(QuantSpec(fmt), N, K, DEV, g)
    x = torch.randn(M, K, generator=g).to(DEV, torch.bfloat16)
    y = launch_w4a4(x, qt, fmt, None, None, False)
    assert y.shape == (M, N)
    # same activation quantization, then an exact float64 product of the quantized operands
    ref = dequantize_reference(quantize_act_fp4(x, fmt)) @ dequantize_reference(qt).T
    assert rel_err(y, ref) < 1e-2


def test_w4a4_epilogues():
    g = torch.Generator().manual_seed(11)
    N, K, M = 48, 64, 3
    qt = random_quantized(QuantSpec("nvfp4"), N, K, DEV, g, weight_std=0.2)
    x = torch.randn(M, K, generator=g).to(DEV, torch.bfloat16)
    bias = torch.randn(N, generator=g).to(DEV, torch.bfloat16)
    res = torch.randn(M, N // 2, generator=g).to(DEV, torch.bfloat16)
    y = launch_w4a4(x, qt, "nvfp4", bias, res, True)
    ref = dequantize_reference(quantize_act_fp4(x, "nvfp4")) @ dequantize_reference(qt).T
    assert rel_err(y, epilogue_ref(ref, bias, res, True)) < 1e-2


def test_w4a4_rejects_mixed_formats():
    qt = random_quantized(QuantSpec("nvfp4"), 8, 32)
    with pytest.raises(NotImplementedError):
        launch_w4a4(torch.randn(1, 32, dtype=torch.bfloat16), qt, "mxfp4", None, None, False)


@pytest.mark.parametrize("wspec,aspec", [
    (QuantSpec("int4", 32, False), QuantSpec("fp8_e4m3", dynamic=True)),
    (QuantSpec("mxfp4"), QuantSpec("mxfp4", dynamic=True)),
], ids=["w4a8", "w4a4-mx"])
def test_public_entry_point_dispatch(wspec, aspec):
    """``triton_quantized_linear`` routes act_spec fp8 + int4 to W4A8 and FP4 x FP4 to W4A4."""
    from qcompile.codegen.gemm import force_triton, triton_quantized_linear, unsupported_reason

    g = torch.Generator().manual_seed(2)
    qt = random_quantized(wspec, 24, 96, DEV, g)
    x = torch.randn(2, 3, 96, generator=g).to(DEV, torch.bfloat16)
    with force_triton():
        assert unsupported_reason(wspec, aspec, DEV) is None
        y = triton_quantized_linear(x, qt, act_spec=aspec)
    assert y.shape == (2, 3, 24)
    x2 = x.reshape(6, 96)
    if aspec.format == "fp8_e4m3":
        ref = fake_quant_act_fp8(x2) @ dequantize_reference(qt).T
    else:
        ref = dequantize_reference(quantize_act_fp4(x2, aspec.format)) @ dequantize_reference(qt).T
    assert rel_err(y.reshape(6, 24), ref) < 1e-2


def test_nvfp4_block_scale_ties_round_to_even():
    """Block scales exactly halfway between two e4m3 values (common with bf16 inputs, e.g.
    448 * 3/8 = 168 between 160 and 176) round to even, bit-identical to the formats library."""
    from qcompile.formats import quantize

    x = torch.zeros(1, 64)
    x[0, 0] = 8.0  # global amax: its block scale is 448
    x[0, 16] = 3.0  # 448 * 3/8 = 168: tie between 160 and 176 -> 160
    x[0, 32] = 6.0  # 448 * 6/8 = 336: tie between 320 and 352 -> 320
    x[0, 48] = 0.1
    xq = quantize_act_fp4(x.to(DEV, torch.bfloat16), "nvfp4")
    ref = quantize(x.to(torch.bfloat16).double(), QuantSpec("nvfp4"))
    assert xq.scale.float().cpu()[0, :3].tolist() == [448.0, 160.0, 320.0]
    assert torch.equal(xq.scale.cpu().view(torch.uint8), ref.scale.view(torch.uint8))
    assert torch.equal(xq.data.cpu(), ref.data)
    assert xq.global_scale.item() == ref.global_scale.item()


def test_nvfp4_act_quant_bit_exact_random():
    """Random bf16 rows: codes, block scales and the (nudged) global scale equal the library's."""
    from qcompile.formats import quantize

    x = (torch.randn(4, 512, generator=torch.Generator().manual_seed(5)) * 3).to(torch.bfloat16)
    xq = quantize_act_fp4(x.to(DEV), "nvfp4")
    ref = quantize(x.double(), QuantSpec("nvfp4"))
    assert xq.global_scale.item() == ref.global_scale.item()
    assert torch.equal(xq.scale.cpu().view(torch.uint8), ref.scale.view(torch.uint8))
    assert torch.equal(xq.data.cpu(), ref.data)
