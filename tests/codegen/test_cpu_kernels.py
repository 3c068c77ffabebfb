"""The CPU kernels of quantized_linear against float64 references, their dispatch, cache and report."""

import gc
import warnings

import pytest
import torch

import qcompile
from qcompile.codegen import quantized_linear as ql
from qcompile.codegen.cpu import dispatch, kernels, weight_cache
from qcompile.codegen.op_schema import QuantizedLinearCall
from qcompile.formats import QuantSpec, dequantize, fake_quantize, quantize
from qcompile.report import Report

SPLIT_TOL = 1e-3
"""int8 weight-only on _int_mm: x written as two int8 terms, error <= amax/64516 per element (3e-5
measured on Gaussian x, 3e-4 with the tests' 50x outlier channel: still 8x below bf16's)."""
BF16_TOL = 6e-3
"""x and the output rounded to bfloat16 (2^-9 each), int4 scales too: measured <= 3.5e-3 relative."""


def _op(x, qt, bias=None, act=None):
    call = QuantizedLinearCall.for_weight(x, qt, qt.tensors(), bias, act)
    return torch.ops.qcompile.quantized_linear(*call.op_args())


def _ref64(x, qt, bias=None, act=None):
    xq = fake_quantize(x.float(), act).double() if act is not None else x.double()
    y = xq @ dequantize(qt, torch.float64).t()
    return y + bias.double() if bias is not None else y


def _rel(y, ref):
    return float((y.double() - ref).norm() / ref.norm())


PACKED = [  # spec, N, K: odd K, K not a multiple of the group, N not a multiple of 16, big groups
    (QuantSpec("int4", 32, symmetric=True), 48, 96, kernels.INT4PACK_GROUPS[-1]),
    (QuantSpec("int4", 128, symmetric=False), 40, 200, 128),
    (QuantSpec("int4", 64, symmetric=False, scale_dtype="bfloat16"), 32, 128, 64),
    (QuantSpec("int4", 512, symmetric=False), 16, 600, 256),
    (QuantSpec("int4", 0, symmetric=True), 24, 100, 128),
    (QuantSpec("int4", 0, symmetric=False, scale_dtype="float32"), 16, 64, 64),
    (QuantSpec("int8"), 24, 33, None),
]


@pytest.mark.parametrize("spec,n,k,group", PACKED, ids=[f"{s.encode()}-{n}x{k}" for s, n, k, _ in PACKED])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_packed_kernels_match_float64(spec, n, k, group, x_dtype):
    g = torch.Generator().manual_seed(n * k)
    qt = quantize(torch.randn(n, k, generator=g), spec)
    x, bias = torch.randn(2, 3, k, generator=g).to(x_dtype), torch.randn(n, generator=g)
    expected = dispatch.INT8PACK if spec.format == "int8" else dispatch.INT4PACK  # K < INT8_SPLIT_MIN_K
    assert dispatch.choose(spec, None, x_dtype, k, 6).kernel == expected
    if group is not None:
        assert kernels.pack_int4(qt).group == group
    y = _op(x, qt, bias)
    assert y.shape == (2, 3, n) and y.dtype == x_dtype
    assert _rel(y, _ref64(x, qt, bias)) < BF16_TOL


@pytest.mark.parametrize("m", [1, 5, dispatch.PACKED_MAX_M + 9, dispatch.INT8_SPLIT_MAX_M + 1])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16])
def test_int8_weight_only_runs_int_mm_on_a_two_term_expansion(m, x_dtype):
    """K >= INT8_SPLIT_MIN_K, above INT8PACK_MAX_M tokens (float16 x: from 1) up to INT8_SPLIT_MAX_M:
    float32 precision, not bf16's; outliers in x do not hurt (per-token scales)."""
    k = dispatch.INT8_SPLIT_MIN_K
    g = torch.Generator().manual_seed(m)
    qt = quantize(torch.randn(16, k, generator=g), QuantSpec("int8"))
    x = torch.randn(m, k, generator=g)
    x[:, 3] *= 50
    x = x.to(x_dtype)
    if m > dispatch.INT8_SPLIT_MAX_M:
        expected = dispatch.DEQUANT_CACHED
    elif m <= dispatch.INT8PACK_MAX_M and x_dtype == torch.float32:
        expected = dispatch.INT8PACK  # few tokens: int8pack (bf16) is faster
    else:
        expected = dispatch.INT8_SPLIT
    assert dispatch.choose(qt.spec, None, x_dtype, k, m).kernel == expected
    assert dispatch.choose(qt.spec, None, x_dtype, k - 1, max(m, 17)).kernel == dispatch.DEQUANT_CACHED  # narrow
    ref = _ref64(x, qt)
    assert _rel(kernels.int8_split_linear(x.reshape(m, k), qt), ref) < SPLIT_TOL
    tol = BF16_TOL if expected == dispatch.INT8PACK else SPLIT_TOL
    assert _rel(_op(x, qt), ref) < tol


