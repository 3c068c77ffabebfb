"""Repacked tensors run in ONNX Runtime and give the formats library's dequantization: one-node ONNX
graphs built here from the repack functions' outputs, on random data, against a float64 reference
``x · dequantize(qt)ᵀ``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from qcompile.formats import QuantSpec, dequantize, fake_quantize, quantize  # noqa: E402
from qcompile.onnx_export import ops, repack  # noqa: E402

N, M = 24, 5


def _session(nodes, inputs, outputs, initializers):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ops.OPSET),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10  # opset 21's; onnx's newest (14) is more than ONNX Runtime 1.30 reads
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _tensor(name: str, t: torch.Tensor) -> onnx.TensorProto:
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        kind = TensorProto.FLOAT8E4M3FN if t.dtype == torch.float8_e4m3fn else TensorProto.FLOAT8E5M2
        return helper.make_tensor(name, kind, list(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes(), raw=True)
    return numpy_helper.from_array(t.contiguous().numpy(), name)


def _run_matmul_nbits(w: repack.NBitsWeight, x: torch.Tensor) -> np.ndarray:
    inits = [_tensor("B", w.b), _tensor("S", w.scales)]
    names = ["A", "B", "S"]
    if w.zero_points is not None:
        inits.append(_tensor("Z", w.zero_points))
        names.append("Z")
    node = helper.make_node("MatMulNBits", names, ["Y"], domain="com.microsoft", K=w.k, N=w.n, bits=w.bits,
                            block_size=w.block_size)
    s = _session([node], [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, w.k])],
                 [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, w.n])], inits)
    return s.run(None, {"A": x.numpy()})[0]


def _rel(got: np.ndarray, ref: torch.Tensor) -> float:
    ref = ref.numpy()
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize(("text", "k"), [
    ("int4-g128-asym", 200),   # K padded inside the last block
    ("int4-g32", 96),          # symmetric: default zero point 8, no zero_points input
    ("int4-g16-asym", 48),     # 3 blocks: zero points packed 2 per byte, last nibble padding
    ("int4-pc-asym", 100),     # per channel, K without a power-of-two divisor: padded with zero codes
    ("int8", 96),              # symmetric per channel: signed codes + 128
    ("int8-g64-asym", 128),
    ("int2-g64-asym", 192),
    ("int2-pc", 256),
    ("int3-g32", 64),          # into 4-bit containers
    ("int3-g64-asym", 128),
    ("int4-g128-asym", 64),    # K smaller than the block (tiny models under int4-g128)
])
def test_matmul_nbits_matches_float64_dequantization(text, k):
    spec = QuantSpec.parse(text)
    qt = quantize(torch.randn(N, k), spec)
    w = repack.to_matmul_nbits(qt)
    x = torch.randn(M, k)
    ref = x.double() @ dequantize(qt, torch.float64).t()
    assert _rel(_run_matmul_nbits(w, x), ref) < 1e-5
    # ops.py's eager MatMulNBits decodes the repacked tensors to exactly the formats library's weight
    decoded = ops.nbits_dequantize(w.b, w.scales, w.zero_points, w.k, w.n, w.bits, w.block_size)
    assert torch.equal(decoded, dequantize(qt))


def test_zero_points_are_packed_low_nibble_first_per_row():
    qt = quantize(torch.randn(2, 48), QuantSpec("int4", group_size=16, symmetric=False))
    w = repack.to_matmul_nbits(qt)
    z = qt.zero
    assert w.zero_points.shape == (2, 2)  # 3 blocks -> 2 bytes per row
    assert int(w.zero_points[1, 0]) == int(z[1, 0]) | (int(z[1, 1]) << 4)
    assert int(w.zero_points[1, 1]) == int(z[1, 2])
    assert w.b.shape == (2, 3, 8)


def test_per_channel_block_choice():
    assert repack.per_channel_block(384) == 128
    assert repack.per_channel_block(64) == 64
    assert repack.per_channel_block(48) == 16
    assert repack.per_channel_block(100) == 128  # no power-of-two divisor >= 16: padded


@pytest.mark.parametrize(("text", "match"), [
    ("int4-g24", "powers of two from 16"),
    ("int2-g512", "from 16 to 256"),
    ("nvfp4", "MatMulNBits takes"),
])
def test_unsupported_blocks_and_formats_raise(text, match):
    qt = quantize(torch.randn(4, 512), QuantSpec.parse(text))
    with pytest.raises(repack.RepackError, match=match):
        repack.to_matmul_nbits(qt)


@pytest.mark.parametrize("text", ["fp8_e4m3", "fp8_e5m2-g32", "fp8_e4m3-g64-scale:float32", "mxfp8"])
def test_dequantize_linear_matches_float64_dequantization(text):
    k = 128
    qt = quantize(torch.randn(N, k), QuantSpec.parse(text))
    w = repack.to_dequantize_linear(qt)
    attrs = {"axis": 0, "block_size": w.block_size} if w.block_size else {"axis": 1}
    nodes = [helper.make_node("DequantizeLinear", ["W", "S"], ["Wf"], **attrs), helper.make_node("MatMul", ["A", "Wf"], ["Y"])]
    s = _session(nodes, [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
                 [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, N])], [_tensor("W", w.data), _tensor("S", w.scale)])
    x = torch.randn(M, k)
    got = s.run(None, {"A": x.numpy()})[0]
    assert _rel(got, x.double() @ dequantize(qt, torch.float64).t()) < 1e-5


def _w8a8_session(b: torch.Tensor, b_scale: torch.Tensor, bias: torch.Tensor | None):
    """The W8A8 translation of ops.py, as one graph (the nodes ``_translate_int8_dynamic_matmul`` emits)."""
    k = b.shape[0]
    c = lambda name, v, dt: numpy_helper.from_array(np.array(v, dtype=dt), name)  # noqa: E731
    inits = [_tensor("B", b), _tensor("BS", b_scale), c("axes", [-1], np.int64), c("c127", 127, np.float32),
             c("tiny", torch.finfo(torch.float16).tiny, np.float32), c("top", 65504, np.float32), c("off", 128, np.uint8)]
    nodes = [helper.make_node("Abs", ["X"], ["a"]), helper.make_node("ReduceMax", ["a", "axes"], ["m"], keepdims=1),
             helper.make_node("Div", ["m", "c127"], ["s0"]), helper.make_node("Clip", ["s0", "tiny", "top"], ["s1"]),
             helper.make_node("Cast", ["s1"], ["s2"], to=TensorProto.FLOAT16), helper.make_node("Cast", ["s2"], ["s"], to=TensorProto.FLOAT),
             helper.make_node("Shape", ["s"], ["sh"]), helper.make_node("Expand", ["off", "sh"], ["zp"]),
             helper.make_node("QuantizeLinear", ["X", "s", "zp"], ["q"], axis=-1, block_size=k),
             helper.make_node("MatMulInteger", ["q", "B", "off"], ["acc"]), helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["s", "BS"], ["sc"]), helper.make_node("Mul", ["accf", "sc"], ["y0" if bias is not None else "Y"])]
    if bias is not None:
        inits.append(_tensor("bias", bias))
        nodes += [helper.make_node("Neg", ["bias"], ["nb"]), helper.make_node("Sub", ["y0", "nb"], ["Y"])]
    return _session(nodes, [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, None, k])],
                    [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, None, b.shape[1]])], inits)


@pytest.mark.parametrize("with_bias", [False, True])
def test_w8a8_is_bit_exact_in_onnxruntime(with_bias):
    """Given the same input, ORT's W8A8 (after its MatMulIntegerToFloat fusion) equals the exact integer
    reference up to the float32 rounding of the rescale (same int8 codes, same int32 products), and the
    float64 reference ``fake_quantize(x) · dequantize(W)ᵀ``; with a bias too (ORT would scale a bias fused
    into MatMulIntegerToFloat by the per-token scale: an error of ``bias · (s - 1)``)."""
    k = 96
    qt = quantize(torch.randn(N, k), QuantSpec("int8"))
    w = repack.to_matmul_integer(qt)
    bias = torch.randn(N) if with_bias else None
    x = torch.randn(2, 7, k) * torch.linspace(0.1, 10, 7).reshape(1, 7, 1)
    got = _w8a8_session(w.b, w.scale, bias).run(None, {"X": x.numpy()})[0]
    exact = ops.int8_dynamic_matmul(x, w.b, w.scale, bias, "float16")
    assert _rel(got, exact) < 1e-6
    act = QuantSpec("int8", dynamic=True)
    ref = fake_quantize(x, act).double() @ dequantize(qt, torch.float64).t() + (bias.double() if with_bias else 0)
    assert _rel(got, ref) < 1e-5
