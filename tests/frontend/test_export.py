import collections

import pytest
import torch

from qcompile.frontend import ExportError, export_model
from qcompile.ir.ops import LAYER_NORM, LINEAR, RMS_NORM
from qcompile.passes.base import PassContext, PassManager
from tests.tiny_models import FAMILIES, DataDependent, tiny_inputs, tiny_model

EXPECTED = {  # (rms norms, layer norms) raised for 2 layers
    "llama": (5, 0), "qwen2": (5, 0), "mistral": (5, 0), "gpt2": (0, 5), "opt": (0, 5), "bert": (0, 5),
}


def _targets(gm):
    return collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


@pytest.mark.parametrize("family", FAMILIES)
def test_canonicalize_raises_norms_and_keeps_function(family):
    model = tiny_model(family)
    ex = export_model(model, tiny_inputs())
    pm = PassManager.from_names(["canonicalize"], verify=True)
    gm = pm.run(ex.gm, PassContext(ex.args, ex.kwargs))
    counts = _targets(gm)
    assert (counts[RMS_NORM], counts[LAYER_NORM]) == EXPECTED[family]
    assert counts[LINEAR] >= 2 * 4
    assert pm.records[0].verified_error is not None and pm.records[0].verified_error <= 1e-6
    ids = torch.randint(0, 256, (3, 11))  # other batch and length: dynamic shapes
    with torch.no_grad():
        ref = model(ids, **ex.pinned_kwargs)[0]
        out = gm(ids, **ex.pinned_kwargs)[0]
    torch.testing.assert_close(out, ref)


def test_gpt2_conv1d_becomes_linear():
    ex = export_model(tiny_model("gpt2"), tiny_inputs())
    gm = PassManager.from_names(["canonicalize"], verify=False).run(ex.gm, PassContext(ex.args, ex.kwargs))
    assert torch.ops.aten.addmm.default not in _targets(gm)


def test_transformers_cache_is_pinned_off():
    ex = export_model(tiny_model("llama"), tiny_inputs())
    assert ex.pinned_kwargs == {"use_cache": False}


def test_untraceable_module_names_the_model():
    with pytest.raises(ExportError, match="DataDependent"):
        export_model(DataDependent(), (torch.randn(2, 4),), dynamic=False)


def test_non_finite_weight_names_the_parameter():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'1\.weight'.*NaN"):
        export_model(model, (torch.randn(2, 4),))


def test_training_flag_restored():
    model = tiny_model("bert").train()
    export_model(model, tiny_inputs())
    assert all(m.training for m in model.modules())
