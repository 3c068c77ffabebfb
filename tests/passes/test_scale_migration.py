"""Scale migration (SmoothQuant, AWQ + clipping, OS+ shift): exact folds on every family and the
real MiniLM, accuracy on planted outliers, save/load round trips, extras in the report."""

import copy
import warnings

import pytest
import torch

import qcompile
import qcompile.passes.scale_migration  # noqa: F401  (registers smooth_quant, awq, awq_clip, os_shift)
from qcompile.formats import QuantSpec
from qcompile.frontend import export_model
from qcompile.ir.annotations import decision_of, set_decision
from qcompile.ir.graph import linear_nodes, module_path
from qcompile.ir.interpret import run_recording
from qcompile.ir.ops import CHANNEL_SCALE
from qcompile.passes import (
    OnLoad,
    Pass,
    PassContext,
    PassManager,
    PassResult,
    make_pass,
    register_pass,
    scale_math,
)
from qcompile.passes.calibration import make_calibration
from qcompile.passes.scale_migration import AWQ, AWQClip, OSShift, SmoothQuant
from qcompile.recipes import get_recipe
from qcompile.targets import get_target
from tests.outlier_models import outlier_llama
from tests.tiny_models import FAMILIES, VOCAB, tiny_inputs, tiny_model

HEAD = ["canonicalize", "assign_quant_specs", "fold_norm_scales"]
TAIL = ["quantize_weights", "lower"]
ACT_RECIPE = {"llama": "w8a8", "qwen2": "w4a8", "mistral": "w4a4", "gpt2": "w8a8", "opt": "w4a8", "bert": "w4a4"}
SQ_FOLDS = {  # where each family's attention smoothing scales go
    "llama": {"norm", "linear"}, "qwen2": {"norm", "linear"}, "mistral": {"norm", "linear"},
    "opt": {"norm", "linear"}, "gpt2": {"norm", "channel_scale"}, "bert": {"linear", "channel_scale"},
}
AWQ_FOLDS = {  # and the MLPs' AWQ scales (OPT: fc1 → ReLU → fc2; GELU and BERT's residual need a channel_scale)
    "llama": {"norm", "linear"}, "qwen2": {"norm", "linear"}, "mistral": {"norm", "linear"},
    "opt": {"norm", "linear"}, "gpt2": {"norm", "channel_scale"}, "bert": {"channel_scale"},
}
W4A16 = QuantSpec("int4", group_size=128, symmetric=False)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tests run many small matmuls and quantizations; intra-op threads only contend for
    them (10-20x slower on a loaded 2-core machine), so this module runs single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _is_mlp(path):
    return (".mlp." in path or path.endswith((".fc1", ".fc2", "intermediate.dense"))
            or (path.endswith("output.dense") and ".attention." not in path))


@register_pass("test_weight_only_mlp")
class WeightOnlyMLP(Pass):
    """Test helper, a mixed recipe: the MLP linears become weight-only W4A16 while attention keeps
    the recipe's activation-quantized decision, so one compile exercises ``os_shift`` and
    ``smooth_quant`` (attention) and ``awq`` / ``awq_clip`` (MLP). Decisions are restored at load."""

    exact = True
    requires = ("quant_decisions",)
    runs_after = ("assign_quant_specs",)
    runs_before = ("fold_norm_scales", "os_shift", "smooth_quant", "awq", "awq_clip", "quantize_weights")
    on_load = OnLoad.SKIP

    def run(self, gm, ctx):
        for node in linear_nodes(gm):
            d = decision_of(node)
            if d is not None and d.quantized and _is_mlp(module_path(node)):
                set_decision(node, d.replace(weight=W4A16, activation=None, source="test: weight-only MLP"))
        return PassResult(False)


def mixed(forced=True):
    """The mixed pipeline's scale passes (``forced``: smoothing and shifting every group they can, so
    every fold is exercised and verified, not only those the error search prefers)."""
    return ["test_weight_only_mlp", OSShift(only_if_better=not forced), SmoothQuant(allow_identity=not forced),
            AWQ(), AWQClip()]


