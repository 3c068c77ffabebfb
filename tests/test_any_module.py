"""Any module compiles: a bare linear, convnets (quantized as im2col linears), layers the compiler
cannot quantize listed with their reason, and no-op compiles that say so."""

import json
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qcompile
from qcompile.codegen.quantized_linear import QUANTIZED_LINEAR
from qcompile.formats import QuantSpec, dequantize, quantize
from qcompile.ir.annotations import DECISION
from qcompile.report import Report


class ConvNet(nn.Module):
    """Two 3×3 convs 8 → 16 → 16 on 16×16 images, the second strided, and a depthwise conv."""

    def __init__(self, depthwise: bool = False):
        super().__init__()
        self.c1 = nn.Conv2d(8, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16) if depthwise else None

    def forward(self, x):
        h = self.c2(F.relu(self.c1(x)))
        return self.dw(F.relu(h)) if self.dw is not None else h


class ConvNet1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(8, 16, 5, padding=2)
        self.c2 = nn.Conv1d(16, 16, 3, dilation=2)

    def forward(self, x):
        return self.c2(F.gelu(self.c1(x)))


class NoWeights(nn.Module):
    def forward(self, x):
        return F.relu(x) * 2


def _compile(model, x, **kw):
    kw.setdefault("progress", False)
    return qcompile.compile(model, x, **kw)


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def _fake_quantized(model, spec, names):
    """``model`` with the weights of ``names`` quantized and dequantized as [C_out, C_in·k…] matrices."""
    ref = type(model)(*([model.dw is not None] if isinstance(model, ConvNet) else []))
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name in names:
            w = getattr(ref, name).weight
            w.copy_(dequantize(quantize(w.reshape(w.shape[0], -1), spec)).reshape(w.shape))
    return ref.eval()


