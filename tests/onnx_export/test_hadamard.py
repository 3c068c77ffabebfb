"""The online Hadamard's ONNX form (ops.hadamard, lowering.hadamard_operands): ONNX Runtime's output
equals the float64 reference formats.orthogonal.hadamard_transform for powers of two, MiniLM's
384 / 1536 (block 12), Llama's 11008 (block 344), with and without signs, on dynamic batch and
sequence axes; each transform is at most five nodes, none a Shape, and no factor is n x n."""

from __future__ import annotations

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from qcompile.formats.orthogonal import hadamard_transform, rotation_factors  # noqa: E402
from qcompile.onnx_export import ops  # noqa: E402
from qcompile.onnx_export.lowering import hadamard_factors, hadamard_operands  # noqa: E402

CASES = [(64, True), (128, False), (384, True), (1536, True), (1536, False), (4096, True), (11008, True)]
"""(n, with signs); 384, 1536 = 2^k · 12 and 11008 = 32 · 344 have a Paley block."""


class _Transforms(torch.nn.Module):
    """One ``ops.hadamard`` per case, each on its own input."""

    def __init__(self):
        super().__init__()
        self.rotations = [rotation_factors(n, seed=5) for n, _ in CASES]
        for i, ((n, with_signs), rot) in enumerate(zip(CASES, self.rotations)):
            left, right = hadamard_operands(n, rot.block.float() if rot.block is not None else None, rot.scale)
            self.register_buffer(f"signs{i}", rot.signs.float() if with_signs else None)
            self.register_buffer(f"left{i}", left)
            self.register_buffer(f"right{i}", right)

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(ops.hadamard(x, getattr(self, f"signs{i}"), getattr(self, f"left{i}"),
                                  getattr(self, f"right{i}"), x.dim()) for i, x in enumerate(xs))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    module = _Transforms().eval()
    xs = tuple(torch.randn(2, 3, n) for n, _ in CASES)
    batch, seq = torch.export.Dim("batch", max=64), torch.export.Dim("seq", max=512)
    path = tmp_path_factory.mktemp("hadamard") / "h.onnx"
    torch.onnx.export(module, xs, str(path), dynamo=True, custom_translation_table=ops.TRANSLATIONS,
                      opset_version=ops.OPSET, optimize=True, dynamic_shapes=(tuple({0: batch, 1: seq} for _ in xs),))
    return module, path


def test_onnx_runtime_equals_the_float64_reference(exported):
    module, path = exported
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, 7, n, generator=gen) for n, _ in CASES]  # not the traced 2 x 3
    got = sess.run(None, {i.name: x.numpy() for i, x in zip(sess.get_inputs(), xs)})
    for (n, with_signs), rot, x, y in zip(CASES, module.rotations, xs, got):
        ref = hadamard_transform(x.double(), rot.signs if with_signs else None, rot.block, rot.scale)
        err = np.abs(y - ref.numpy()).max() / ref.abs().max().item()
        assert y.shape == (3, 7, n) and err < 1e-5, (n, with_signs, err)


def test_five_nodes_per_transform_no_shape_ops_no_dense_matrix(exported):
    _, path = exported
    model = onnx.load(str(path))
    kinds = [node.op_type for node in model.graph.node if node.op_type != "Constant"]
    with_signs = sum(s for _, s in CASES)
    assert len(kinds) == 4 * len(CASES) + with_signs, kinds
    assert kinds.count("Mul") == with_signs and kinds.count("MatMul") == 2 * len(CASES)
    assert kinds.count("Reshape") == 2 * len(CASES) and "Shape" not in kinds
    largest = max(int(np.prod(t.dims)) for t in model.graph.initializer)
    assert largest == 344 * 344  # 11008's right factor (11008 = 32 · 344): 0.1 % of a dense 11008 x 11008


@pytest.mark.parametrize("n,m,factors", [(384, 12, (16, 24)), (1536, 12, (32, 48)), (4096, 1, (64, 64)),
                                         (11008, 344, (32, 344)), (12, 12, (1, 12)), (64, 1, (8, 8))])
def test_factors_balance_the_two_matmuls(n, m, factors):
    """a · c = n with c = m · 2^j the smallest with c² ≥ n."""
    assert hadamard_factors(n, m) == factors
