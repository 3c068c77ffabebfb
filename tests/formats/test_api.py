"""Public API: validation, padding, sizes, fake_quantize, error metric, accuracy bounds."""

import pytest
import torch

from qcompile.formats import (
    FORMATS,
    PER_CHANNEL,
    PER_TENSOR,
    QuantizedTensor,
    QuantSpec,
    bits_per_weight,
    dequantize,
    fake_quantize,
    quantization_error,
    quantize,
)

from .helpers import gaussian, same_bits

ALL_SPECS = [QuantSpec(f, 32) if f not in ("nvfp4", "mxfp4", "mxfp8") else QuantSpec(f) for f in FORMATS]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_rejected(bad: float) -> None:
    w = torch.ones(2, 8)
    w[1, 3] = bad
    with pytest.raises(ValueError, match="tensor contains NaN or Inf"):
        quantize(w, QuantSpec("int4"))


@pytest.mark.parametrize("shape", [(8,), (2, 3, 8), ()])
def test_non_2d_rejected(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.ones(shape), QuantSpec("int4"))


def test_other_input_errors() -> None:
    with pytest.raises(ValueError, match="floating-point"):
        quantize(torch.ones(2, 8, dtype=torch.int32), QuantSpec("int8"))
    with pytest.raises(ValueError, match="empty|K >= 1"):
        quantize(torch.ones(2, 0), QuantSpec("int8"))


