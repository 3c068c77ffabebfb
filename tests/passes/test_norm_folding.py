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


def test_if_better_choices_are_restored_at_load_not_measured(tmp_path, monkeypatch):
    import dataclasses

    import qcompile
    from qcompile.recipes import get_recipe

    base = get_recipe("w4a16")
    recipe = dataclasses.replace(base, name="w4a16-fold-if-better",
                                 passes=("canonicalize", "assign_quant_specs", "fold_norm_scales", "quantize_weights",
                                         "lower"),
                                 pass_options={"fold_norm_scales": {"when": "if_better"}})
    model = tiny_model("llama")
    x = tiny_inputs()
    cm = qcompile.compile(model, x, target="cpu", recipe=recipe, progress=False)
    choices = [lr.passes["fold_norm_scales"]["folded"] for lr in cm.report().layers if "fold_norm_scales" in lr.passes]
    assert choices, "if_better recorded no comparison"
    cm.save(tmp_path / "a")

    def refuse(*args, **kwargs):
        raise AssertionError("fold_norm_scales measured calibration statistics at load")

    monkeypatch.setattr(PassContext, "activation_stats", refuse)
    loaded = qcompile.load(tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(loaded(*x)[0], cm(*x)[0])
