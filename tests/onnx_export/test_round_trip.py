"""ONNX in → passes → ONNX out: a BERT exported by torch.onnx, compiled by qcompile from the ONNX file
with a rotated GPTQ recipe (online Hadamards, calibration), exported and run in ONNX Runtime, equals the
torch path's result of the same recipe on the same calibration."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import qcompile  # noqa: E402
from qcompile.ir.ops import HADAMARD_TRANSFORM  # noqa: E402
from tests.onnx_files import export_onnx_file, token_inputs  # noqa: E402
from tests.tiny_models import tiny_model  # noqa: E402


def test_onnx_in_passes_onnx_out_equals_the_torch_path(tmp_path):
    model = tiny_model("bert", layers=1)
    source = export_onnx_file(model, token_inputs(2, 8), tmp_path / "bert.onnx")
    calibration = [token_inputs(2, 8, seed=s) for s in (3, 4)]
    report = qcompile.export_onnx(source, token_inputs(2, 8), tmp_path / "bert-w4.onnx", recipe="w4a16-rotate-gptq",
                                  calibration=calibration, progress=False)
    assert any(layer.onnx_op.startswith("MatMulNBits(bits=4") for layer in report.layers)
    torch_path = qcompile.compile(model, token_inputs(2, 8), target="ort-cpu", recipe="w4a16-rotate-gptq",
                                  calibration=calibration, progress=False)

    assert any(n.target == HADAMARD_TRANSFORM for n in torch_path.graph_module.graph.nodes)  # online rotations

    fresh = token_inputs(3, 11, seed=9)
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    got = session.run(None, {i.name: fresh[i.name].numpy() for i in session.get_inputs()})[0]
    want = torch_path(**fresh)[0].detach().numpy()
    cosine = float(got.ravel().astype(np.float64) @ want.ravel() / np.linalg.norm(got) / np.linalg.norm(want))
    assert got.shape == want.shape and cosine >= 0.99999, cosine
