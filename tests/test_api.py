import json

import pytest
import torch

import qcompile
from qcompile.codegen.quantized_linear import QUANTIZED_LINEAR
from tests.tiny_models import FAMILIES, tiny_inputs, tiny_model


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.detach().double().flatten(), b.detach().double().flatten(), dim=0))


@pytest.mark.parametrize("family", FAMILIES)
def test_w8a16_matches_float(family):
    model = tiny_model(family)
    ids = tiny_inputs()
    cm = qcompile.compile(model, ids, target="cpu", recipe="w8a16", progress=False)
    lowered = [n for n in cm.graph_module.graph.nodes if n.target == QUANTIZED_LINEAR]
    assert len(lowered) >= 8
    other = torch.randint(0, 256, (3, 5))
    with torch.no_grad():
        ref = model(other, use_cache=False)[0] if family != "bert" else model(other)[0]
    out = cm(other)[0]
    assert type(cm(other)) is type(model(other))
    assert _cos(out, ref) >= 0.999
    assert cm.report().output_cosine >= 0.999


@pytest.mark.parametrize("recipe", ["w4a16", "w4a16-g32", "nvfp4-w4a16", "mxfp4-w4a16", "w8a8", "w4a8", "w4a4", "fp8", "nvfp4", "mxfp4"])
def test_every_recipe_compiles_and_runs(recipe):
    model = tiny_model("llama")
    cm = qcompile.compile(model, tiny_inputs(), target="blackwell", recipe=recipe, progress=False)
    out = cm(*tiny_inputs())
    assert torch.isfinite(out.logits).all()
    floor = 0.9 if recipe in ("w4a4", "nvfp4", "mxfp4") else 0.97
    assert cm.report().output_cosine >= floor, (recipe, cm.report().output_cosine)


def test_bytes_shrink_as_the_format_says():
    model = tiny_model("llama")
    cm = qcompile.compile(model, tiny_inputs(), recipe="w4a16", overrides={"*": "int4-g64"}, progress=False)
    layers = [layer for layer in cm.report().layers if layer.weight_format.startswith("int4")]
    ratio = sum(layer.bytes_after for layer in layers) / sum(layer.bytes_fp16 for layer in layers)
    assert 0.25 <= ratio <= 0.28  # 4 bits + fp16 scale per 64 = 4.25 bits → 0.266× of fp16


def test_lm_head_stays_float_by_default_and_overrides_apply():
    cm = qcompile.compile(tiny_model("llama"), tiny_inputs(), recipe="w4a16",
                          overrides={"model.layers.0.*": None, "*.mlp.down_proj": "int8"}, progress=False)
    fmt = {layer.path: layer.weight_format for layer in cm.report().layers}
    assert fmt["lm_head"] == "float32"
    assert fmt["model.layers.1.mlp.down_proj"] == "int8-pc"
    assert fmt["model.layers.0.mlp.down_proj"] == "float32"
    assert fmt["model.layers.1.self_attn.q_proj"] == "int4-g128-asym"


def test_users_model_is_not_mutated():
    model = tiny_model("llama").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qcompile.compile(model, tiny_inputs(), recipe="w4a16", progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training


class Odd(torch.nn.Module):
    """in_features 100: not a multiple of any group size."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(100, 72)
        self.b = torch.nn.Linear(72, 10)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_in_features_not_divisible_by_group():
    model = Odd().eval()
    x = torch.randn(4, 100)
    cm = qcompile.compile(model, x, recipe="w4a16-g32", progress=False)
    assert _cos(cm(x), model(x)) > 0.99
    assert {layer.path: layer.bits_per_weight > 4 for layer in cm.report().layers} == {"a": True, "b": True}


def test_unknown_target_and_recipe_list_valid_names():
    with pytest.raises(ValueError, match="valid targets: cpu, ampere, hopper, blackwell"):
        qcompile.compile(Odd(), torch.randn(2, 100), target="tpu")
    with pytest.raises(ValueError, match="valid recipes: none, w8a16, w4a16"):
        qcompile.compile(Odd(), torch.randn(2, 100), recipe="w5a5")


def test_report_table_dict_json():
    cm = qcompile.compile(tiny_model("qwen2"), tiny_inputs(), recipe="w4a16", progress=False)
    report = cm.report()
    text = str(report)
    assert "model.layers.0.mlp.gate_proj" in text and "int4-g128-asym" in text
    d = json.loads(report.to_json())
    assert d["totals"]["linear_bytes_after"] < d["totals"]["linear_bytes_before"]
    assert all(layer["output_rel_error"] is not None for layer in d["layers"])
    assert [p["name"] for p in d["passes"]] == ["canonicalize", "assign_quant_specs", "quantize_weights", "lower"]


def test_save_and_load_round_trip(tmp_path):
    model = tiny_model("mistral")
    cm = qcompile.compile(model, tiny_inputs(), recipe="w4a16", progress=False)
    cm.save(tmp_path / "art")
    assert (tmp_path / "art" / "weights.safetensors").exists()
    fresh = tiny_model("mistral")  # same architecture; its weights are not used
    with torch.no_grad():
        for p in fresh.parameters():
            p.normal_()
    cm2 = qcompile.load(tmp_path / "art", fresh, tiny_inputs())
    ids = torch.randint(0, 256, (2, 6))
    torch.testing.assert_close(cm2(ids).logits, cm(ids).logits, rtol=0, atol=0)


def test_load_rejects_a_different_architecture(tmp_path):
    cm = qcompile.compile(tiny_model("llama"), tiny_inputs(), recipe="w8a16", progress=False)
    cm.save(tmp_path / "art")
    with pytest.raises((ValueError, RuntimeError)):
        qcompile.load(tmp_path / "art", tiny_model("llama", layers=1), tiny_inputs())
