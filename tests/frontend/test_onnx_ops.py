"""Every op of the importer's table against ONNX Runtime, one single-node graph each, inputs as
graph inputs (the runtime tensor path; shape arithmetic on host values runs in the model tests)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from qcompile.frontend.onnx_import import import_onnx  # noqa: E402
from qcompile.frontend.onnx_ops import OPS  # noqa: E402

R = np.random.default_rng(0)
F = lambda *s: R.standard_normal(s).astype(np.float32)  # noqa: E731
P = lambda *s: (R.random(s) + 0.1).astype(np.float32)  # noqa: E731  positive
U = lambda *s: (R.random(s) * 1.8 - 0.9).astype(np.float32)  # noqa: E731  in (-1, 1)
I = lambda *v: np.array(v, dtype=np.int64)  # noqa: E731, E741
B = lambda *s: R.random(s) > 0.5  # noqa: E731

CASES: list[tuple] = [  # (op, inputs, constant inputs (name → array, after the graph inputs), attrs, opset, outputs)
    *[(op, [F(2, 3)], {}, {}, 17, 1) for op in ("Abs", "Atan", "Ceil", "Cos", "Cosh", "Erf", "Exp", "Floor", "Neg",
                                                "Relu", "Round", "Sigmoid", "Sign", "Sin", "Sinh", "Softplus",
                                                "Softsign", "Tan", "Tanh", "HardSwish", "Identity", "IsNaN")],
    *[(op, [U(2, 3)], {}, {}, 17, 1) for op in ("Acos", "Asin")],
    *[(op, [P(2, 3)], {}, {}, 17, 1) for op in ("Log", "Sqrt", "Reciprocal")],
    ("Mish", [F(2, 3)], {}, {}, 18, 1),
    ("IsInf", [np.array([1.0, np.inf, -np.inf], np.float32)], {}, {"detect_negative": 0}, 17, 1),
    ("Elu", [F(2, 3)], {}, {"alpha": 0.7}, 17, 1), ("Selu", [F(2, 3)], {}, {}, 17, 1),
    ("Celu", [F(2, 3)], {}, {"alpha": 1.5}, 17, 1), ("LeakyRelu", [F(2, 3)], {}, {"alpha": 0.2}, 17, 1),
    ("HardSigmoid", [F(2, 3)], {}, {"alpha": 0.3, "beta": 0.4}, 17, 1),
    ("Gelu", [F(2, 3)], {}, {"approximate": "tanh"}, 20, 1), ("Gelu", [F(2, 3)], {}, {}, 20, 1),
    ("Clip", [F(2, 3)], {"lo": np.float32(-0.5), "hi": np.float32(0.5)}, {}, 17, 1),
    ("Softmax", [F(2, 3, 4)], {}, {"axis": 1}, 17, 1), ("LogSoftmax", [F(2, 3)], {}, {"axis": 0}, 17, 1),
    *[(op, [F(2, 3), F(3)], {}, {}, 17, 1) for op in ("Add", "Sub", "Mul", "Div", "Equal", "Less", "LessOrEqual",
                                                      "Greater", "GreaterOrEqual", "Max", "Min", "Sum", "Mean")],
    ("Pow", [P(2, 3), F(2, 3)], {}, {}, 17, 1),
    ("Div", [I(7, -7, 9), I(2, 2, -4)], {}, {}, 17, 1),
    ("Mod", [I(7, -7, 9), I(3, 3, -4)], {}, {}, 17, 1),
    ("Mod", [F(2, 3), P(2, 3)], {}, {"fmod": 1}, 17, 1),
    *[(op, [B(2, 3), B(2, 3)], {}, {}, 17, 1) for op in ("And", "Or", "Xor")],
    ("Not", [B(2, 3)], {}, {}, 17, 1),
    ("Max", [F(2, 3), F(2, 3), F(3)], {}, {}, 17, 1),
    ("Where", [B(2, 3), F(2, 3), F(3)], {}, {}, 17, 1),
    ("Reshape", [F(2, 3, 4)], {"shape": I(0, -1)}, {}, 17, 1),
    ("Flatten", [F(2, 3, 4)], {}, {"axis": 2}, 17, 1),
    ("Unsqueeze", [F(2, 3)], {"axes": I(0, -1)}, {}, 17, 1),
    ("Squeeze", [F(2, 1, 3)], {"axes": I(1)}, {}, 17, 1),
    ("Concat", [F(2, 3), F(2, 2)], {}, {"axis": 1}, 17, 1),
    ("Transpose", [F(2, 3, 4)], {}, {"perm": [2, 0, 1]}, 17, 1),
    ("Slice", [F(5, 6)], {"starts": I(-1, 1), "ends": I(-100, 5), "axes": I(0, 1), "steps": I(-2, 2)}, {}, 17, 1),
    ("Expand", [F(3, 1)], {"shape": I(2, 1, 4)}, {}, 17, 1),
    ("Tile", [F(2, 3)], {"repeats": I(2, 1)}, {}, 17, 1),
    ("Split", [F(2, 7)], {"split": I(3, 4)}, {"axis": 1}, 17, 2),
    ("Split", [F(2, 7)], {}, {"axis": 1, "num_outputs": 3}, 18, 3),
    ("Pad", [F(2, 3)], {"pads": I(1, 0, 0, 2), "value": np.float32(1.5)}, {}, 17, 1),
    ("Pad", [F(2, 4)], {"pads": I(0, 1, 0, 2)}, {"mode": "reflect"}, 17, 1),
    ("Pad", [F(2, 4)], {"pads": I(1, 1, 1, 1)}, {"mode": "edge"}, 17, 1),
    ("Gather", [F(3, 4), I(-1, 0, 2)], {}, {"axis": 1}, 17, 1),
    ("Gather", [F(5, 4), np.array([[0, 4], [-1, 2]], np.int64)], {}, {}, 17, 1),
    ("GatherElements", [F(3, 4), np.array([[0, -1], [2, 1], [3, 3]], np.int64)], {}, {"axis": 1}, 17, 1),
    ("GatherND", [F(3, 4, 2), np.array([[0, 1], [2, -1]], np.int64)], {}, {}, 17, 1),
    ("ScatterND", [F(4, 3), np.array([[1], [3]], np.int64), F(2, 3)], {}, {}, 17, 1),
    ("Trilu", [F(4, 5)], {"k": I(1)}, {"upper": 0}, 17, 1),
    ("CumSum", [F(2, 4)], {"axis": I(1)}, {"exclusive": 1, "reverse": 1}, 17, 1),
    ("ConstantOfShape", [I(2, 3)], {}, {"value": numpy_helper.from_array(np.array([7], np.int64))}, 17, 1),
    ("Range", [np.array(1.0, np.float32), np.array(4.0, np.float32), np.array(0.5, np.float32)], {}, {}, 17, 1),
    ("Shape", [F(2, 3, 4)], {}, {"start": 1, "end": -1}, 17, 1), ("Size", [F(2, 3)], {}, {}, 17, 1),
    ("Cast", [F(2, 3) * 4], {}, {"to": TensorProto.INT32}, 17, 1),
    ("CastLike", [I(1, 2), F(1)], {}, {}, 17, 1),
    ("Dropout", [F(2, 3)], {}, {}, 17, 1),
    *[(op, [F(2, 3, 4)], {"axes": I(1, -1)}, {"keepdims": 0}, 18, 1)
      for op in ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceSumSquare")],
    ("ReduceSum", [F(2, 3)], {"axes": I(1)}, {}, 17, 1),
    ("ReduceMean", [F(2, 3)], {}, {"axes": [0], "keepdims": 1}, 17, 1),  # opset < 18: axes attribute
    ("ReduceSum", [F(2, 3)], {}, {"noop_with_empty_axes": 1}, 17, 1),
    ("ArgMax", [np.array([[1, 3, 3], [2, 2, 0]], np.float32)], {}, {"axis": 1, "keepdims": 0, "select_last_index": 1},
     17, 1),
    ("ArgMin", [F(3, 4)], {}, {"axis": 0}, 17, 1),
    ("MatMul", [F(2, 3, 4), F(4, 5)], {}, {}, 17, 1),
    ("Gemm", [F(4, 3), F(5, 4), F(5)], {}, {"transA": 1, "transB": 1, "alpha": 0.5, "beta": 2.0}, 17, 1),
    ("Einsum", [F(2, 3), F(3, 4)], {}, {"equation": "ij,jk->ik"}, 17, 1),
    ("LayerNormalization", [F(2, 3, 4), F(3, 4), F(3, 4)], {}, {"axis": -2, "epsilon": 1e-3}, 17, 1),
    ("RMSNormalization", [F(2, 4), F(4)], {}, {}, 23, 1),
]


def _case_id(case: tuple) -> str:
    return f"{case[0]}-{case[4]}"


def _single_node(op: str, inputs: list, consts: dict, attrs: dict, opset: int, outputs: int) -> onnx.ModelProto:
    names = [f"x{i}" for i in range(len(inputs))]
    outs = [f"y{i}" for i in range(outputs)]
    graph_inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape))
                    for n, a in zip(names, inputs)]
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()]
    node = helper.make_node(op, names + list(consts), outs, **attrs)
    graph = helper.make_graph([node], op, graph_inputs, [helper.make_empty_tensor_value_info(o) for o in outs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    return onnx.shape_inference.infer_shapes(model)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_op_matches_onnx_runtime(case):
    op, inputs, consts, attrs, opset, outputs = case
    model = _single_node(op, inputs, consts, attrs, opset, outputs)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = session.run(None, {f"x{i}": a for i, a in enumerate(inputs)})
    got = import_onnx(model)(*(torch.from_numpy(np.array(a)) for a in inputs))
    got = list(got) if isinstance(got, tuple) else [got]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.numpy().dtype == w.dtype and g.shape == w.shape, (g.dtype, w.dtype, g.shape, w.shape)
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-5, atol=1e-6)


def test_every_op_in_the_table_is_tested():
    """SimplifiedLayerNormalization is ONNX Runtime's (not in onnx's schemas): tested in test_onnx_import."""
    assert set(OPS) - {c[0] for c in CASES} == {"SimplifiedLayerNormalization"}
