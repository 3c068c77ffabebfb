import pytest
import torch

from qcompile.frontend import export_model
from qcompile.ir.ops import NORM_OPS
from qcompile.passes.base import PassContext, PassManager
from tests.tiny_models import FAMILIES, tiny_inputs, tiny_model

FOLDABLE = {"llama": 5, "qwen2": 5, "mistral": 5, "gpt2": 5, "opt": 5, "bert": 0}
"""Pre-norm models fold every norm (4 per 2 layers + final into the LM head);
BERT is post-norm: each norm also feeds a residual, so nothing folds."""


@pytest.mark.parametrize("family", FAMILIES)
def test_fold_norm_scales_is_exact(family):
    model = tiny_model(family)
    ex = export_model(model, tiny_inputs())
    pm = PassManager.from_names(["canonicalize", "fold_norm_scales"], verify=True, tolerance=1e-6)
    gm = pm.run(ex.gm, PassContext(ex.args, ex.kwargs))
    rec = pm.records[1]
    assert rec.stats["folded"] == FOLDABLE[family]
    if FOLDABLE[family]:
        assert rec.verified_error is not None and rec.verified_error <= 1e-6
        folded = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in NORM_OPS and n.args[1] is None]
        assert len(folded) == FOLDABLE[family]
    with torch.no_grad():
        ref = model(*ex.args, **ex.pinned_kwargs)[0]
        out = gm(*ex.args, **ex.pinned_kwargs)[0]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
