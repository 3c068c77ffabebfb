"""fp8 (e4m3/e5m2) and scaled fp4 e2m1: agree with torch casts, saturate, honour scale dtype."""

import pytest
import torch

from qcompile.formats import QuantSpec, dequantize, fp4_e2m1_decode, quantize, unpack_bits

from .helpers import gaussian

FP8 = [("fp8_e4m3", torch.float8_e4m3fn, 448.0), ("fp8_e5m2", torch.float8_e5m2, 57344.0)]


@pytest.mark.parametrize(("fmt", "dtype", "fmax"), FP8)
@pytest.mark.parametrize("group", [0, 32])
def test_fp8_matches_torch_cast(fmt: str, dtype: torch.dtype, fmax: float, group: int) -> None:
    w = gaussian(8, 96, seed=4) * 5
    qt = quantize(w, QuantSpec(fmt, group))
    assert qt.data.dtype == dtype and qt.data.shape == (8, 96)
    g = group or 96
    s = qt.scale.float().repeat_interleave(g, 1)
    expected = (w / s).clamp(-fmax, fmax).to(dtype)
    assert torch.equal(qt.data.view(torch.uint8), expected.view(torch.uint8))
    assert torch.equal(dequantize(qt), expected.float() * s)
    amax = w.reshape(8, -1, g).abs().amax(-1)
    assert torch.equal(qt.scale, (amax / fmax).half())


@pytest.mark.parametrize(("fmt", "dtype", "fmax"), FP8)
def test_fp8_saturates_without_nan(fmt: str, dtype: torch.dtype, fmax: float) -> None:
    # A fp16 scale that overflows is clamped to 65504: the group saturates, never NaN/Inf.
    w = torch.tensor([[3e38, 1.0, -3e38, 0.0]])
    qt = quantize(w, QuantSpec(fmt))
    data = qt.data.float()
    assert torch.isfinite(data).all() and data.abs().max() == fmax
    assert torch.isfinite(dequantize(qt)).all()


@pytest.mark.parametrize("sd", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "fp4_e2m1"])
def test_scale_dtype_honoured(fmt: str, sd: str) -> None:
    qt = quantize(gaussian(2, 64), QuantSpec(fmt, 32, scale_dtype=sd))
    assert qt.scale.dtype == getattr(torch, sd) and qt.scale.shape == (2, 2)


def test_fp4_scaled_by_amax_over_6() -> None:
    w = gaussian(4, 64, seed=5)
    qt = quantize(w, QuantSpec("fp4_e2m1", 16))
    assert qt.data.dtype == torch.uint8 and qt.data.shape == (4, 32)
    amax = w.reshape(4, 4, 16).abs().amax(-1)
    assert torch.equal(qt.scale, (amax / 6).half())
    vals = fp4_e2m1_decode(unpack_bits(qt.data, 4, 64))
    assert vals.abs().max() == 6.0
    assert torch.equal(dequantize(qt), vals * qt.scale.float().repeat_interleave(16, 1))


def test_all_zero_rows() -> None:
    for fmt in ("fp8_e4m3", "fp8_e5m2", "fp4_e2m1"):
        qt = quantize(torch.zeros(2, 33), QuantSpec(fmt, 16))
        assert torch.isfinite(qt.scale.float()).all()
        assert torch.equal(dequantize(qt), torch.zeros(2, 33))
