"""Error-minimising grids: ``clip_search_math.search_grid`` lowers the error it minimises, against a
brute-force reference; the ``clip_search`` pass and ``GPTQ(grid=...)`` store the chosen grid in
their results, which artifacts save and load restores without searching again."""

import pytest
import torch

import qcompile
import qcompile.passes.clip_search as clip_pass
import qcompile.passes.clip_search_math as clip_math
import qcompile.passes.gptq as gptq_pass
from qcompile.formats import QuantSpec, dequantize, fake_quantize, quantize
from qcompile.formats.fixed_grid import FixedGrid
from qcompile.ir.annotations import decided_nodes, result_of
from qcompile.passes.clip_search import ClipSearch
from qcompile.passes.clip_search_math import search_grid
from qcompile.passes.gptq import GPTQ
from qcompile.passes.gptq_math import gptq_quantize, proxy_loss

SPECS = {
    "int4-g32": QuantSpec("int4", 32),
    "int4-g64-asym": QuantSpec("int4", 64, symmetric=False),
    "int3-pc": QuantSpec("int3"),
    "int8-g32-asym": QuantSpec("int8", 32, symmetric=False),
    "fp4_e2m1-g32": QuantSpec("fp4_e2m1", 32),
}


def _layer(n=24, k=96, rows=512, seed=0):
    """A weight with heavy-tailed entries (a few large weights per group) and a correlated input's Hessian."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (1 + 4 * (torch.rand(n, k, generator=g) > 0.97))
    x = torch.randn(rows, 8, generator=g) @ torch.randn(8, k, generator=g) + 0.3 * torch.randn(rows, k, generator=g)
    return w, (x.double().t() @ x.double()).float()


def _objective(w, q, h, objective, group):
    """Per (row, group) objective, computed the plain way."""
    d = (q - w).double()
    n, k = w.shape
    out = torch.zeros(n, -(-k // group), dtype=torch.float64)
    for gi, start in enumerate(range(0, k, group)):
        cols = slice(start, start + group)
        if objective == "mse":
            out[:, gi] = d[:, cols].pow(2).sum(1)
        elif objective == "hessian_diag":
            out[:, gi] = (d[:, cols].pow(2) * torch.diagonal(h.double())[cols]).sum(1)
        else:
            out[:, gi] = ((d[:, cols] @ h.double()[cols, cols]) * d[:, cols]).sum(1)
    return out


@pytest.mark.parametrize("objective", clip_math.OBJECTIVES)
@pytest.mark.parametrize("name", list(SPECS))
def test_search_lowers_the_error_it_minimises(name, objective):
    spec = SPECS[name]
    w, h = _layer()
    qt, info = search_grid(w, spec, objective=objective, hessian=h)
    group = spec.group_size or w.shape[1]
    rtn = _objective(w, dequantize(quantize(w, spec)), h, objective, group)
    got = _objective(w, dequantize(qt), h, objective, group)
    assert info.error == pytest.approx(float(got.sum()), rel=1e-4)
    assert info.error_minmax == pytest.approx(float(rtn.sum()), rel=1e-4)
    if spec.bits == 8:  # 255 levels: clipping by 2.5 % of the range costs the extreme weights more than it saves
        assert float(got.sum()) <= float(rtn.sum()) * (1 + 1e-9)
        return
    assert float(got.sum()) < 0.97 * float(rtn.sum())  # heavy tails: clipping pays
    assert 0 < info.clipped_fraction <= 1 and info.mean_ratio_lo <= 1 and info.mean_ratio_hi <= 1
    # the codes are the weight rounded to the chosen grid (FixedGrid: the codec's own rounding)
    again = FixedGrid(qt).quantize(w)
    assert torch.equal(again.data, qt.data) and torch.equal(again.scale, qt.scale)


@pytest.mark.parametrize("asym_pairs", [False, True])
def test_each_group_gets_the_best_candidate(asym_pairs):
    """Against a brute force over the same candidates: every (row, group) error equals the least one."""
    spec = QuantSpec("int4", 32, symmetric=False)
    w, h = _layer(n=6, k=64)
    ratios = (1.0, 0.9, 0.8, 0.7)
    qt, info = search_grid(w, spec, objective="hessian", hessian=h, ratios=ratios, asym_pairs=asym_pairs)
    assert (info.mean_ratio_lo == info.mean_ratio_hi) != asym_pairs
    got = _objective(w, dequantize(qt), h, "hessian", 32)
    wg = w.reshape(6, 2, 32)
    best = torch.full_like(got, float("inf"))
    pairs = [(a, b) for a in ratios for b in ratios] if asym_pairs else [(r, r) for r in ratios]
    for r_lo, r_hi in pairs:
        lo, hi = wg.amin(-1, keepdim=True).clamp_max(0) * r_lo, wg.amax(-1, keepdim=True).clamp_min(0) * r_hi
        q = fake_quantize(torch.minimum(torch.maximum(wg, lo), hi).reshape(6, 64), spec)
        best = torch.minimum(best, _objective(w, q, h, "hessian", 32))
    assert torch.allclose(got, best, rtol=1e-4, atol=1e-6)


def test_only_the_minmax_ratio_reproduces_quantize():
    spec = QuantSpec("int4", 32, symmetric=False)
    w, _ = _layer()
    qt, info = search_grid(w, spec, ratios=(1.0,))
    ref = quantize(w, spec)
    assert torch.equal(qt.data, ref.data) and torch.equal(qt.scale, ref.scale) and torch.equal(qt.zero, ref.zero)
    assert info.clipped_fraction == 0 and info.error_ratio == 1.0


def test_bad_arguments_are_named():
    w, h = _layer()
    with pytest.raises(ValueError, match="nvfp4"):
        search_grid(w, QuantSpec("nvfp4"))
    with pytest.raises(ValueError, match="needs the input Hessian"):
        search_grid(w, SPECS["int4-g32"], objective="hessian")
    with pytest.raises(ValueError, match="Hessian has shape"):
        search_grid(w, SPECS["int4-g32"], objective="hessian", hessian=h[:10, :10])
    with pytest.raises(ValueError, match="ratios"):
        search_grid(w, SPECS["int4-g32"], ratios=(1.2,))
    with pytest.raises(ValueError, match="objective"):
        search_grid(w, SPECS["int4-g32"], objective="l1")
    with pytest.raises(ValueError, match="objective"):
        ClipSearch(objective="l1")
    with pytest.raises(ValueError, match="grid"):
        GPTQ(grid="best")


def test_gptq_rounds_to_the_given_grid():
    spec = QuantSpec("int4", 32, symmetric=False)
    w, h = _layer()
    grid, _ = search_grid(w, spec, objective="mse")
    qt, info = gptq_quantize(w, h, spec, grid=grid)
    assert torch.equal(qt.scale, grid.scale) and torch.equal(qt.zero, grid.zero)
    plain, _ = gptq_quantize(w, h, spec)
    assert not torch.equal(plain.scale, grid.scale)
    assert info.proxy_loss_gptq == pytest.approx(proxy_loss(w, dequantize(qt), h), rel=1e-6)
    with pytest.raises(ValueError, match="grid is int4-g64"):
        gptq_quantize(w, h, spec, grid=quantize(w, QuantSpec("int4", 64, symmetric=False)))


# ------------------------------------------------------------------------------------ passes
class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.a = torch.nn.Linear(64, 96)
        self.b = torch.nn.Linear(96, 64)
        self.c = torch.nn.Linear(64, 32)

    def forward(self, x):
        return self.c(self.b(torch.nn.functional.gelu(self.a(x))))


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(7)
    mix = torch.randn(64, 64, generator=g)
    return torch.randn(4, 64, generator=g), [torch.randn(128, 64, generator=g) @ mix for _ in range(2)], \
        torch.randn(16, 64, generator=g) @ mix


def _compile(data, quantizer):
    trace, calibration, _ = data
    return qcompile.compile(MLP().eval(), trace, recipe="w4a16-g32", calibration=calibration, progress=False,
                            passes=["canonicalize", "assign_quant_specs", quantizer, "lower"])


def _lowered(cm):
    from qcompile.codegen.op_schema import QuantizedLinearCall, is_quantized_linear
    from qcompile.ir.graph import module_path

    gm = cm.graph_module
    return {module_path(n): QuantizedLinearCall.from_node(n).resolve(gm).quantized_weight()
            for n in gm.graph.nodes if is_quantized_linear(n)}


@pytest.fixture(scope="module")
def rtn_layers(data):
    return {la.path: la for la in _compile(data, "quantize_weights").report().layers if la.method == "rtn"}


@pytest.mark.parametrize("quantizer", [ClipSearch(), ClipSearch(objective="hessian"), GPTQ(grid="mse", damp=0.1)],
                         ids=["clip_search_mse", "clip_search_hessian", "gptq_grid"])
def test_searched_grids_are_saved_and_restored_without_searching(data, rtn_layers, tmp_path, monkeypatch, quantizer):
    cm = _compile(data, quantizer)
    layers = [la for la in cm.report().layers if la.method in ("rtn-clip", "gptq")]
    assert [la.path for la in layers] == ["a", "b", "c"]
    for layer in layers:
        record = layer.passes[quantizer.name]
        grid = record if quantizer.name == "clip_search" else record["grid"]
        assert grid["error_ratio"] < 1.0 and 0 < grid["clipped_fraction"] <= 1
        if quantizer.options().get("objective") == "mse":  # RTN on the weight-MSE grid: never a larger weight error
            assert layer.weight_rel_error < rtn_layers[layer.path].weight_rel_error
    entry = next(p for p in cm.manifest["passes"] if p["name"] == quantizer.name)
    assert entry["on_load"] == "restore" and entry["options"] == quantizer.options()
    saved = _lowered(cm)
    model = MLP()
    for path, qt in saved.items():  # the searched grids, not the min/max ones, are what lowering holds
        assert not torch.equal(quantize(getattr(model, path).weight.detach(), qt.spec).scale, qt.scale)
    root = cm.save(tmp_path / "clip")

    def refuse(*args, **kwargs):
        raise AssertionError("the grid search reran at load")

    for module in (clip_math, clip_pass, gptq_pass):
        monkeypatch.setattr(module, "search_grid", refuse)
    with torch.no_grad():  # other weights: load takes nothing from the model but its architecture
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    loaded = qcompile.load(root, model, data[0])
    methods = {result_of(n).method for n, d in decided_nodes(loaded.graph_module) if result_of(n) is not None}
    assert methods == {layers[0].method}
    restored = _lowered(loaded)
    for path, qt in saved.items():
        assert torch.equal(restored[path].scale, qt.scale) and torch.equal(restored[path].zero, qt.zero)
        assert torch.equal(restored[path].data, qt.data)
    with torch.no_grad():
        assert torch.equal(loaded(data[2]), cm(data[2]))
    assert [la.passes for la in loaded.report().layers] == [la.passes for la in cm.report().layers]


def test_hessian_objective_uses_the_calibration_inputs(data):
    """The first layer's input is the model input: its grid minimises the objective on the calibration rows."""
    cm = _compile(data, ClipSearch(objective="hessian"))
    x = torch.cat(data[1])
    h = (x.double().t() @ x.double()).float()
    w = MLP().a.weight.detach()
    qt = _lowered(cm)["a"]
    expected, _ = search_grid(w, qt.spec, objective="hessian", hessian=h)
    assert torch.equal(qt.scale, expected.scale) and torch.equal(qt.zero, expected.zero)


def test_clip_search_runs_after_the_rewrites_that_change_its_weights():
    from qcompile.passes import PassManager, make_pass

    with pytest.warns(UserWarning, match="reordered"):
        pm = PassManager([make_pass("canonicalize"), make_pass("assign_quant_specs"), ClipSearch(), make_pass("awq"),
                          make_pass("lower")])
    names = [p.name for p in pm.passes]
    assert names.index("awq") < names.index("clip_search")