def test_int8pack_serves_a_torch_without_int_mm(monkeypatch):
    k = dispatch.INT8_SPLIT_MIN_K
    qt = quantize(torch.randn(32, k), QuantSpec("int8"))
    monkeypatch.delattr(torch, "_int_mm")
    dispatch._choose.cache_clear()
    try:
        assert dispatch.choose(qt.spec, None, torch.float32, k, 8).kernel == dispatch.INT8PACK
    finally:
        dispatch._choose.cache_clear()


def test_int8_codes_off_an_alignment_boundary():
    """torch's int8 kernel crashes on codes 8 bytes past a 64-byte boundary (as safetensors can
    hand them out): they are packed as an aligned copy."""
    qt = quantize(torch.randn(64, 64), QuantSpec("int8"))
    buf = torch.zeros(qt.data.numel() + 64, dtype=torch.int8)
    start = (-buf.data_ptr() % 64) + 8
    qt.data = buf[start:start + qt.data.numel()].view(64, 64).copy_(qt.data)
    assert qt.data.data_ptr() % kernels.INT8PACK_ALIGNMENT == 8
    x = torch.randn(4, 64)
    y = kernels.int8pack_linear(x, qt.data, kernels.pack_int8(qt))
    assert _rel(y, _ref64(x, qt)) < BF16_TOL


def test_int4_zero_convention_is_ours():
    """Asymmetric codes far from 8: torch's float zero must be (8 - z) * s, not z or -z * s (those miss
    by > 30%). The zero 8 * s rounded to bfloat16 shifts a whole group by up to s / 64: 0.74% here."""
    w = torch.rand(32, 64) * 3 + 1  # all positive: zero point 0, codes 0..15
    qt = quantize(w, QuantSpec("int4", 32, symmetric=False))
    assert int(qt.zero.max()) == 0
    x = torch.randn(1, 64)
    assert _rel(kernels.int4pack_linear(x, kernels.pack_int4(qt)), _ref64(x, qt)) < 1e-2


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_w8a8_int_mm_is_the_simulated_reference(x_dtype):
    g = torch.Generator().manual_seed(3)
    qt = quantize(torch.randn(24, 70, generator=g), QuantSpec("int8"))
    act = QuantSpec("int8", dynamic=True)
    x, bias = (torch.randn(5, 70, generator=g) * 3).to(x_dtype), torch.randn(24, generator=g)
    for m in (1, 5):
        assert dispatch.choose(qt.spec, act, x_dtype, 70, m).kernel == dispatch.INT_MM
    y = _op(x, qt, bias, act)
    tol = 1e-6 if x_dtype == torch.float32 else 1e-2
    assert _rel(y, _ref64(x, qt, bias, act)) < tol


def test_w8a8_per_tensor_int_mm_is_the_simulated_reference():
    """Per-tensor uint8 activations (ONNX's DynamicQuantizeLinear) on torch._int_mm: codes offset to int8
    and the zero point's column-sum term subtracted give the same integer products as the reference."""
    g = torch.Generator().manual_seed(4)
    qt = quantize(torch.randn(24, 70, generator=g), QuantSpec("int8"))
    act = QuantSpec.parse("int8-pt-asym-scale:float32-dynamic")
    bias = torch.randn(24, generator=g)
    for m, shift in ((1, 0.0), (7, 2.5), (40, -4.0)):  # positive and negative skew: zero points far from 128
        x = torch.randn(m, 70, generator=g) * 3 + shift
        assert dispatch.choose(qt.spec, act, torch.float32, 70, m).kernel == dispatch.INT_MM
        assert _rel(_op(x, qt, bias, act), _ref64(x, qt, bias, act)) < 1e-6
    x3 = torch.randn(2, 3, 70, generator=g)  # one scale for the whole tensor, whatever its rank
    assert _rel(_op(x3, qt, None, act), _ref64(x3, qt, None, act)) < 1e-6


