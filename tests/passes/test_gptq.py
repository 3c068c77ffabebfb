"""GPTQ: the pure math against a float64 reference, the grid and layout it produces, and the
``gptq`` pass through the public API (sequential layers, report extras, save/load)."""

import pytest
import torch

import qcompile
import qcompile.passes.gptq as gptq_pass
import qcompile.passes.gptq_math as gptq_math
from qcompile.formats import QuantSpec, dequantize, quantize
from qcompile.formats.fixed_grid import FixedGrid
from qcompile.passes.gptq_math import gptq_quantize, proxy_loss
from tests.outlier_models import outlier_llama
from tests.tiny_models import VOCAB, tiny_model

SPECS = {
    "int4-g32": QuantSpec("int4", 32),
    "int4-g32-asym": QuantSpec("int4", 32, symmetric=False),
    "int4-g128": QuantSpec("int4", 128),
    "int4-g128-asym": QuantSpec("int4", 128, symmetric=False),
    "int8": QuantSpec("int8"),
    "int3-g32": QuantSpec("int3", 32),
    "int2-g16-asym": QuantSpec("int2", 16, symmetric=False),
    "fp8_e4m3": QuantSpec("fp8_e4m3", scale_dtype="float32"),
    "nvfp4": QuantSpec("nvfp4"),
    "mxfp4": QuantSpec("mxfp4"),
}


def _bits(t):
    return None if t is None else t.reshape(-1).view(torch.uint8) if t.element_size() == 1 else t


def _same_tensor(a, b):
    """Bit-identical QuantizedTensors (codes, scales, zero points, global scale)."""
    if a.spec != b.spec or tuple(a.shape) != tuple(b.shape) or a.tensors().keys() != b.tensors().keys():
        return False
    return all(torch.equal(_bits(x), _bits(y)) for x, y in zip(a.tensors().values(), b.tensors().values()))


