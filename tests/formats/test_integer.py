"""Integer formats: formulas, storage dtypes, zero points, degenerate groups."""

import pytest
import torch

from qcompile.formats import PER_CHANNEL, QuantSpec, dequantize, quantize
from qcompile.formats.packing import unpack_bits

from .helpers import gaussian, same_bits


def test_symmetric_int4_by_hand() -> None:
    w = torch.tensor([[-1.0, 0.5, 0.25, 1.0, 0.0, -0.3]])
    qt = quantize(w, QuantSpec("int4"))
    scale = torch.tensor(1.0 / 7).half()
    assert qt.scale.dtype == torch.float16 and qt.scale.item() == scale.item()
    q = torch.clamp(torch.round(w / scale.float()), -8, 7)
    codes = unpack_bits(qt.data, 4, 6)
    assert torch.equal(codes.long() - 8, q.long())
    assert torch.equal(dequantize(qt), q * scale.float())


def test_int8_symmetric_is_signed_unpacked() -> None:
    w = gaussian(4, 64)
    qt = quantize(w, QuantSpec("int8", 32))
    assert qt.data.dtype == torch.int8 and qt.data.shape == (4, 64)
    s = qt.scale.float().repeat_interleave(32, 1)
    assert torch.equal(qt.data.float(), torch.clamp(torch.round(w / s), -128, 127))


def test_int8_asymmetric_is_unsigned() -> None:
    qt = quantize(gaussian(4, 64) + 3, QuantSpec("int8", 32, symmetric=False))
    assert qt.data.dtype == torch.uint8 and qt.zero is not None
    assert qt.zero.dtype == torch.uint8 and qt.zero.shape == (4, 2)


@pytest.mark.parametrize("fmt", ["int8", "int4", "int3", "int2"])
def test_asymmetric_formula_and_exact_zero(fmt: str) -> None:
    spec = QuantSpec(fmt, 16, symmetric=False)
    w = gaussian(3, 48, seed=1) * 2 + 0.7
    w[:, 5] = 0.0
    qt = quantize(w, spec)
    qmax = 2**spec.bits - 1
    s = qt.scale.float()
    lo = w.reshape(3, 3, 16).amin(-1).clamp(max=0)
    assert torch.equal(qt.zero.float(), torch.clamp(torch.round(-lo / s), 0, qmax))
    deq = dequantize(qt)
    assert torch.all(deq[:, 5] == 0)  # zero is exactly representable
    # Dequantized values lie exactly on the stored grid: re-rounding them with the
    # stored scale and zero point reproduces the stored codes.
    regrid = torch.clamp(torch.round(deq.reshape(3, 3, 16) / s.unsqueeze(-1)) + qt.zero.float().unsqueeze(-1), 0, qmax)
    stored = qt.data if spec.bits == 8 else unpack_bits(qt.data, spec.bits, 48)
    assert torch.equal(regrid.reshape(3, 48), stored.float())


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("fmt", ["int8", "int4", "int3", "int2"])
def test_all_zero_groups(fmt: str, symmetric: bool) -> None:
    w = torch.zeros(3, 40)
    w[0, :8] = torch.arange(8.0)
    qt = quantize(w, QuantSpec(fmt, 8, symmetric))
    assert torch.isfinite(qt.scale.float()).all() and (qt.scale.float() > 0).all()
    deq = dequantize(qt)
    assert torch.isfinite(deq).all()
    assert torch.all(deq[1:] == 0) and torch.all(deq[0, 8:] == 0)


@pytest.mark.parametrize("sd", ["float16", "bfloat16", "float32"])
def test_scale_dtype_is_honoured_and_used_for_rounding(sd: str) -> None:
    w = gaussian(4, 128, seed=2)
    qt = quantize(w, QuantSpec("int4", 32, scale_dtype=sd))
    assert qt.scale.dtype == getattr(torch, sd)
    s = qt.scale.float().repeat_interleave(32, 1)
    q = torch.clamp(torch.round(w / s), -8, 7)
    assert torch.equal(dequantize(qt), q * s)


def test_huge_and_tiny_values_stay_finite() -> None:
    w = torch.tensor([[1e8, -3e7, 1.0, 0.0], [1e-30, -1e-30, 0.0, 0.0]])
    for sym in (True, False):
        qt = quantize(w, QuantSpec("int8", PER_CHANNEL, sym))
        assert torch.isfinite(qt.scale.float()).all() and torch.isfinite(dequantize(qt)).all()


def test_symmetric_round_trip_is_bit_exact() -> None:
    w = gaussian(16, 256, seed=3)
    for fmt in ("int8", "int4", "int3", "int2"):
        spec = QuantSpec(fmt, 64)
        qt = quantize(w, spec)
        assert all(same_bits(qt, quantize(dequantize(qt), spec)).values()), fmt