FALLBACK = [  # no packed kernel: float32 GEMM on the cached dequantized weight, bitwise the reference
    (QuantSpec("nvfp4"), None, torch.float32),
    (QuantSpec("int4", 16, symmetric=False), None, torch.float32),
    (QuantSpec("int8", 32), None, torch.bfloat16),
    (QuantSpec("int8", symmetric=False), None, torch.float32),
    (QuantSpec("int4", 32), None, torch.float16),
    (QuantSpec("int4", 128, symmetric=False), QuantSpec("int4", dynamic=True), torch.float32),
    (QuantSpec("int8"), QuantSpec("int8", 32, dynamic=True), torch.float32),
]


@pytest.mark.parametrize("spec,act,x_dtype", FALLBACK, ids=[f"{s.short()}-{a.short() if a else 'a16'}-{d}"
                                                            for s, a, d in FALLBACK])
def test_dequant_cached_is_the_reference_bit_for_bit(spec, act, x_dtype):
    g = torch.Generator().manual_seed(7)
    qt = quantize(torch.randn(20, 96, generator=g), spec)
    x, bias = torch.randn(3, 96, generator=g).to(x_dtype), torch.randn(20, generator=g)
    assert dispatch.choose(spec, act, x_dtype, 96, 1).kernel == dispatch.DEQUANT_CACHED
    assert torch.equal(_op(x, qt, bias, act), ql.reference_quantized_linear(x, qt, bias, act))


def test_large_m_runs_float32_on_the_cached_weight():
    qt = quantize(torch.randn(32, 64), QuantSpec("int4", 32, symmetric=False))
    small, large = torch.randn(dispatch.PACKED_MAX_M, 64), torch.randn(dispatch.PACKED_MAX_M + 1, 64)
    assert dispatch.choose(qt.spec, None, torch.float32, 64, small.shape[0]).kernel == dispatch.INT4PACK
    assert dispatch.choose(qt.spec, None, torch.float32, 64, large.shape[0]).kernel == dispatch.DEQUANT_CACHED
    assert torch.equal(_op(large, qt), ql.reference_quantized_linear(large, qt, None, None))
    assert not torch.equal(_op(small, qt), ql.reference_quantized_linear(small, qt, None, None))  # bfloat16


def test_float64_runs_the_reference():
    qt = quantize(torch.randn(16, 32), QuantSpec("int4", 32))
    x = torch.randn(2, 32, dtype=torch.float64)
    assert dispatch.choose(qt.spec, None, torch.float64, 32, 2).kernel == dispatch.REFERENCE
    torch.testing.assert_close(_op(x, qt), x @ dequantize(qt, torch.float64).t(), rtol=1e-12, atol=1e-12)


def test_pack_once_and_rebuild_when_the_weight_changes(monkeypatch):
    weight_cache.clear()
    builds = []
    real = kernels.pack_int4
    monkeypatch.setattr(kernels, "pack_int4", lambda qt: builds.append(1) or real(qt))
    qt = quantize(torch.randn(32, 64), QuantSpec("int4", 32, symmetric=False))
    x = torch.randn(1, 64)
    _op(x, qt), _op(x, qt)
    assert len(builds) == 1
    other = quantize(torch.randn(32, 64), qt.spec)
    for name, t in qt.tensors().items():  # load_state_dict's in-place copy
        t.copy_(other.tensors()[name])
    y = _op(x, qt)
    assert len(builds) == 2 and _rel(y, _ref64(x, other)) < BF16_TOL


@pytest.mark.parametrize("spec", [QuantSpec("nvfp4"), QuantSpec("int8", symmetric=False), QuantSpec("int4", 32)], ids=str)
def test_cache_entry_dies_with_its_weight(spec):
    weight_cache.clear()
    qt = quantize(torch.randn(32, 64), spec)
    _op(torch.randn(1, 64), qt)
    assert len(weight_cache._cache) == 1
    del qt
    gc.collect()
    assert len(weight_cache._cache) == 0 and weight_cache.dequant_cached_bytes() == 0