def _problem(n=16, k=160, rows=768, seed=0):
    """A weight and the Hessian of correlated inputs (low-rank structure + noise, a few loud channels)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 12, generator=g) @ torch.randn(12, k, generator=g) + 0.2 * torch.randn(rows, k, generator=g)
    x[:, :4] *= 8
    w = torch.randn(n, k, generator=g)
    return w, (x.double().t() @ x.double()).float()


def reference_gptq(w, h, spec, damp=0.01, act_order=True):
    """Textbook GPTQ in float64, one column at a time with the explicit inverse Hessian downdated
    after each column (no Cholesky, no blocks); the grid is the same static one."""
    w, h = w.double().clone(), h.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    grid = FixedGrid(quantize(w.float(), spec))
    k = w.shape[1]
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else torch.arange(k)
    hinv = torch.linalg.inv(h + damp * torch.diagonal(h).mean() * torch.eye(k, dtype=h.dtype))
    q = torch.zeros_like(w)
    for j in order.tolist():
        _, qj = grid.round(w[:, j:j + 1].float(), grid.columns(torch.tensor([j])))
        q[:, j] = qj[:, 0].double()
        e = (w[:, j] - q[:, j]) / hinv[j, j]
        w -= e[:, None] * hinv[j][None, :]
        hinv = hinv - hinv[:, j:j + 1] @ hinv[j:j + 1, :] / hinv[j, j]
    return q


# ------------------------------------------------------------------------------------ pure math
@pytest.mark.parametrize("name", list(SPECS))
def test_matches_the_float64_reference_and_beats_rtn(name):
    spec = SPECS[name]
    w, h = _problem()
    qt, info = gptq_quantize(w, h, spec, block_size=64)  # K=160: three blocks, the last one partial
    ref = reference_gptq(w, h, spec)
    deq = dequantize(qt)
    assert (deq.double() == ref).float().mean() > 0.99
    assert info.proxy_loss_gptq == pytest.approx(proxy_loss(w, ref, h), rel=1e-2)
    assert info.proxy_loss_rtn == pytest.approx(proxy_loss(w, dequantize(quantize(w, spec)), h), rel=1e-9)
    assert info.proxy_loss_gptq < 0.5 * info.proxy_loss_rtn
    assert info.dead_channels == 0 and info.damp == pytest.approx(0.01 * float(torch.diagonal(h).mean()), rel=1e-5)


@pytest.mark.parametrize("name", list(SPECS))
def test_result_is_canonical_static_groups_on_the_grid(name):
    """act_order reorders the columns, not the layout: the parameters are RTN's (the original
    weight's groups), tensors have quantize's dtypes and shapes, and every value is on the grid."""
    spec = SPECS[name]
    w, h = _problem(k=100, seed=1)  # K not a multiple of the group: padding like quantize's
    rtn = quantize(w, spec)
    for act_order in (True, False):
        qt, _ = gptq_quantize(w, h, spec, act_order=act_order)
        for key, t in rtn.tensors().items():
            got = qt.tensors()[key]
            assert got.dtype == t.dtype and got.shape == t.shape, key
        assert torch.equal(_bits(qt.scale), _bits(rtn.scale))
        assert (qt.zero is None) == (rtn.zero is None) and (qt.zero is None or torch.equal(qt.zero, rtn.zero))
        assert qt.global_scale is None or torch.equal(qt.global_scale, rtn.global_scale)
        # on the grid: rounding the dequantized weights to these parameters gives the same tensor
        assert _same_tensor(FixedGrid(qt).quantize(dequantize(qt)), qt)
    ordered, _ = gptq_quantize(w, h, spec, act_order=True)
    plain, _ = gptq_quantize(w, h, spec, act_order=False)
    assert not torch.equal(dequantize(ordered), dequantize(plain))  # the order did change the decisions
    assert (dequantize(plain).double() == reference_gptq(w, h, spec, act_order=False)).float().mean() > 0.99


@pytest.mark.parametrize("name", ["int4-g128-asym", "int8", "fp8_e4m3", "nvfp4", "mxfp4"])
def test_identity_hessian_is_rtn(name):
    spec = SPECS[name]
    w = torch.randn(24, 96)
    qt, info = gptq_quantize(w, torch.eye(96), spec, block_size=32)
    assert _same_tensor(qt, quantize(w, spec))
    assert info.proxy_loss_gptq == pytest.approx(info.proxy_loss_rtn)


@pytest.mark.parametrize("name", ["int4-g32-asym", "int4-g128", "nvfp4"])
def test_dead_channels(name):
    spec = SPECS[name]
    w, h = _problem(k=96, seed=2)
    dead = torch.tensor([3, 17, 50, 95])
    h[dead, :] = 0
    h[:, dead] = 0
    qt, info = gptq_quantize(w, h, spec)
    assert info.dead_channels == 4
    deq = dequantize(qt)
    assert torch.isfinite(deq).all() and (deq[:, dead] == 0).all()
    assert info.proxy_loss_gptq < info.proxy_loss_rtn
    # all channels dead: still succeeds, reports them all (H becomes the identity: RTN of W = 0)
    qt, info = gptq_quantize(w, torch.zeros(96, 96), spec)
    assert info.dead_channels == 96 and (dequantize(qt) == 0).all()


def test_rejects_bad_inputs():
    w, h = _problem(k=64)
    with pytest.raises(ValueError, match="Hessian has shape"):
        gptq_quantize(w, h[:32, :32], SPECS["int8"])
    with pytest.raises(ValueError, match="block_size"):
        gptq_quantize(w, h, SPECS["int8"], block_size=0)
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize(w, h * float("nan"), SPECS["int8"])
    with pytest.raises(ValueError, match="block_size"):
        gptq_pass.GPTQ(block_size=-1)


@pytest.mark.parametrize("fmt", ["int8", "int4", "int3", "int2", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "nvfp4",
                                 "mxfp4", "mxfp8"])
def test_fixed_grid_agrees_with_the_codecs(fmt):
    """Rounding w to quantize(w)'s own parameters reproduces quantize(w) bit for bit."""
    w = torch.randn(8, 100) * torch.rand(1, 100) * 4
    for group in (0, 32) if fmt not in ("nvfp4", "mxfp4", "mxfp8") else (0,):
        for symmetric in (True, False) if fmt.startswith("int") else (True,):
            for scale_dtype in ("float16", "float32"):
                spec = QuantSpec(fmt, group, symmetric, scale_dtype)
                qt = quantize(w, spec)
                assert _same_tensor(FixedGrid(qt).quantize(w), qt), spec.encode()