def test_bare_linear_compiles_matches_and_round_trips(tmp_path):
    model, x = nn.Linear(64, 64).eval(), torch.randn(4, 64)
    cm = _compile(model, x, recipe="w8a16")
    (row,) = cm.report().layers
    assert row.path == "" and row.weight_format == "int8-pc"
    assert _rel(cm(x), model(x)) < 0.01
    assert "(root)" in str(cm.report())
    cm.save(tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(qcompile.load(tmp_path / "a", nn.Linear(64, 64), x)(x), cm(x), rtol=0, atol=0)


def test_bare_conv_compiles():
    model, x = nn.Conv2d(8, 16, 3).eval(), torch.randn(2, 8, 16, 16)
    cm = _compile(model, x, recipe="w8a16")
    (row,) = cm.report().layers
    assert row.path == "" and row.weight_format == "int8-pc"
    assert _rel(cm(x), model(x)) < 0.01


@pytest.mark.parametrize("recipe", ["w4a16-g32", "w8a16"])
def test_conv2d_is_quantized_like_its_im2col_linear(recipe):
    model, x = ConvNet().eval(), torch.randn(2, 8, 16, 16)
    cm = _compile(model, x, recipe=recipe)
    rows = {row.path: row for row in cm.report().layers}
    spec = qcompile.get_recipe(recipe).weight
    assert set(rows) == {"c1", "c2"} and {r.weight_format for r in rows.values()} == {spec.short()}
    assert all(r.method == "rtn" and 0 < r.output_rel_error < 0.2 for r in rows.values())
    ref = _fake_quantized(model, spec, ["c1", "c2"])
    with torch.no_grad():
        # the compiled convs compute exactly the convs of the quantized weights
        torch.testing.assert_close(cm(x), ref(x), rtol=1e-4, atol=1e-5)
        assert _rel(cm(x), model(x)) == pytest.approx(_rel(ref(x), model(x)), rel=1e-3)


def test_group_padding_of_k_is_announced():
    model, x = ConvNet().eval(), torch.randn(2, 8, 16, 16)  # K = 8·3·3 = 72 and 16·3·3 = 144
    cm = _compile(model, x, recipe="w4a16-g32")
    assert cm.report().passes[1]["stats"]["padded_k"] == {"c1": [72, 96], "c2": [144, 160]}
    padded = [n for n in cm.report().notes if "zero-padded" in n]
    assert len(padded) == 1 and re.search(r"\(int4-g32-asym\), so K is zero-padded .*'c1' 72 → 96, 'c2' 144 → 160; "
                                          r"up to 1.33×", padded[0])
    cm = _compile(model, x, recipe="w4a16-g32", overrides={"*": "int4-g8"})  # 8 divides both
    assert not [n for n in cm.report().notes if "zero-padded" in n]


def test_conv1d_is_quantized():
    model, x = ConvNet1d().eval(), torch.randn(2, 8, 32)
    cm = _compile(model, x, recipe="w8a16")
    assert [(r.path, r.weight_format) for r in cm.report().layers] == [("c1", "int8-pc"), ("c2", "int8-pc")]
    with torch.no_grad():
        torch.testing.assert_close(cm(x), _fake_quantized(model, QuantSpec("int8"), ["c1", "c2"])(x),
                                   rtol=1e-4, atol=1e-5)


def test_channels_last_input():
    model, x = ConvNet().eval(), torch.randn(2, 8, 16, 16).to(memory_format=torch.channels_last)
    cm = _compile(model, x, recipe="w8a16")
    assert [r.weight_format for r in cm.report().layers] == ["int8-pc", "int8-pc"]
    with torch.no_grad():
        torch.testing.assert_close(cm(x), cm(x.contiguous()))
        assert _rel(cm(x), model(x)) < 0.01


def test_depthwise_conv_is_left_float_with_its_reason():
    model, x = ConvNet(depthwise=True).eval(), torch.randn(2, 8, 16, 16)
    cm = _compile(model, x, recipe="w8a16")
    report = cm.report()
    assert [(r.path, r.method) for r in report.float_layers] == [("dw", "kept float")]
    assert "depthwise conv" in report.float_layers[0].reason
    text = str(report)
    assert "left float:" in text and "dw: depthwise conv" in text
    d = json.loads(report.to_json())
    assert d["left_float"] == [{"path": "dw", "reason": report.float_layers[0].reason}]
    assert Report.from_dict(d).layers == report.layers


def test_excluded_linear_is_listed_with_the_recipe_reason():
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    cm = _compile(model, torch.randn(2, 32), recipe="w8a16", overrides={"2": None})
    (row,) = cm.report().float_layers
    assert row.path == "2" and "override '2' keeps it float" in row.reason


def test_no_quantizable_layer_warns_and_reports_no_nan():
    with pytest.warns(UserWarning, match=r"NoWeights: nothing to quantize.*no quantizable layer \(looked for nn.Linear"):
        cm = _compile(NoWeights(), torch.randn(2, 8))
    text = str(cm.report())
    assert "nan" not in text and "no quantizable layer found" in text
    assert cm.report().to_dict()["totals"]["ratio_to_fp16"] is None


def test_every_layer_excluded_warns():
    model = nn.Sequential(nn.Linear(32, 32)).eval()
    with pytest.warns(UserWarning, match=r"Sequential: nothing to quantize.*every linear layer is kept float.*'0'"):
        cm = _compile(model, torch.randn(2, 32), overrides={"*": None})
    assert "nothing was quantized (1 layer left float)" in str(cm.report())


def test_override_matching_nothing_names_the_pattern_and_real_paths():
    with pytest.warns(UserWarning, match=r"override 'conv\*' matches no layer; the quantizable layers are 'c1', 'c2'"):
        _compile(ConvNet().eval(), torch.randn(2, 8, 16, 16), recipe="w8a16", overrides={"conv*": "int4"})


def test_override_on_a_depthwise_conv_says_it_cannot_be_quantized():
    with pytest.warns(UserWarning, match=r"override 'dw' matches no quantizable layer.*'dw' \(depthwise conv"):
        _compile(ConvNet(depthwise=True).eval(), torch.randn(2, 8, 16, 16), recipe="w8a16", overrides={"dw": "int8"})


def test_conv_artifact_round_trip(tmp_path):
    model, x = ConvNet(depthwise=True).eval(), torch.randn(2, 8, 16, 16)
    cm = _compile(model, x, recipe="w4a16-g32")
    cm.save(tmp_path / "a")
    loaded = qcompile.load(tmp_path / "a", ConvNet(depthwise=True), x)  # random weights, same architecture
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), cm(x), rtol=0, atol=0)
    assert loaded.report().layers == cm.report().layers
    assert [(r.path, r.method) for r in loaded.report().layers] == [("c1", "rtn"), ("c2", "rtn"), ("dw", "kept float")]
    ops = [n for n in loaded.graph_module.graph.nodes if n.target == QUANTIZED_LINEAR]
    assert [n.meta[DECISION].weight.short() for n in ops] == ["int4-g32-asym"] * 2



def test_conv_runs_through_the_triton_kernels(monkeypatch):
    """The GPU path gets the same linear (K = 72: not a multiple of the group or the block)."""
    gemm = pytest.importorskip("qcompile.codegen.gemm")
    model, x = ConvNet().eval().half(), torch.randn(1, 8, 8, 8).half()
    cm = _compile(model, x, recipe="w4a16-g32", verify=False)
    ref = cm(x)
    if torch.cuda.is_available():  # natively: CUDA tensors (the interpreter takes CPU ones)
        cm, x = cm.to("cuda"), x.cuda()
    calls, kernel = [], gemm.triton_quantized_linear
    monkeypatch.setattr(gemm, "triton_quantized_linear", lambda *a: calls.append(a[0].shape) or kernel(*a))
    with gemm.force_triton():
        out = cm(x)
    assert [tuple(s) for s in calls] == [(1, 8, 8, 72), (1, 4, 4, 144)]
    torch.testing.assert_close(out.float().cpu(), ref.float(), rtol=2e-2, atol=2e-2)


def test_conv_keeps_batch_and_spatial_sizes_dynamic():
    """The im2col rewrite must not specialize the traced sizes (a batch-1 example included)."""
    model = ConvNet().eval()
    cm = _compile(model, torch.randn(1, 8, 16, 16), recipe="w8a16")
    assert [n for n in cm.report().notes if "static" in n] == ["argument x dim 1 is static at 8 (the model's code fixes it)"]
    x = torch.randn(3, 8, 12, 10)
    assert _rel(cm(x), model(x)) < 0.02