def test_inference_tensors_are_not_cached_and_say_so():
    weight_cache._warned.clear()
    with torch.inference_mode():
        qt = quantize(torch.randn(32, 64), QuantSpec("int4", 32))
    x = torch.randn(1, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = _op(x, qt)
    assert any("inference tensors" in str(c.message) for c in caught)
    assert _rel(y, _ref64(x, qt)) < BF16_TOL


def test_full_dequant_cache_says_so_and_keeps_the_packed_kernel(monkeypatch):
    weight_cache.clear()
    dispatch._warned.clear()
    monkeypatch.setenv("QCOMPILE_CPU_DEQUANT_CACHE_MB", "0")
    qt = quantize(torch.randn(32, 64), QuantSpec("int4", 32, symmetric=False))
    x = torch.randn(dispatch.PACKED_MAX_M + 1, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = _op(x, qt)
        _op(x, qt)
    messages = [str(c.message) for c in caught if "cache is full" in str(c.message)]
    assert len(messages) == 1 and dispatch.INT4PACK in messages[0]
    assert weight_cache.dequant_cached_bytes() == 0
    assert _rel(y, _ref64(x, qt)) < BF16_TOL


def _tiny():
    return torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.GELU(), torch.nn.Linear(48, 32)).eval()


def test_report_names_the_kernel_per_layer_and_round_trips():
    cm = qcompile.compile(_tiny(), torch.randn(2, 64), target="cpu", recipe="w4a16", progress=False, verify=False)
    report = cm.report()
    assert all(layer.kernel.startswith(dispatch.INT4PACK) and dispatch.DEQUANT_CACHED in layer.kernel
               for layer in report.layers)
    assert any("bfloat16" in note for note in report.notes)
    assert "kernel" in str(report)
    again = Report.from_dict(report.to_dict())
    assert [layer.kernel for layer in again.layers] == [layer.kernel for layer in report.layers]
    legacy = report.to_dict()
    for layer in legacy["layers"]:
        del layer["kernel"], layer["kernel_notes"]
    assert Report.from_dict(legacy).layers[0].kernel == ""


@pytest.mark.parametrize("recipe,kernel,note", [
    ("w8a8", dispatch.INT_MM, None),
    ("w4a4", dispatch.DEQUANT_CACHED, "activations simulated"),
    ("nvfp4-w4a16", dispatch.DEQUANT_CACHED, "dequantized once to float32"),
])
def test_report_notes_simulated_and_fallback_layers(recipe, kernel, note):
    cm = qcompile.compile(_tiny(), torch.randn(2, 64), target="cpu", recipe=recipe, progress=False, verify=False)
    report = cm.report()
    assert [layer.kernel for layer in report.layers] == [kernel, kernel]
    matching = [n for n in report.notes if note and note in n]
    assert (len(matching) == 1 and "0, 2" in matching[0]) if note else not any("simulated" in n for n in report.notes)


def test_report_on_a_gpu_target_names_triton_or_reference():
    w4a16, _ = ql.describe_kernel("triton", True, QuantSpec("int4", 128, symmetric=False), None, torch.bfloat16, 256)
    assert w4a16.startswith("triton:")
    w8a8, notes = ql.describe_kernel("triton", True, QuantSpec("int8"), QuantSpec("int8", dynamic=True),
                                     torch.bfloat16, 256)
    assert w8a8 == "reference" and "fake-quantized" in notes[0]
    nvfp4, notes = ql.describe_kernel("triton", True, QuantSpec("nvfp4"), QuantSpec("nvfp4", dynamic=True),
                                      torch.bfloat16, 256)
    assert nvfp4 == "triton:w4a4" and "emulated" in notes[0]


def test_a_torch_without_the_packed_op_falls_back_and_says_why(monkeypatch):
    """torch 2.11-2.13 all have the ops; an older or trimmed build takes the cached float32 path."""
    monkeypatch.setattr(kernels, "has_op", lambda name: False)
    dispatch._choose.cache_clear()
    try:
        choice = dispatch.choose(QuantSpec("int4", 32), None, torch.float32, 64, 1)
        kernel, notes = dispatch.describe(QuantSpec("int4", 32), None, torch.float32, 64)
    finally:
        dispatch._choose.cache_clear()
    assert choice.kernel == dispatch.DEQUANT_CACHED and "_weight_int4pack_mm_for_cpu" in choice.why
    assert kernel == dispatch.DEQUANT_CACHED and "_weight_int4pack_mm_for_cpu" in notes[0]
