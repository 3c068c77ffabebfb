"""export_onnx end to end: tiny Llama, Qwen2, GPT-2 and BERT from configs and the real MiniLM run in
ONNX Runtime and agree with the compiled model on fresh inputs of another batch and sequence length
than the trace (2 x 8); unsupported formats fail by name with nothing written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import qcompile  # noqa: E402
from qcompile.codegen.op_schema import QuantizedLinearCall, quantized_linear_nodes  # noqa: E402
from qcompile.ir.ops import CHANNEL_SCALE, HADAMARD_TRANSFORM  # noqa: E402
from qcompile.onnx_export import OnnxExportError, export_onnx  # noqa: E402
from qcompile.onnx_export import export as export_module  # noqa: E402
from tests.tiny_models import VOCAB, tiny_inputs, tiny_model  # noqa: E402

FRESH_BATCH, FRESH_SEQ = 3, 11


def _session(path: Path, optimized: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _first_tensor(out) -> torch.Tensor:
    return next(t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


def _assert_matches_compiled(path: Path, cm, feeds: dict[str, torch.Tensor], cosine: float = 0.99999,
                             max_rel: float = 1e-3) -> None:
    """ONNX Runtime's first output vs the compiled model's own, on ``feeds``."""
    got = _session(path).run(None, {k: v.numpy() for k, v in feeds.items()})[0]
    ref = _first_tensor(cm(**feeds)).numpy()
    assert got.shape == ref.shape
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    cos = float((got.ravel().astype(np.float64) @ ref.ravel()) / np.linalg.norm(got) / np.linalg.norm(ref))
    assert rel <= max_rel and cos >= cosine, (rel, cos)


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def _fresh_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (FRESH_BATCH, FRESH_SEQ), generator=torch.Generator().manual_seed(1))


def test_llama_every_weight_format(tmp_path):
    """MatMulNBits at 8, 4, 3 (4-bit containers) and 2 bits, symmetric and asymmetric, grouped and per
    channel, and DequantizeLinear for fp8 and MXFP8, in one tiny Llama; the compiled model is unchanged."""
    overrides = {"*.q_proj": "int8", "*.k_proj": "int4-g32", "*.v_proj": "int2-g64-asym", "*.o_proj": "int3-g128",
                 "*.gate_proj": "fp8_e4m3", "*.up_proj": "mxfp8", "*.down_proj": "int2-pc"}
    cm = qcompile.compile(tiny_model("llama", layers=1), tiny_inputs(), target="ort-cpu", recipe="w4a16",
                          overrides=overrides, progress=False)
    code, state = cm.graph_module.code, {k: v.clone() for k, v in cm.graph_module.state_dict().items()}
    path = tmp_path / "llama.onnx"
    report = export_onnx(cm, tiny_inputs(), path)

    ops = {layer.path.rsplit(".", 1)[-1]: layer.onnx_op for layer in report.layers}
    assert ops["q_proj"] == "MatMulNBits(bits=8, block_size=64)"
    assert ops["k_proj"] == "MatMulNBits(bits=4, block_size=32)"
    assert ops["v_proj"] == "MatMulNBits(bits=2, block_size=64, zero_points)"
    assert ops["o_proj"].startswith("MatMulNBits(bits=4, block_size=128") and "int3" in ops["o_proj"]
    assert ops["gate_proj"] == "DequantizeLinear(float8_e4m3fn, per column) + MatMul"
    assert ops["up_proj"] == "DequantizeLinear(float8_e4m3fn, block_size=32) + MatMul"
    assert ops["down_proj"] == "MatMulNBits(bits=2, block_size=128)"
    assert any("int3" in note for note in report.notes)
    assert any(n.startswith("8-bit MatMulNBits at accuracy_level 0") and "q_proj" in n for n in report.notes)
    assert any(n.startswith("fp8/MXFP8 weights") and "gate_proj" in n for n in report.notes)
    assert report.max_rel_error <= 1e-3 and report.cosine >= 0.99999
    _assert_matches_compiled(path, cm, {"input_ids": _fresh_ids()})

    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "seq"] and report.inputs == {"input_ids": ["batch", "seq"]}
    assert [o.name for o in model.graph.output] == report.outputs and report.outputs[0] == "logits"
    assert {"MatMulNBits", "DequantizeLinear", "Pow", "ReduceMean"} <= _ops(path)
    # sizes: the file is its initializers plus a small graph; the packed bytes are the compiled tensors'
    assert report.file_bytes == path.stat().st_size
    assert 0 <= report.file_bytes - report.onnx_quantized_bytes - report.float_bytes < 64 * 1024
    packed = sum(QuantizedLinearCall.from_node(n).resolve(cm.graph_module).quantized_weight().nbytes()
                 for n in quantized_linear_nodes(cm.graph_module))
    assert report.packed_bytes == packed
    assert cm.graph_module.code == code
    assert all(torch.equal(v, state[k]) for k, v in cm.graph_module.state_dict().items())


def test_gpt2_w8a8_smooth(tmp_path):
    """W8A8 (QuantizeLinear + MatMulInteger) with biases on every linear and SmoothQuant's channel_scale
    ops; ORT fuses MatMulIntegerToFloat without taking the bias in (its kernel would scale it)."""
    cm = qcompile.compile(tiny_model("gpt2", layers=1), tiny_inputs(), target="ort-cpu", recipe="w8a8-smooth",
                          progress=False, calibration=[tiny_inputs()])
    assert any(n.target == CHANNEL_SCALE for n in cm.graph_module.graph.nodes)
    path = tmp_path / "gpt2.onnx"
    report = export_onnx(cm, tiny_inputs(), path)
    assert {layer.onnx_op for layer in report.layers} == {"QuantizeLinear(uint8, per token) + MatMulInteger"}
    _assert_matches_compiled(path, cm, {"input_ids": _fresh_ids()})
    _session(path, optimized=tmp_path / "opt.onnx")
    fused = [n for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert len(fused) == len(report.layers)
    assert all(len(n.input) < 7 or not n.input[6] for n in fused)  # no bias input


def _with_random_biases(model: torch.nn.Module) -> torch.nn.Module:
    """transformers initialises biases to zero, which would hide a bias applied at the wrong scale."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and "norm" not in name.lower():
                p.copy_(0.5 * torch.randn_like(p))
    return model


