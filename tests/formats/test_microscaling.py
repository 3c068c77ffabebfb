"""NVFP4 and OCP MX (MXFP4/MXFP8): scale semantics and element encodings."""

import pytest
import torch

from qcompile.formats import QuantSpec, dequantize, fp4_e2m1_decode, quantize, unpack_bits

from .helpers import gaussian


def test_nvfp4_layout_and_formula() -> None:
    w = gaussian(4, 64, seed=6) * 3
    qt = quantize(w, QuantSpec("nvfp4"))
    assert qt.spec.group_size == 16
    assert qt.data.dtype == torch.uint8 and qt.data.shape == (4, 32)
    assert qt.scale.dtype == torch.float8_e4m3fn and qt.scale.shape == (4, 4)
    gs = qt.global_scale
    assert gs.dtype == torch.float32 and gs.dim() == 0
    amax = w.abs().max()
    assert torch.isclose(gs, amax / (6 * 448), rtol=2**-18, atol=0)
    block_amax = w.reshape(4, 4, 16).abs().amax(-1)
    expected_bs = ((block_amax / 6) / gs).clamp(max=448).to(torch.float8_e4m3fn)
    assert torch.equal(qt.scale.view(torch.uint8), expected_bs.view(torch.uint8))
    vals = fp4_e2m1_decode(unpack_bits(qt.data, 4, 64))
    per_elem = (qt.scale.float() * gs).repeat_interleave(16, 1)
    # Multiplication order (e2m1·bs)·gs vs e2m1·(bs·gs) may differ in the last ulp.
    assert torch.allclose(dequantize(qt), vals * per_elem, rtol=2**-22, atol=0)
    # The tensor's largest block uses the top of the e4m3 range.
    assert qt.scale.float().max() == 448.0


def test_nvfp4_block_scales_representable_in_e4m3() -> None:
    w = gaussian(8, 256, seed=7) * torch.logspace(-3, 3, 256)
    qt = quantize(w, QuantSpec("nvfp4"))
    f = qt.scale.float()
    assert torch.isfinite(f).all() and (f >= 0).all() and f.max() <= 448
    assert torch.equal(f.to(torch.float8_e4m3fn).float(), f)


def test_nvfp4_zero_tensor_and_underflowing_blocks() -> None:
    qt = quantize(torch.zeros(2, 32), QuantSpec("nvfp4"))
    assert qt.global_scale.item() == 1.0
    assert torch.equal(dequantize(qt), torch.zeros(2, 32))
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 16] = 1e6, 1e-6  # second block's scale underflows e4m3 → decodes to 0
    deq = dequantize(quantize(w, QuantSpec("nvfp4")))
    assert torch.isfinite(deq).all() and deq[0, 16] == 0
    assert torch.isclose(deq[0, 0], torch.tensor(1e6), rtol=1e-5)


@pytest.mark.parametrize(("fmt", "emax"), [("mxfp4", 2), ("mxfp8", 8)])
def test_mx_scales_are_powers_of_two(fmt: str, emax: int) -> None:
    w = gaussian(8, 128, seed=8) * torch.logspace(-4, 4, 128)
    qt = quantize(w, QuantSpec(fmt))
    assert qt.scale.dtype == torch.uint8 and qt.scale.shape == (8, 4)
    exp = qt.scale.long() - 127
    amax = w.reshape(8, 4, 32).abs().amax(-1).double()
    assert torch.equal(exp, torch.floor(torch.log2(amax)).long() - emax)
    scale = torch.exp2(exp.double())
    assert torch.equal(torch.log2(scale), torch.round(torch.log2(scale)))


def test_mxfp4_elements_and_saturation() -> None:
    w = torch.tensor([[7.5] + [1.0] * 31])  # amax 7.5 → exponent 0, 7.5 saturates to 6
    qt = quantize(w, QuantSpec("mxfp4"))
    assert qt.scale.tolist() == [[127]]
    assert qt.data.shape == (1, 16)
    deq = dequantize(qt)
    assert deq[0, 0] == 6.0 and torch.all(deq[0, 1:] == 1.0)


def test_mxfp8_elements_are_e4m3() -> None:
    w = gaussian(2, 64, seed=9)
    qt = quantize(w, QuantSpec("mxfp8"))
    assert qt.data.dtype == torch.float8_e4m3fn and qt.data.shape == (2, 64)
    s = torch.exp2(qt.scale.float() - 127).repeat_interleave(32, 1)
    expected = (w / s).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(qt.data.view(torch.uint8), expected.view(torch.uint8))
    assert torch.equal(dequantize(qt), expected.float() * s)


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8"])
def test_mx_zero_and_extreme_blocks(fmt: str) -> None:
    w = torch.zeros(1, 96)
    w[0, 32] = 1e-44  # subnormal float32: exponent clamps to -127
    w[0, 64] = 3e38
    qt = quantize(w, QuantSpec(fmt))
    assert qt.scale[0, 0] == 0  # all-zero block → 2**-127, small and finite
    assert qt.scale.max() <= 254  # 255 is E8M0 NaN
    deq = dequantize(qt)
    assert torch.isfinite(deq).all() and torch.all(deq[0, :32] == 0)
    assert torch.isclose(deq[0, 64], torch.tensor(3e38), rtol=0.25)