# ------------------------------------------------------------------------------------ the pass
class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(32, 64)
        self.b = torch.nn.Linear(64, 16)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _lowered_weights(cm):
    from qcompile.codegen.op_schema import QuantizedLinearCall, is_quantized_linear
    from qcompile.ir.graph import module_path

    gm = cm.graph_module
    return {module_path(n): dequantize(QuantizedLinearCall.from_node(n).resolve(gm).quantized_weight())
            for n in gm.graph.nodes if is_quantized_linear(n)}


def _xtx(x):
    return (x.double().t() @ x.double()).float()


def test_layers_are_quantized_in_sequence():
    """The second layer's Hessian comes from the first layer's GPTQ weights, not its float ones;
    the lowered tensors are GPTQ's; the user's model is untouched."""
    model = MLP().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = [torch.randn(64, 32) @ torch.randn(32, 32) for _ in range(2)]
    passes = ["canonicalize", "assign_quant_specs", gptq_pass.GPTQ(block_size=16), "lower"]
    cm = qcompile.compile(model, torch.randn(4, 32), recipe="w4a16-g32", passes=passes, calibration=calib,
                          progress=False)
    spec = QuantSpec("int4", 32, symmetric=False)
    a_w, a_b, b_w = model.a.weight.detach(), model.a.bias.detach(), model.b.weight.detach()
    x = torch.cat(calib)
    wa = dequantize(gptq_quantize(a_w, _xtx(x), spec, block_size=16)[0])
    seq = dequantize(gptq_quantize(b_w, _xtx(torch.relu(x @ wa.t() + a_b)), spec, block_size=16)[0])
    flt = dequantize(gptq_quantize(b_w, _xtx(torch.relu(x @ a_w.t() + a_b)), spec, block_size=16)[0])
    got = _lowered_weights(cm)
    assert set(got) == {"a", "b"}
    assert (got["a"] == wa).float().mean() > 0.99
    assert (got["b"] == seq).float().mean() > 0.99
    assert (got["b"] == flt).float().mean() < 0.9
    stats = next(p for p in cm.report().to_dict()["passes"] if p["name"] == "gptq")["stats"]
    assert stats["groups"] == 2 and stats["captures"] == 2 and stats["quantized"] == 2
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("targets", ["quantized", "float"])
def test_resumed_calibration_runs_equal_runs_from_the_inputs(targets, monkeypatch):
    """The calibration run carried from group to group (each node once per batch) and the run that
    restarts from the inputs for every group produce bit-identical GPTQ weights; the restart says so."""
    from qcompile.ir import interpret

    torch.manual_seed(0)
    model = tiny_model("llama")
    trace = torch.randint(0, VOCAB, (2, 16))
    calibration = [torch.randint(0, VOCAB, (2, 24)) for _ in range(3)]

    def compiled():
        return qcompile.compile(model, trace, recipe="w4a16", calibration=calibration, progress=False, verify=False,
                                passes=["canonicalize", "assign_quant_specs", gptq_pass.GPTQ(targets=targets), "lower"])

    resumed = compiled()
    monkeypatch.setattr(interpret, "RESUMABLE_MAX_BYTES", 0)
    restarted = compiled()
    a, b = _lowered_weights(resumed), _lowered_weights(restarted)
    assert a.keys() == b.keys() and len(a) >= 14
    assert all(torch.equal(a[k], b[k]) for k in a)
    notes = [n for n in restarted.report().notes if "gptq calibration" in n]
    assert notes and "re-run the graph from the inputs" in notes[0]
    assert not [n for n in resumed.report().notes if "gptq calibration" in n]


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_fitted_gptq_runs_on_the_models_device(device):
    """``w4a16-gptq-fit`` (searched grids, float targets) with the model and the calibration on ``device``."""
    model = tiny_model("llama").to(device)
    ids = torch.randint(0, VOCAB, (2, 12), device=device)
    cm = qcompile.compile(model, {"input_ids": ids}, recipe="w4a16-gptq-fit", calibration=[{"input_ids": ids}],
                          progress=False, verify=False)
    with torch.no_grad():
        ref, out = _logits(model(ids)), _logits(cm(ids))
    assert out.device.type == device
    assert torch.nn.functional.cosine_similarity(ref, out, dim=0) > 0.99