def test_bert_w8a8_biases(tmp_path):
    """W8A8 with non-zero biases on post-norm BERT: the bias of a linear feeding a residual add goes into
    ONNX Runtime's SkipLayerNormalization (as its bias input), the others stay out of the
    MatMulIntegerToFloat fusion, and the output matches the compiled model."""
    model = _with_random_biases(tiny_model("bert", layers=2))
    inputs = {"input_ids": tiny_inputs()[0]}
    cm = qcompile.compile(model, inputs, target="ort-cpu", recipe="w8a8", progress=False)
    path = tmp_path / "bert.onnx"
    report = export_onnx(cm, inputs, path)
    assert any("bias added to the residual" in note and "(4 layers)" in note for note in report.notes)
    _assert_matches_compiled(path, cm, {"input_ids": _fresh_ids()}, cosine=0.9995, max_rel=2e-2)
    _session(path, optimized=tmp_path / "opt.onnx")
    nodes = onnx.load(str(tmp_path / "opt.onnx")).graph.node
    skip = [n for n in nodes if n.op_type == "SkipLayerNormalization"]
    assert len(skip) == 4 and all(len(n.input) == 5 and n.input[4].endswith("dense.bias") for n in skip)
    fused = [n for n in nodes if n.op_type == "MatMulIntegerToFloat"]
    assert len(fused) == 12 and all(len(n.input) < 7 or not n.input[6] for n in fused)


