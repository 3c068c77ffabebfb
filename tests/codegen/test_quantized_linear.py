"""The op lowered graphs call: reference path, Triton dispatch, and saying so when it falls back."""

import warnings

import pytest
import torch

import qcompile
from qcompile.codegen import gemm
from qcompile.codegen import quantized_linear as ql
from qcompile.codegen.op_schema import QuantizedLinearCall
from qcompile.formats import QuantSpec, dequantize, quantize

DEV = "cuda" if torch.cuda.is_available() else "cpu"
"""Where the forced-Triton tests run their kernels: natively on a GPU, else the interpreter."""


def _call(x, qt, bias=None, act=None):
    call = QuantizedLinearCall.for_weight(x, qt, qt.tensors(), bias, act)
    return torch.ops.qcompile.quantized_linear(*call.op_args())


@pytest.mark.parametrize("spec", [QuantSpec("int4", 32, symmetric=False), QuantSpec("int8"), QuantSpec("nvfp4")])
def test_reference_path_matches_float64(spec):
    w, x, b = torch.randn(24, 96), torch.randn(5, 96, dtype=torch.float64), torch.randn(24)
    qt = quantize(w, spec)
    out = _call(x, qt, b)  # float64 x: the reference on CPU (float32 takes qcompile.codegen.cpu)
    ref = x.double() @ dequantize(qt, torch.float64).t() + b.double()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_forced_triton_path_matches_reference():
    w, x = torch.randn(40, 64), torch.randn(3, 64, dtype=torch.float16)
    qt = quantize(w, QuantSpec("int4", 32, symmetric=False))
    ref = ql.reference_quantized_linear(x, qt, None, None)
    with gemm.force_triton():
        out = _call(x.to(DEV), qt.to(DEV))
    torch.testing.assert_close(out.float().cpu(), ref.float(), rtol=2e-2, atol=2e-2)


def test_float32_activations_run_the_reference_and_say_so():
    """The Triton kernels take 16-bit activations: a float32 model on CUDA once raised a TypeError here."""
    ql._warned.clear()
    w, x = torch.randn(40, 64), torch.randn(3, 64)
    qt = quantize(w, QuantSpec("int8"))
    with gemm.force_triton(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _call(x.to(DEV), qt.to(DEV))
    assert any("activations are torch.float32" in str(c.message) for c in caught)
    torch.testing.assert_close(out, _call(x.to(DEV), qt.to(DEV)))   # the device's own non-Triton path


def test_fallback_is_announced_once():
    ql._warned.clear()
    w, x = torch.randn(16, 64), torch.randn(2, 64, dtype=torch.float16)
    qt = quantize(w, QuantSpec("int4", 32, symmetric=False))
    act = QuantSpec("int4", dynamic=True)  # int4 activations: simulated, no kernel
    assert gemm.unsupported_reason(qt.spec, act, "cpu") is not None
    with gemm.force_triton(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _call(x, qt, act=act)
        _call(x, qt, act=act)
    messages = [str(c.message) for c in caught if "no Triton kernel" in str(c.message)]
    assert len(messages) == 1 and "int4" in messages[0]


def test_compiled_model_through_triton_kernels():
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.GELU(), torch.nn.Linear(48, 32)).eval()
    x = torch.randn(3, 64)
    cm = qcompile.compile(model.half(), x.half(), recipe="w4a16-g32", progress=False, verify=False)
    ref = cm(x.half())
    cm.to(DEV)
    with gemm.force_triton():
        out = cm(x.half().to(DEV))
    torch.testing.assert_close(out.float().cpu(), ref.float(), rtol=2e-2, atol=2e-2)