def _compile(model, recipe, passes, example=None, calibration=None, verify=True):
    example = example if example is not None else tiny_inputs()
    calibration = calibration if calibration is not None else [tiny_inputs(4, 16) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return qcompile.compile(model, example, recipe=recipe, passes=HEAD + list(passes) + TAIL,
                                calibration=calibration, verify=verify, progress=False)


def _records(cm):
    return {p["name"]: p for p in cm.report().to_dict()["passes"]}


def _assert_verified(record):
    assert record["changed"], record
    assert record["exact"] and record["verified_rel_error"] is not None, record
    assert record["verified_rel_error"] <= 1e-6, record


@pytest.mark.parametrize("family", FAMILIES)
def test_scale_migration_is_exact(family):
    """os_shift and smooth_quant on the attention linears (W8A8 / W4A8 / W4A4), awq on the MLPs
    (W4A16), each verified in float64 by the pass manager; awq_clip is the lossy part."""
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cm = _compile(model, ACT_RECIPE[family], mixed())
    rec = _records(cm)
    for name in ("os_shift", "smooth_quant", "awq"):  # every family has a foldable shift (LN bias or V → O)
        _assert_verified(rec[name])
    assert set(rec["smooth_quant"]["stats"]["folds"]) == SQ_FOLDS[family]
    assert set(rec["awq"]["stats"]["folds"]) == AWQ_FOLDS[family]
    assert rec["smooth_quant"]["stats"]["left_alone"] == 0
    assert not rec["awq_clip"]["exact"] and rec["awq_clip"]["changed"]
    clip = rec["awq_clip"]["stats"]
    assert clip["mean_error_after"] <= clip["mean_error_before"]
    channel_scales = [n for n in cm.graph_module.graph.nodes if n.target == CHANNEL_SCALE]
    assert bool(channel_scales) == ("channel_scale" in SQ_FOLDS[family] | AWQ_FOLDS[family])

    layers = [x for x in cm.report().layers if x.method != "kept float"]  # the report carries the extras
    for layer in layers:
        if layer.activation_format is not None:
            info = layer.passes["smooth_quant"]
            assert 0.3 <= info["alpha"] <= 0.9 and info["fold"] in SQ_FOLDS[family]
            assert 0 < info["scale_min"] <= info["scale_max"]
        else:
            awq, clipped = layer.passes["awq"], layer.passes["awq_clip"]
            assert awq["error"] <= awq["error_rtn"] and awq["fold"] in AWQ_FOLDS[family] | {"none"}
            assert 0.5 <= clipped["min_ratio"] <= clipped["mean_ratio"] <= 1.0
            assert clipped["error"] <= clipped["error_before"]
    assert any("os_shift" in x.passes for x in layers)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the user's model is untouched


def test_exact_on_minilm():
    """The real all-MiniLM-L6-v2: smooth_quant on attention (W8A8), awq on the FFN (W4A16)."""
    from qcompile.demo import load_minilm, readme_sentences

    model, tokenizer, _ = load_minilm()
    sentences = readme_sentences()
    enc = tokenizer(sentences[:4], padding=True, truncation=True, max_length=32, return_tensors="pt")
    example = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = qcompile.compile(model, example, recipe="w8a8", passes=HEAD + ["test_weight_only_mlp", "smooth_quant", "awq"]
                              + TAIL, calibration=sentences[4:12], tokenizer=tokenizer, progress=False, verify=True)
    rec = _records(cm)
    for name in ("smooth_quant", "awq"):
        _assert_verified(rec[name])
        assert rec[name]["stats"]["folds"].get("channel_scale")  # post-norm residual streams, GELU
        errors = [layer.passes[name] for layer in cm.report().layers if name in layer.passes]
        assert errors and all(e["error"] <= e["error_rtn"] for e in errors)
    assert rec["smooth_quant"]["stats"]["folds"].get("linear")  # value → attention output


# ----------------------------------------------------------------------------- planted outliers
@pytest.fixture(scope="module")
def outliers():
    """The planted-outlier Llama exported once (each variant runs its passes on a copy, as compile
    does); calibration batches distinct from the evaluation batch."""
    model = outlier_llama()
    gen = torch.Generator().manual_seed(1234)
    example = (torch.randint(0, VOCAB, (2, 16), generator=gen),)
    calibration = [(torch.randint(0, VOCAB, (4, 32), generator=gen),) for _ in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = export_model(model, example, {})
    ref, _ = run_recording(exported.gm, exported.args, exported.kwargs, names=())
    return exported, make_calibration(calibration, exported.args, exported.kwargs, exported.pinned_kwargs), ref[0]


def _loss(outliers, recipe_name, passes):
    """1 − cosine of the logits to float (``compile``'s ``output_cosine``)."""
    exported, calibration, ref = outliers
    recipe = get_recipe(recipe_name)
    gm = copy.deepcopy(exported.gm)
    ctx = PassContext(exported.args, exported.kwargs, get_target("cpu"), recipe, calibration=calibration)
    names = HEAD + passes + TAIL
    PassManager([make_pass(n, **recipe.pass_options.get(n, {})) for n in names], verify=False).run(gm, ctx)
    out, _ = run_recording(gm, exported.args, exported.kwargs, names=())
    return 1.0 - float(torch.nn.functional.cosine_similarity(ref.double().flatten(), out[0].double().flatten(), dim=0))


@pytest.mark.parametrize("recipe", ["w4a8", "w4a4"])
def test_smoothing_recovers_half_of_rtn_loss_on_outliers(outliers, recipe):
    rtn, smoothed = _loss(outliers, recipe, []), _loss(outliers, recipe, ["smooth_quant"])
    assert smoothed <= 0.5 * rtn, (rtn, smoothed)


def test_awq_beats_rtn_on_outliers(outliers):
    rtn, awq = _loss(outliers, "w4a16", []), _loss(outliers, "w4a16", ["awq", "awq_clip"])
    assert awq <= 0.5 * rtn, (rtn, awq)


# ----------------------------------------------------------------------------- save / load
CASES = [
    ("opt", "w4a8"),  # norm folds (LayerNorm weight and bias), V → O folds, a shift superseded by smoothing
    ("bert", "w4a4"),  # channel_scale nodes, V → O folds, AWQ scales in channel_scale buffers
]


def _first(out):
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize(("family", "recipe"), CASES, ids=[c[0] for c in CASES])
def test_save_load_round_trip(tmp_path, family, recipe):
    cm = _compile(tiny_model(family), recipe, mixed(), verify=False)
    cm.save(tmp_path / "art")
    fresh = tiny_model(family)
    with torch.no_grad():  # the rebuilt model's weights must not matter
        for p in fresh.parameters():
            p.add_(torch.randn_like(p))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = qcompile.load(tmp_path / "art", fresh, tiny_inputs())
    rules = {p["name"]: p["on_load"] for p in loaded.manifest["passes"]}
    assert rules == {**rules, "os_shift": "restore", "smooth_quant": "restore", "awq": "restore", "awq_clip": "skip"}
    x = tiny_inputs()
    with torch.no_grad():
        assert torch.equal(_first(cm(*x)), _first(loaded(*x)))
    n_scales = lambda m: sum(n.target == CHANNEL_SCALE for n in m.graph_module.graph.nodes)  # noqa: E731
    assert n_scales(cm) == n_scales(loaded)


# ----------------------------------------------------------------------------- the math
def test_tied_scales_follow_the_channel_map():
    index = torch.tensor([0, 1, 0, 1, 2])  # two query heads per KV channel, one channel unused by 3
    values = torch.tensor([1.0, 5.0, 3.0, 2.0, 4.0])
    assert scale_math.tied_reduce(values, index, 4, "amax")[:3].tolist() == [3.0, 5.0, 4.0]
    assert scale_math.tied_reduce(values, index, 4, "mean")[:3].tolist() == [2.0, 3.5, 4.0]
    s = scale_math.smooth_scale(torch.tensor([8.0, 0.0, 2.0]), torch.tensor([0.5, 1.0, 2.0]), 0.5)
    assert s[1] == 1.0 and s[0] > s[2]  # a channel that never fires keeps 1


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("recipe", ["w8a8-smooth", "w4a16-awq"])
def test_scale_migration_runs_on_the_models_device(device, recipe):
    """Smoothing and AWQ on a model on ``device`` (GQA: the tied channel map), calibration there too:
    the statistics and the folded scales stay on the model's device (on CUDA, a CPU tensor in
    ``tied_reduce`` once failed every smoothed recipe)."""
    model = tiny_model("llama").to(device)
    ids = torch.randint(0, VOCAB, (2, 12), device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = qcompile.compile(model, {"input_ids": ids}, recipe=recipe, calibration=[{"input_ids": ids}],
                              progress=False, verify=False)
    with torch.no_grad():
        ref, out = model(ids).logits, cm(ids).logits
    assert out.device.type == device
    assert torch.nn.functional.cosine_similarity(ref.flatten().double(), out.flatten().double(), dim=0) > 0.99


def test_clip_search_never_loses_on_its_rows():
    w, x = torch.randn(32, 64), torch.randn(128, 64)
    w[0, 0] = 12.0  # one outlier weight: clipping its group pays
    clipped, ratio, before, after = scale_math.clip_search(w, x, QuantSpec("int4", group_size=32, symmetric=False),
                                                           (1.0, 0.9, 0.8, 0.7, 0.6, 0.5))
    assert ratio.shape == (32, 2) and after <= before
    assert clipped.abs().max() <= 12.0
