"""GPTQ with float targets: ``gptq_math.float_target`` is the least-squares target of
``min_Q ‖XWᵀ − X̃Qᵀ‖``, and ``GPTQ(targets="float")`` fits each layer to the float model's outputs
with the paired inputs ``gptq_targets.paired_stats`` captures."""

import pytest
import torch

import qcompile
import qcompile.passes.gptq as gptq_pass
from qcompile.formats import QuantSpec, dequantize
from qcompile.passes.gptq import GPTQ
from qcompile.passes.gptq_math import float_target, gptq_quantize, proxy_loss

SPEC = QuantSpec("int4", 32, symmetric=False)


def _pair(n=16, k=64, rows=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 6, generator=g) @ torch.randn(6, k, generator=g) + 0.3 * torch.randn(rows, k, generator=g)
    xq = x + 0.2 * torch.randn(rows, k, generator=g) + 0.1 * x.roll(1, dims=1)  # an earlier layer's error
    return torch.randn(n, k, generator=g), x.double(), xq.double()


def test_no_earlier_error_keeps_the_weight():
    w, _, xq = _pair()
    h = (xq.t() @ xq).float()
    assert torch.equal(float_target(w, h, torch.zeros_like(h), 0.1), w)


def test_target_is_the_least_squares_objective():
    """Undamped: ‖XWᵀ − X̃Qᵀ‖² = tr((Q − W̃) H̃ (Q − W̃)ᵀ) + a constant, for any Q."""
    w, x, xq = _pair()
    h, cross = xq.t() @ xq, (x - xq).t() @ xq
    target = float_target(w.double(), h, cross, 0.0)
    g = torch.Generator().manual_seed(5)
    qs = [w.double() + 0.3 * torch.randn(w.shape, generator=g, dtype=torch.float64) for _ in range(3)]
    direct = [float((x @ w.double().t() - xq @ q.t()).pow(2).sum()) for q in qs]
    proxy = [proxy_loss(target, q, h) for q in qs]
    assert direct[1] - direct[0] == pytest.approx(proxy[1] - proxy[0], rel=1e-6)
    assert direct[2] - direct[0] == pytest.approx(proxy[2] - proxy[0], rel=1e-6)


def test_gptq_on_the_target_matches_the_float_outputs_better():
    w, x, xq = _pair()
    h, cross = (xq.t() @ xq).float(), ((x - xq).t() @ xq).float()
    own = dequantize(gptq_quantize(w, h, SPEC, damp=0.01)[0]).double()
    fit = dequantize(gptq_quantize(float_target(w, h, cross, 0.01), h, SPEC, damp=0.01)[0]).double()
    ref = x @ w.double().t()
    assert float((ref - xq @ fit.t()).norm()) < 0.9 * float((ref - xq @ own.t()).norm())


def test_bad_shapes_are_named():
    w, _, xq = _pair()
    h = (xq.t() @ xq).float()
    with pytest.raises(ValueError, match="cross term"):
        float_target(w, h, h[:8, :8], 0.1)
    with pytest.raises(ValueError, match="targets"):
        GPTQ(targets="teacher")
    with pytest.raises(ValueError, match="bias_correction=True needs targets='float'"):
        GPTQ(bias_correction=True)


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.a = torch.nn.Linear(32, 64)
        self.b = torch.nn.Linear(64, 16)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _xtx(x):
    return (x.double().t() @ x.double()).float()