def test_bad_specs_rejected() -> None:
    with pytest.raises(ValueError, match="group_size must be >= 0"):
        QuantSpec("int4", -32)
    with pytest.raises(ValueError, match="blocks of 16"):
        QuantSpec("nvfp4", 32)
    with pytest.raises(ValueError, match="blocks of 32"):
        QuantSpec("mxfp4", 16)
    with pytest.raises(ValueError, match="unknown format"):
        QuantSpec("int5")
    with pytest.raises(ValueError, match="asymmetric"):
        QuantSpec("fp8_e4m3", symmetric=False)
    with pytest.raises(ValueError, match="scale_dtype"):
        quantize(torch.ones(2, 8), QuantSpec("int4", scale_dtype="float8"))


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.short())
def test_padding_k100_group32(spec: QuantSpec) -> None:
    w = gaussian(3, 100, seed=10)
    qt = quantize(w, spec)
    g = spec.group_size
    n_groups = -(-100 // g)
    assert qt.shape == (3, 100)
    assert qt.scale.shape == (3, n_groups)
    assert qt.padded_k == n_groups * g
    packed = {8: n_groups * g, 4: n_groups * g // 2, 3: n_groups * g * 3 // 8, 2: n_groups * g // 4}
    assert qt.data.shape == (3, packed[spec.bits])
    deq = dequantize(qt)
    assert deq.shape == (3, 100) and deq.dtype == torch.float32
    assert all(same_bits(qt, quantize(deq, spec)).values())


def test_per_channel_odd_k_packs_to_whole_bytes() -> None:
    for fmt, width in (("int4", 4), ("int3", 3), ("int2", 2), ("fp4_e2m1", 4)):
        qt = quantize(gaussian(2, 7), QuantSpec(fmt, PER_CHANNEL))
        assert qt.scale.shape == (2, 1) and qt.data.shape == (2, width)
        assert dequantize(qt).shape == (2, 7)


def test_int4_g128_bytes() -> None:
    rows, k = 64, 1024
    qt = quantize(gaussian(rows, k), QuantSpec("int4", 128))
    ratio = qt.nbytes() / (rows * k * 2)
    assert 0.25 <= ratio <= 0.27


@pytest.mark.parametrize(
    ("spec", "bpw"),
    [(QuantSpec("int4", 128), 4.125), (QuantSpec("int4", 128, False), 4.1875),
     (QuantSpec("int8", 64, scale_dtype="float32"), 8.5), (QuantSpec("int3", 128), 3.125),
     (QuantSpec("int2", 64, False, "bfloat16"), 2.375), (QuantSpec("fp8_e4m3", 128), 8.125),
     (QuantSpec("fp4_e2m1", 32), 4.5), (QuantSpec("nvfp4"), 4.5), (QuantSpec("mxfp4"), 4.25),
     (QuantSpec("mxfp8"), 8.25), (QuantSpec("int8"), 8 + 16 / 4096)],
)
def test_bits_per_weight(spec: QuantSpec, bpw: float) -> None:
    assert bits_per_weight(spec, 4096) == pytest.approx(bpw)


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.short())
def test_bits_per_weight_matches_nbytes(spec: QuantSpec) -> None:
    rows, k = 4, 100
    qt = quantize(gaussian(rows, k), spec)
    extra = 32 if spec.format == "nvfp4" else 0
    assert qt.nbytes() * 8 - extra == pytest.approx(bits_per_weight(spec, k) * rows * k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.short())
def test_fake_quantize_matches_quantize_dequantize(spec: QuantSpec, dtype: torch.dtype) -> None:
    x = gaussian(6, 70, seed=11).to(dtype).reshape(2, 3, 70)
    fq = fake_quantize(x, spec)
    assert fq.shape == x.shape and fq.dtype == dtype
    ref = dequantize(quantize(x.reshape(6, 70), spec), dtype).reshape(2, 3, 70)
    assert torch.equal(fq, ref)


PER_TENSOR_UINT8 = QuantSpec("int8", PER_TENSOR, symmetric=False, scale_dtype="float32", dynamic=True)


def _dynamic_quantize_linear(x: torch.Tensor) -> torch.Tensor:
    """ONNX's DynamicQuantizeLinear as its specification writes it, then dequantized (float32 arithmetic)."""
    lo, hi = x.min().clamp(max=0.0), x.max().clamp(min=0.0)
    scale = (hi - lo) / 255 if hi > lo else torch.tensor(1.0)
    zero = torch.round(-lo / scale).clamp(0, 255)
    return ((torch.round(x / scale) + zero).clamp(0, 255) - zero) * scale


def test_per_tensor_activation_spec() -> None:
    """One scale and zero point for a whole activation tensor, bit-exact with ONNX's DynamicQuantizeLinear;
    weights and non-integer formats cannot take it."""
    assert PER_TENSOR_UINT8.short() == "int8-pt-asym"
    assert QuantSpec.parse(PER_TENSOR_UINT8.encode()) == PER_TENSOR_UINT8
    for shift in (0.0, 3.0, -3.0):
        x = gaussian(6, 70, seed=12).reshape(2, 3, 70) * 2 + shift
        fq = fake_quantize(x, PER_TENSOR_UINT8)
        assert torch.equal(fq, _dynamic_quantize_linear(x))
        assert len(torch.unique(fq)) <= 256
    assert torch.equal(fake_quantize(torch.zeros(2, 8), PER_TENSOR_UINT8), torch.zeros(2, 8))
    with pytest.raises(ValueError, match="per-tensor scales .* dynamic integer activations"):
        QuantSpec("int8", PER_TENSOR)
    with pytest.raises(ValueError, match="per-tensor scales .* dynamic integer activations"):
        QuantSpec("fp8_e4m3", PER_TENSOR, dynamic=True)
    with pytest.raises(ValueError, match="per-tensor scales are for dynamic activations"):
        quantize(torch.ones(2, 8), PER_TENSOR_UINT8)


def test_fake_quantize_1d_and_empty() -> None:
    x = torch.linspace(-1, 1, 40)
    assert torch.equal(fake_quantize(x, QuantSpec("int8")), dequantize(quantize(x[None], QuantSpec("int8")))[0])
    assert fake_quantize(torch.ones(0, 8), QuantSpec("int4")).shape == (0, 8)


def test_float64_stays_float64() -> None:
    w = gaussian(4, 64).double() * 1e-3 + 1.0
    qt = quantize(w, QuantSpec("int8", 32, scale_dtype="float32"))
    deq = dequantize(qt, torch.float64)
    assert deq.dtype == torch.float64
    assert torch.equal(fake_quantize(w, qt.spec), deq)


def test_quantization_error() -> None:
    w = gaussian(8, 64)
    qt = quantize(w, QuantSpec("int4", 32))
    expected = (torch.linalg.norm(w.double() - dequantize(qt).double()) / torch.linalg.norm(w.double())).item()
    assert quantization_error(w, qt) == pytest.approx(expected)
    assert quantization_error(torch.zeros(2, 8), quantize(torch.zeros(2, 8), QuantSpec("int4"))) == 0.0


# Measured on randn(64, 1024), seed 0 (see docs/formats.md); bounds carry ~30% headroom.
ERROR_BOUNDS = [
    (QuantSpec("int8"), 0.0080), (QuantSpec("int8", 128), 0.0065), (QuantSpec("int8", 128, False), 0.0059),
    (QuantSpec("int4"), 0.1446), (QuantSpec("int4", 128), 0.1175), (QuantSpec("int4", 128, False), 0.1006),
    (QuantSpec("int3", 128), 0.2737), (QuantSpec("int3", 128, False), 0.2159),
    (QuantSpec("int2", 128), 0.7696), (QuantSpec("int2", 128, False), 0.5053),
    (QuantSpec("fp8_e4m3"), 0.0264), (QuantSpec("fp8_e5m2"), 0.0528),
    (QuantSpec("fp4_e2m1", 128), 0.1095), (QuantSpec("nvfp4"), 0.0955),
    (QuantSpec("mxfp4"), 0.1148), (QuantSpec("mxfp8"), 0.0294),
]


@pytest.mark.parametrize(("spec", "measured"), ERROR_BOUNDS, ids=lambda v: v.short() if isinstance(v, QuantSpec) else "")
def test_relative_error_bounds(spec: QuantSpec, measured: float) -> None:
    err = quantization_error(gaussian(64, 1024), quantize(gaussian(64, 1024), spec))
    assert err <= measured * 1.3
    assert err >= measured * 0.7  # a suspiciously *small* error means the check is broken


def test_error_ordering() -> None:
    w = gaussian(64, 1024)
    err = {f: quantization_error(w, quantize(w, QuantSpec(f, 32))) for f in ("int8", "int4", "int3", "int2")}
    assert err["int8"] < err["int4"] < err["int3"] < err["int2"]
    assert quantization_error(w, quantize(w, QuantSpec("nvfp4"))) < quantization_error(w, quantize(w, QuantSpec("mxfp4")))


def test_quantized_tensor_to_and_tensors() -> None:
    qt = quantize(gaussian(2, 32), QuantSpec("nvfp4"))
    moved = qt.to("cpu")
    assert isinstance(moved, QuantizedTensor)
    assert set(moved.tensors()) == {"data", "scale", "global_scale"}
    assert torch.equal(dequantize(moved), dequantize(qt))
