"""Sensitivity proxies against direct eager computations, and which proxy predicts the end-to-end
error of mixed assignments best (measured on a small MLP)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import qcompile
from qcompile.formats import QuantSpec, dequantize, fake_quantize, quantize
from qcompile.frontend.torch_export import export_model
from qcompile.ir.graph import linear_nodes
from qcompile.passes.base import PassContext
from qcompile.passes.calibration import Calibration
from qcompile.passes.mixed_precision_options import parse_option
from qcompile.passes.sensitivity import OutputProbe, measure_sensitivity, proxy_correlations


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for a, b in ((32, 64), (64, 64), (64, 64), (64, 16)):
        lin = nn.Linear(a, b)
        with torch.no_grad():
            lin.weight.mul_(torch.rand(b, 1) * 3)  # rows of different scale: layers differ in sensitivity
        layers += [lin, nn.GELU()]
    return nn.Sequential(*layers[:-1]).eval()


@pytest.fixture(scope="module")
def setup():
    model = _mlp()
    torch.manual_seed(1)
    batches = [torch.randn(32, 32) for _ in range(2)]
    exported = export_model(model, (batches[0],), {}, dynamic=False)
    gm = exported.gm
    nodes = linear_nodes(gm)
    ctx = PassContext((batches[0],), {}, calibration=Calibration([((b,), {}) for b in batches]))
    stats = ctx.activation_stats(gm, nodes, hessian=True)
    probe = OutputProbe(gm, ctx.calibration)
    options = [parse_option(s) for s in ("int8", "int4-g32-asym", "int3-g32-asym", "int2-g32-asym", None)]
    options.append(parse_option("int4-g32-asym", activation=QuantSpec.parse("int4-pc-dynamic")))
    table = measure_sensitivity(gm, nodes, options, stats, probe, lambda w, d, s: quantize(w, d.weight))
    return model, batches, gm, nodes, stats, probe, options, table


def _eager_error(model, batches, index, option):
    """Relative squared output error with layer ``index`` alone under ``option``, in eager torch."""
    q = copy.deepcopy(model)
    lin = [m for m in q if isinstance(m, nn.Linear)][index]
    with torch.no_grad():
        lin.weight.copy_(dequantize(quantize(lin.weight, option.weight)))
        if option.activation is not None:
            lin.register_forward_pre_hook(lambda mod, args: (fake_quantize(args[0], option.activation),))
        err = sum(float(((q(b) - model(b)) ** 2).sum()) for b in batches)
        return err / sum(float((model(b) ** 2).sum()) for b in batches)


def test_model_proxy_is_the_output_error_with_one_layer_quantized(setup):
    model, batches, _, _, _, _, options, table = setup
    m = table.proxy("model")
    for i in range(4):
        for j in (1, 3, 5):  # int4, int2 and int4 with int4 activations (the interpreter path)
            assert m[i, j] == pytest.approx(_eager_error(model, batches, i, options[j]), rel=1e-4)
    assert (m[:, 4] == 0).all() and (table.proxy("layer")[:, 4] == 0).all()


def test_a_probe_on_fewer_batches_measures_only_those(setup):
    model, batches, gm, nodes, stats, probe, options, table = setup
    first = OutputProbe(gm, Calibration([((b,), {}) for b in batches]), batches=1)
    assert len(first.batches) == 1 and len(probe.batches) == 2
    product = table.products[1][options.index(parse_option("int2-g32-asym"))]
    err = first.measure({nodes[1].name: product})[0]
    assert err == pytest.approx(_eager_error(model, batches[:1], 1, parse_option("int2-g32-asym")), rel=1e-4)
    assert err != pytest.approx(probe.measure({nodes[1].name: product})[0], rel=1e-4)


def test_rerunning_only_what_follows_a_layer_equals_the_full_forward(setup):
    model, batches, gm, nodes, stats, probe, options, table = setup
    full = OutputProbe(gm, Calibration([((b,), {}) for b in batches]), prefix_cache=False)
    assert probe.envs is not None and full.envs is None
    for i in (0, 3):  # the first layer reruns (almost) everything, the last only itself and the output
        for j in range(len(options)):
            if table.products[i][j] is None:
                continue
            before = probe.rerun_fraction
            got = probe.measure({nodes[i].name: table.products[i][j]})
            assert got == pytest.approx(full.measure({nodes[i].name: table.products[i][j]}), rel=1e-9, abs=1e-15)
            assert 0 < probe.rerun_fraction - before < 1
    assert probe.suffix_runs and full.suffix_runs == 0
    last = probe._downstream([nodes[3]])
    assert len(last) < len(probe._downstream([nodes[0]]))


def test_a_probe_falls_back_to_full_forwards_when_the_values_do_not_fit(setup, monkeypatch):
    import qcompile.passes.sensitivity as sens_mod

    model, batches, gm, nodes, stats, probe, options, table = setup
    monkeypatch.setattr(sens_mod, "PREFIX_CACHE_BYTES", 1024)
    small = OutputProbe(gm, Calibration([((b,), {}) for b in batches]))
    assert small.envs is None
    product = table.products[2][1]
    assert small.measure({nodes[2].name: product}) == pytest.approx(probe.measure({nodes[2].name: product}), rel=1e-9)
    assert small.suffix_runs == 0


def test_layer_and_hessian_proxies_match_their_formulas(setup):
    model, _, _, nodes, stats, _, options, table = setup
    lin = [mod for mod in model if isinstance(mod, nn.Linear)][2]
    st = stats[nodes[2].name]
    w_hat = dequantize(quantize(lin.weight.detach(), options[2].weight))
    x = st.sample
    ref = x @ lin.weight.detach().t()
    layer = float(((x @ w_hat.t() - ref) ** 2).sum() / (ref ** 2).sum())
    assert table.proxy("layer")[2, 2] == pytest.approx(layer, rel=1e-5)
    trace = float(torch.diagonal(st.hessian).sum()) / st.rows
    hawq = trace / lin.weight.shape[1] * float(((w_hat - lin.weight.detach()) ** 2).sum())
    assert table.proxy("hessian")[2, 2] == pytest.approx(hawq, rel=1e-5)


def test_which_proxy_predicts_the_end_to_end_error(setup):
    _, _, _, nodes, _, probe, _, table = setup
    corr = {c.proxy: c for c in proxy_correlations(table, [n.name for n in nodes], probe, assignments=16)}
    print({p: (round(c.spearman, 3), round(c.pearson, 3)) for p, c in corr.items()})
    assert set(corr) == {"model", "layer", "hessian"}
    assert corr["model"].spearman >= 0.9 and corr["model"].pearson >= 0.9
    assert corr["model"].spearman >= max(corr["layer"].spearman, corr["hessian"].spearman) - 0.05


def test_the_pass_reports_correlations_when_asked():
    model = _mlp()
    torch.manual_seed(2)
    calib = [(torch.randn(16, 32),)]
    cm = qcompile.compile(model, calib[0], budget={"bits": 4.0}, calibration=calib, progress=False,
                          mixed_precision={"candidates": ["int8", "int4-g32-asym", "int2-g32-asym"],
                                           "correlation_assignments": 6})
    rec = cm.report().mixed_precision
    assert {c["proxy"] for c in rec["correlations"]} == {"model", "layer", "hessian"}
    assert all(np.isfinite(c["spearman"]) for c in rec["correlations"])


def test_an_extras_forward_replaces_the_quantized_product(setup, monkeypatch):
    from qcompile.passes import mixed_precision_options as opts

    _, _, gm, nodes, stats, probe, _, _ = setup
    monkeypatch.setattr(opts, "EXTRAS", {})
    # A stand-in for outlier splitting: its product is the float one, so it adds no error.
    opts.register_extras("exact_residual", nbytes=lambda o, rows, k: rows * k,
                         forward=lambda weight, st, option: (lambda x: x @ weight.t()))
    plain = parse_option("int2-g32-asym")
    split = opts.PrecisionOption(plain.weight, extras={"exact_residual": {}})
    table = measure_sensitivity(gm, nodes, [plain, split], stats, probe, lambda w, d, s: quantize(w, d.weight))
    m = table.proxy("model")
    assert (m[:, 0] > 1e-4).all() and (m[:, 1] < 1e-10).all()


def test_proxies_on_a_tiny_decoder():
    """A decoder from a transformers config (random weights): the model proxy ranks mixed assignments best."""
    from tests.tiny_models import tiny_inputs, tiny_model

    torch.manual_seed(3)
    calib = [tiny_inputs(2, 16)]
    cm = qcompile.compile(tiny_model("llama", layers=1), tiny_inputs(), recipe="w4a16", calibration=calib,
                          progress=False, budget={"bits": 5.0},
                          mixed_precision={"candidates": ["int4-g32-asym", "int2-g32-asym", None],
                                           "correlation_assignments": 12})
    corr = {c["proxy"]: c for c in cm.report().mixed_precision["correlations"]}
    print({p: (round(c["spearman"], 3), round(c["pearson"], 3)) for p, c in corr.items()})
    assert corr["model"]["spearman"] >= 0.8