def test_pass_fits_later_layers_to_the_float_model(tmp_path, monkeypatch):
    model = MLP().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = [torch.randn(96, 32) @ torch.randn(32, 32) for _ in range(2)]
    gptq = GPTQ(block_size=16, damp=0.1, targets="float")
    cm = qcompile.compile(model, torch.randn(4, 32), recipe="w4a16-g32", calibration=calib, progress=False,
                          passes=["canonicalize", "assign_quant_specs", gptq, "lower"])
    a_w, a_b, b_w = model.a.weight.detach(), model.a.bias.detach(), model.b.weight.detach()
    x = torch.cat(calib)
    wa = dequantize(gptq_quantize(a_w, _xtx(x), SPEC, block_size=16, damp=0.1)[0])
    xq, xf = torch.relu(x @ wa.t() + a_b), torch.relu(x @ a_w.t() + a_b)
    h, cross = _xtx(xq), ((xf - xq).double().t() @ xq.double()).float()
    fitted = dequantize(gptq_quantize(float_target(b_w, h, cross, 0.1), h, SPEC, block_size=16, damp=0.1)[0])
    own = dequantize(gptq_quantize(b_w, h, SPEC, block_size=16, damp=0.1)[0])
    from tests.passes.test_gptq import _lowered_weights

    got = _lowered_weights(cm)
    assert (got["a"] == wa).float().mean() > 0.99
    assert (got["b"] == fitted).float().mean() > 0.99
    assert (got["b"] == own).float().mean() < 0.9
    layers = {la.path: la.passes["gptq"] for la in cm.report().layers}
    assert layers["a"]["input_error"] == 0.0 and layers["b"]["input_error"] > 0.0
    stats = next(p for p in cm.report().to_dict()["passes"] if p["name"] == "gptq")["stats"]
    assert stats["mean_input_error"] > 0 and stats["captures"] == 2
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    entry = next(p for p in cm.manifest["passes"] if p["name"] == "gptq")
    assert entry["options"]["targets"] == "float"
    root = cm.save(tmp_path / "float_targets")

    def refuse(*args, **kwargs):
        raise AssertionError("GPTQ reran at load")

    monkeypatch.setattr(gptq_pass, "paired_stats", refuse)
    monkeypatch.setattr(gptq_pass, "gptq_quantize", refuse)
    loaded = qcompile.load(root, MLP(), torch.randn(4, 32))
    probe = torch.randn(8, 32)
    with torch.no_grad():
        assert torch.equal(loaded(probe), cm(probe))


def test_bias_correction_matches_the_float_mean_output():
    model = MLP().eval()
    calib = [torch.randn(96, 32) @ torch.randn(32, 32) + 0.5 for _ in range(2)]
    gptq = GPTQ(block_size=16, damp=0.1, targets="float", bias_correction=True)
    cm = qcompile.compile(model, torch.randn(4, 32), recipe="w4a16-g32", calibration=calib, progress=False,
                          passes=["canonicalize", "assign_quant_specs", gptq, "lower"])
    from qcompile.codegen.op_schema import QuantizedLinearCall, is_quantized_linear
    from qcompile.ir.graph import get_attr, module_path

    gm = cm.graph_module
    calls = {module_path(n): QuantizedLinearCall.from_node(n) for n in gm.graph.nodes if is_quantized_linear(n)}
    bias = {p: get_attr(gm, c.bias.target) for p, c in calls.items()}
    calls = {p: c.resolve(gm) for p, c in calls.items()}
    x = torch.cat(calib)
    qa = dequantize(calls["a"].quantized_weight())
    ba = bias["a"]
    a_w, a_b, b_w, b_b = (t.detach().double() for t in (model.a.weight, model.a.bias, model.b.weight, model.b.bias))
    assert torch.allclose(ba.double(), a_b + (a_w - qa.double()) @ x.double().mean(0), atol=1e-5)
    xq, xf = torch.relu(x @ qa.t() + ba), torch.relu(x @ model.a.weight.detach().t() + model.a.bias.detach())
    qb = dequantize(calls["b"].quantized_weight()).double()
    expected = b_b + b_w @ xf.double().mean(0) - qb @ xq.double().mean(0)
    assert torch.allclose(bias["b"].double(), expected, atol=1e-4)
    out = cm(x)  # the compiled model's mean output on the calibration rows is the float model's
    with torch.no_grad():
        assert torch.allclose(out.double().mean(0), model(x).double().mean(0), atol=1e-4)
    stats = next(p for p in cm.report().to_dict()["passes"] if p["name"] == "gptq")["stats"]
    assert stats["bias_corrected"] == 2
    assert all(la.passes["gptq"]["bias_shift"] > 0 for la in cm.report().layers)
    assert torch.equal(model.b.bias, MLP().b.bias)  # the user's model is untouched