def test_bert_w8a8_per_tensor(tmp_path):
    """w8a8-pt-smooth: per-tensor uint8 activations export as DynamicQuantizeLinear + MatMulInteger, which
    ONNX Runtime fuses into DynamicQuantizeMatMul (bias inside) or, where Q/K/V share the input, one
    DynamicQuantizeLinear feeding MatMulIntegerToFloats; the FFN down projections stay per token. The codes
    are ONNX's own definition, so ONNX Runtime matches the compiled model to float32 rounding."""
    model = _with_random_biases(tiny_model("bert", layers=2))
    inputs = {"input_ids": tiny_inputs()[0]}
    cm = qcompile.compile(model, inputs, target="ort-cpu", recipe="w8a8-pt-smooth", progress=False)
    path = tmp_path / "bert.onnx"
    report = export_onnx(cm, inputs, path)
    ops = {layer.path: layer.onnx_op for layer in report.layers}
    assert ops["encoder.layer.0.output.dense"].startswith("QuantizeLinear(uint8, per token)")
    assert ops["encoder.layer.0.attention.self.query"].startswith("DynamicQuantizeLinear(uint8, per tensor)")
    _assert_matches_compiled(path, cm, {"input_ids": _fresh_ids()}, cosine=0.99999, max_rel=1e-3)
    _session(path, optimized=tmp_path / "opt.onnx")
    fused = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert fused.count("DynamicQuantizeMatMul") == 4 and fused.count("DynamicQuantizeLinear") == 2
    assert fused.count("MatMulIntegerToFloat") == 6 + 2  # Q/K/V per layer, and the per-token down projections


def test_qwen2_from_module(tmp_path, monkeypatch):
    """An nn.Module is compiled for the target first (the target's default recipe, w4a16)."""
    compiled = []

    def compile_and_keep(*args, **kwargs):
        compiled.append(real_compile(*args, **kwargs))
        return compiled[-1]

    real_compile = qcompile.compile
    monkeypatch.setattr(qcompile, "compile", compile_and_keep)
    path = tmp_path / "qwen2.onnx"
    report = export_onnx(tiny_model("qwen2", layers=1), tiny_inputs(), path, progress=False)
    assert report.recipe == "w4a16" and report.target == "ort-cpu"
    (cm,) = compiled
    assert cm.target.name == "ort-cpu" and cm.recipe.name == "w4a16"
    _assert_matches_compiled(path, cm, {"input_ids": _fresh_ids()})


def test_bert_rotated_with_mask(tmp_path):
    """Online Hadamards (post-norm encoder: before every quantized input) as MatMul chains, LayerNorm,
    GPTQ weights; the attention mask is an input with the same dynamic axes."""
    ids = tiny_inputs()[0]
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    cm = qcompile.compile(tiny_model("bert", layers=1), example, target="ort-cpu", recipe="w4a16-rotate-gptq",
                          progress=False, calibration=[example])
    assert any(n.target == HADAMARD_TRANSFORM for n in cm.graph_module.graph.nodes)
    path = tmp_path / "bert.onnx"
    report = export_onnx(cm, example, path)
    assert report.inputs == {"input_ids": ["batch", "seq"], "attention_mask": ["batch", "seq"]}
    assert "LayerNormalization" in _ops(path)
    fresh = _fresh_ids()
    mask = torch.ones_like(fresh)
    mask[0, 7:] = 0
    _assert_matches_compiled(path, cm, {"input_ids": fresh, "attention_mask": mask})


def test_bert_grouped_rotation_is_three_nodes_per_transform(tmp_path):
    """``rotate_online(group_size=32)``: each transform ``I ⊗ Q_32`` exports as Reshape, one MatMul by a
    32 x 32 matrix with the signs folded in, Reshape (no sign Mul, no left factor); ONNX Runtime equals
    the compiled model."""
    from qcompile.passes.rotation_online import RotateOnline

    ids = tiny_inputs()[0]
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    passes = ["canonicalize", "assign_quant_specs", RotateOnline(targets="all", group_size=32), "quantize_weights",
              "lower"]
    cm = qcompile.compile(tiny_model("bert", layers=1), example, target="ort-cpu", recipe="w4a16-sym", passes=passes,
                          progress=False, verify=False)
    path = tmp_path / "bert.onnx"
    export_onnx(cm, example, path)
    model = onnx.load(str(path))
    hadamard_factors = [t for t in model.graph.initializer if "hadamard_right" in t.name]
    assert hadamard_factors and all(list(t.dims) == [32, 32] for t in hadamard_factors)
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and any("hadamard_right" in i for i in n.input)]
    assert len(matmuls) == 4  # Q/K/V share one; the output projection, intermediate and output dense one each
    assert not any(n.op_type == "Mul" and any("online_signs" in i for i in n.input) for n in model.graph.node)
    fresh = _fresh_ids()
    _assert_matches_compiled(path, cm, {"input_ids": fresh, "attention_mask": torch.ones_like(fresh)})


