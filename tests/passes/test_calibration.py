"""Calibration: batches distinct from the trace inputs, statistics computed once and shared."""

import pytest
import torch
from torch import fx

import qcompile
from qcompile.ir.graph import linear_nodes, module_path
from qcompile.passes import Pass, PassResult, register_pass
from tests.tiny_models import tiny_inputs, tiny_model


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(16, 32)
        self.b = torch.nn.Linear(32, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


SEEN = []


@register_pass("test_stats_probe")
class StatsProbe(Pass):
    """Asks for the statistics the quantizer asks for again, and records them."""

    exact = False
    runs_after = ("assign_quant_specs",)
    runs_before = ("quantize_weights",)
    on_load = qcompile.OnLoad.SKIP

    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        nodes = linear_nodes(gm)
        stats = ctx.activation_stats(gm, nodes, hessian=True)
        SEEN.append((ctx, {module_path(n): stats[n.name] for n in nodes}))
        return PassResult(False)


PIPELINE = ["canonicalize", "assign_quant_specs", "fold_norm_scales", "test_stats_probe", "quantize_weights", "lower"]


def test_statistics_come_from_the_calibration_batches_and_are_computed_once():
    SEEN.clear()
    model = MLP().eval()
    trace = torch.randn(2, 16)
    batches = [torch.randn(5, 16) * 3, torch.randn(7, 16)]
    qcompile.compile(model, trace, recipe="w8a16", passes=PIPELINE, calibration=batches, progress=False)
    ctx, stats = SEEN[0]
    x = torch.cat(batches)
    a = stats["a"]
    assert a.rows == 12
    torch.testing.assert_close(a.max_abs, x.abs().amax(0))
    torch.testing.assert_close(a.mean_abs, x.abs().mean(0))
    torch.testing.assert_close(a.hessian, x.t() @ x, rtol=1e-5, atol=1e-4)
    h = torch.relu(model.a(x)).detach()
    torch.testing.assert_close(stats["b"].max_abs, h.abs().amax(0))
    # the quantizer asked for a subset (no Hessian) at the same graph state: served from the cache
    assert ctx._stats_cache.captures == 1


def test_calibration_texts_need_a_tokenizer():
    with pytest.raises(ValueError, match="pass tokenizer="):
        qcompile.compile(tiny_model("llama", layers=1), tiny_inputs(), recipe="w8a16",
                         calibration=["one text", "another"], progress=False)


def test_calibration_texts_are_tokenized_with_the_examples_keys_minilm():
    from qcompile.demo import load_minilm

    model, tokenizer, enc = load_minilm(max_sentences=4)
    texts = ["A sentence the trace never saw.", "Another one, rather longer than the first sentence is.",
             "Short.", "Calibration text number four."]
    cm = qcompile.compile(model, enc, recipe="w8a16", calibration=texts, tokenizer=tokenizer, progress=False)
    assert any("4 texts in 1 batches" in n for n in cm.report().notes)


def test_calibration_rejects_a_bare_string():
    with pytest.raises(TypeError, match="list of batches"):
        qcompile.compile(MLP(), torch.randn(2, 16), calibration="just one string", progress=False)


def test_data_hungry_recipe_without_calibration_warns():
    with pytest.warns(UserWarning, match="runs gptq, which calibrate on data, and no calibration= was given"):
        qcompile.compile(MLP(), torch.randn(4, 16), recipe="w8a8-gptq", progress=False)


def test_non_finite_calibration_is_named():
    bad = torch.randn(4, 16)
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="calibration batch 1: input tensor 0 contains NaN"):
        qcompile.compile(MLP(), torch.randn(4, 16), recipe="w8a8-gptq", calibration=[torch.randn(4, 16), bad],
                         progress=False)


def test_calibration_of_the_wrong_shape_is_named():
    with pytest.raises(ValueError, match=r"calibration batch 0 \(input shapes \[\(4, 9\)\]\) does not fit"):
        qcompile.compile(MLP(), torch.randn(4, 16), recipe="w8a8-gptq", calibration=[torch.randn(4, 9)],
                         progress=False)