def _logits(out):
    out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "logits", out)
    return out.detach().double().flatten()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1234)
    trace = torch.randint(0, VOCAB, (2, 16), generator=g)
    calibration = [torch.randint(0, VOCAB, (16, 32), generator=g)]  # one batch: each capture runs the graph per batch
    held_out = torch.randint(0, VOCAB, (4, 32), generator=g)  # neither traced nor calibrated on
    return trace, calibration, held_out


_COMPILED = {}


def _compiled(family, recipe, method, data):
    key = (family, recipe, method)
    if key not in _COMPILED:
        model = tiny_model("llama") if family == "llama" else outlier_llama()
        trace, calibration, held_out = data
        cm = qcompile.compile(model, trace, recipe=recipe, calibration=calibration, progress=False,
                              passes=["canonicalize", "assign_quant_specs", method, "lower"])
        with torch.no_grad():
            ref, out = _logits(model(held_out)), _logits(cm(held_out))
        _COMPILED[key] = (cm, float(torch.nn.functional.cosine_similarity(ref, out, dim=0)))
    return _COMPILED[key]


@pytest.mark.parametrize("family", ["llama", "outlier_llama"])
@pytest.mark.parametrize("recipe", ["w4a16", "w4a16-g32"])
def test_gptq_beats_rtn_on_held_out_inputs(family, recipe, data):
    _, rtn = _compiled(family, recipe, "quantize_weights", data)
    cm, gptq = _compiled(family, recipe, "gptq", data)
    assert gptq > rtn, (gptq, rtn)
    assert 1 - gptq < 0.85 * (1 - rtn)
    layers = [layer for layer in cm.report().layers if layer.method == "gptq"]
    assert len(layers) == 14  # 2 decoder layers × 7 linears; lm_head stays float
    for layer in layers:
        extras = layer.passes["gptq"]
        assert set(extras) == {"damp", "dead_channels", "proxy_loss_rtn", "proxy_loss_gptq"}
        assert extras["damp"] > 0 and extras["dead_channels"] == 0
        assert extras["proxy_loss_gptq"] <= extras["proxy_loss_rtn"]
        assert layer.weight_rel_error > 0 and layer.output_rel_error is not None


def test_save_load_restores_without_rerunning(data, tmp_path, monkeypatch):
    cm, _ = _compiled("llama", "w4a16", "gptq", data)
    root = cm.save(tmp_path / "gptq")
    entry = next(p for p in cm.manifest["passes"] if p["name"] == "gptq")
    assert entry["on_load"] == "restore" and entry["options"] == {"block_size": 128, "damp": 0.01, "act_order": True}

    def refuse(*args, **kwargs):
        raise AssertionError("GPTQ reran at load")

    monkeypatch.setattr(gptq_pass, "gptq_quantize", refuse)
    monkeypatch.setattr(gptq_math, "gptq_quantize", refuse)
    loaded = qcompile.load(root, tiny_model("llama"), data[0])
    held_out = data[2]
    with torch.no_grad():
        assert torch.equal(_logits(loaded(held_out)), _logits(cm(held_out)))
    assert [layer.passes for layer in loaded.report().layers] == [layer.passes for layer in cm.report().layers]
    from qcompile.ir.annotations import decided_nodes, result_of

    methods = {result_of(n).method for n, d in decided_nodes(loaded.graph_module) if result_of(n) is not None}
    assert methods == {"gptq"}
    extras = [d.extras.get("gptq") for n, d in decided_nodes(loaded.graph_module) if d.quantized]
    assert all(e is not None and e["proxy_loss_gptq"] >= 0 for e in extras)