def test_minilm_w4a16(tmp_path):
    from qcompile.demo import load_minilm

    model, tokenizer, enc = load_minilm(max_sentences=4)
    cm = qcompile.compile(model, enc, target="ort-cpu", recipe="w4a16", progress=False, verify=False)
    path = tmp_path / "minilm.onnx"
    report = export_onnx(cm, enc, path)
    assert len(report.layers) == 36
    fresh = tokenizer(["A different sentence, not among the examples.", "Short.", "ONNX Runtime runs it."],
                      padding=True, return_tensors="pt")
    assert fresh["input_ids"].shape[0] != enc["input_ids"].shape[0]
    _assert_matches_compiled(path, cm, {"input_ids": fresh["input_ids"], "attention_mask": fresh["attention_mask"]})


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64)).eval()


@pytest.mark.parametrize(("recipe", "overrides", "match"), [
    ("nvfp4-w4a16", None, r"recipe 'nvfp4-w4a16' \(the recipe\): weight format nvfp4: .*supported weight formats: int8"),
    ("w4a8", None, r"activations fp8_e4m3-pc-dynamic: .*supported activation quantization: int8 per-token"),
    ("w4a16", {"2": "mxfp4"}, r"override '2'\): weight format mxfp4"),
])
def test_unsupported_recipe_fails_before_compiling(tmp_path, monkeypatch, recipe, overrides, match):
    monkeypatch.setattr(qcompile, "compile", lambda *a, **k: pytest.fail("compiled an unexportable recipe"))
    path = tmp_path / "m.onnx"
    with pytest.raises(OnnxExportError, match=match):
        export_onnx(_mlp(), torch.randn(4, 64), path, recipe=recipe, overrides=overrides)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("override", "match"), [
    ("mxfp4", r"layer 2: weight format mxfp4: .*CPU DequantizeLinear has no float4e2m1 kernel; supported weight formats"),
    ("int4-g24", r"layer 2: weight int4-g24: MatMulNBits block sizes are powers of two from 16 \(4-bit\), not group 24"),
])
def test_unsupported_layer_of_a_compiled_model(tmp_path, override, match):
    cm = qcompile.compile(_mlp(), torch.randn(4, 64), recipe="w4a16", overrides={"2": override}, progress=False)
    with pytest.raises(OnnxExportError, match=match):
        export_onnx(cm, torch.randn(4, 64), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_external_data_and_accuracy_level(tmp_path):
    cm = qcompile.compile(_mlp(), torch.randn(4, 64), recipe="w4a16-g32", progress=False)
    x = torch.randn(20, 64)  # above 16 rows the compiled model's CPU kernel is float32 (bf16 below)
    path = tmp_path / "mlp.onnx"
    report = export_onnx(cm, torch.randn(4, 64), path, external_data_threshold=0)
    assert report.external_data == str(tmp_path / "mlp.onnx.data") and Path(report.external_data).stat().st_size > 0
    assert report.file_bytes == path.stat().st_size + Path(report.external_data).stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx", "mlp.onnx.data"]
    _assert_matches_compiled(path, cm, {"input": x})
    nodes = [n for n in onnx.load(str(path)).graph.node if n.op_type == "MatMulNBits"]
    assert nodes and not [a for n in nodes for a in n.attribute if a.name == "accuracy_level"]  # 0: the default

    fast = export_onnx(cm, torch.randn(4, 64), tmp_path / "fast.onnx", accuracy_level=4)
    attrs = [a for n in onnx.load(str(tmp_path / "fast.onnx")).graph.node if n.op_type == "MatMulNBits"
             for a in n.attribute if a.name == "accuracy_level"]
    assert {a.i for a in attrs} == {4} and fast.external_data is None
    assert any("accuracy_level 4" in note for note in fast.notes)


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    cm = qcompile.compile(_mlp(), torch.randn(4, 64), recipe="w8a16", progress=False)

    def broken(file: Path) -> None:
        raise OnnxExportError("checker says no")

    monkeypatch.setattr(export_module, "_check_written", broken)
    with pytest.raises(OnnxExportError, match="checker says no"):
        export_onnx(cm, torch.randn(4, 64), tmp_path / "m.onnx", external_data_threshold=0)
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments(tmp_path):
    cm = qcompile.compile(_mlp(), torch.randn(4, 64), recipe="w8a16", progress=False)
    with pytest.raises(OnnxExportError, match="not an ONNX Runtime target"):
        export_onnx(cm, torch.randn(4, 64), tmp_path / "m.onnx", target="cpu")
    with pytest.raises(TypeError, match="exported as compiled; recipe"):
        export_onnx(cm, torch.randn(4, 64), tmp_path / "m.onnx", recipe="w4a16")
    with pytest.raises(OnnxExportError, match="is a directory"):
        export_onnx(cm, torch.randn(4, 64), tmp_path)
    with pytest.raises(OnnxExportError, match="does not exist"):
        export_onnx(cm, torch.randn(4, 64), tmp_path / "missing" / "m.onnx")


def test_cli_export_onnx(tmp_path, capsys):
    from qcompile.cli import main

    src = tmp_path / "llama"
    tiny_model("llama", layers=1).save_pretrained(src)
    out = tmp_path / "llama.onnx"
    assert main(["export-onnx", str(src), "--recipe", "w8a16", "--out", str(out), "--json", "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["path"] == str(out) and printed["recipe"] == "w8a16"
    assert printed["file_bytes"] == os.path.getsize(out) and len(printed["layers"]) == 7
    _session(out).run(None, {"input_ids": _fresh_ids().numpy()})

    bad = tmp_path / "bad.onnx"
    assert main(["export-onnx", str(src), "--recipe", "nvfp4-w4a16", "--out", str(bad)]) == 2
    assert "weight format nvfp4" in capsys.readouterr().err and not bad.exists()


def test_rotation_with_a_non_power_of_two_block_exports(tmp_path):
    """Hidden 96 = 32 · 3 and intermediate 176 = 16 · 11: the rotation passes add Hadamard blocks as
    untraced constants (no recorded shape); the export reads their size from the tensor."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=96, intermediate_size=176, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB)
    model = LlamaForCausalLM(config).eval()
    x = {"input_ids": torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))}
    cm = qcompile.compile(model, x, target="ort-cpu", recipe="w4a16-rotate-gptq", calibration=[x], progress=False,
                          verify=False)
    blocks = [n for n in cm.graph_module.graph.nodes if n.target == HADAMARD_TRANSFORM and n.args[2] is not None]
    assert blocks, "the recipe inserted no blocked Hadamard"
    path = tmp_path / "rotated.onnx"
    export_onnx(cm, x, path)
    _assert_matches_compiled(path, cm, {"input_ids": _fresh_ids()})


def _exportable_recipes() -> list[str]:
    from qcompile.onnx_export.export import precheck_recipe
    from qcompile.recipes import RECIPES

    names = []
    for name, rcp in sorted(RECIPES.items()):
        if rcp.weight is None:      # "none": nothing to lower to ONNX Runtime's quantized ops
            continue
        try:
            precheck_recipe(rcp, None)
        except OnnxExportError:
            continue
        names.append(name)
    return names


EXPORTABLE = _exportable_recipes()
FAMILY_CYCLE = ("llama", "qwen2", "gpt2", "bert")


@pytest.mark.parametrize("index,recipe", list(enumerate(EXPORTABLE)))
def test_every_exportable_recipe_runs_in_onnx_runtime(index, recipe, tmp_path):
    """Each recipe whose formats map to ONNX Runtime ops, on one of the four families in turn (every
    family sees several recipes; one export each keeps the suite fast): exported, checked against the
    compiled model on fresh inputs (W8A8 by the activation-rounding bound of docs/onnx-export.md)."""
    family = FAMILY_CYCLE[index % len(FAMILY_CYCLE)]
    x = tiny_inputs()
    cm = qcompile.compile(tiny_model(family, layers=1), x, target="ort-cpu", recipe=recipe,
                          calibration=[tiny_inputs(seq=8), tiny_inputs(seq=8)], progress=False, verify=False)
    path = tmp_path / f"{family}-{recipe}.onnx"
    report = export_onnx(cm, x, path)
    assert report.layers and all(layer.onnx_op for layer in report.layers)
    w8a8 = cm.recipe.activation is not None
    _assert_matches_compiled(path, cm, {"input_ids": _fresh_ids()}, cosine=0.995 if w8a8 else 0.99999,
                             max_rel=5e-2 if w8a8 else 1e-3)
