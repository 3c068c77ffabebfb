"""The mixed_precision pass through compile(): budgets, quality floors, ties, errors, load."""

from __future__ import annotations

import pytest
import torch

import qcompile
import qcompile.passes.mixed_precision as mp_pass
from qcompile.ir.annotations import decided_nodes
from qcompile.passes.mixed_precision import MixedPrecision, MixedPrecisionError
from tests.tiny_models import tiny_inputs, tiny_model

CANDIDATES = ["int8", "int4-g32-asym", "int2-g32-asym", None]
CACHE: dict = {}
"""Shared by the compiles of one model, calibration and candidates: sensitivities measured once."""


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", layers=1)


@pytest.fixture(scope="module")
def calibration():
    torch.manual_seed(1)
    return [tiny_inputs(2, 16)]


def _compile(model, calibration, **kwargs):
    kwargs.setdefault("mixed_precision", {"candidates": CANDIDATES, "cache": CACHE})
    return qcompile.compile(model, tiny_inputs(), recipe="w4a16", calibration=calibration, progress=False, **kwargs)


@pytest.fixture(scope="module")
def budget_compiled(llama, calibration):
    return _compile(llama, calibration, budget={"bits": 5.0})


def _record(cm):
    return cm.report().mixed_precision


def test_bits_budget_is_met_ties_hold_and_decisions_are_rewritten(budget_compiled):
    rec = _record(budget_compiled)
    assert rec["totals"]["bits"] <= 5.0 + 1e-9
    choice = rec["choice"]
    layer = "model.layers.0"
    assert len({choice[f"{layer}.self_attn.{p}_proj"] for p in "qkv"}) == 1
    assert choice[f"{layer}.mlp.gate_proj"] == choice[f"{layer}.mlp.up_proj"]
    assert [f"{layer}.self_attn.{p}_proj" for p in "qkv"] in rec["ties"]
    decided = {n.meta["qcompile.module_path"]: d for n, d in decided_nodes(budget_compiled.graph_module)}
    for path, option in choice.items():
        d = decided[path]
        assert d.source == "mixed_precision" and d.extras["mixed_precision"]["option"] == option
        assert (d.weight.short() if d.weight is not None else "16-bit") == option
    # The report's own byte count of the compiled layers agrees with the budget's (16-bit counted at 2 bytes).
    layers = [lr for lr in budget_compiled.report().layers if lr.path in choice]
    counted = sum(lr.bytes_after if lr.method != "kept float" else lr.bytes_fp16 for lr in layers)
    assert counted == rec["totals"]["bytes"]


def test_at_a_uniform_recipes_size_the_choice_is_no_worse(llama, calibration, budget_compiled):
    rec = _record(budget_compiled)
    fitting = {name: err for name, (bits, err) in rec["uniform"].items() if bits <= 5.0}
    assert set(fitting) == {"int4-g32-asym", "int2-g32-asym"}
    assert rec["predicted_error"] <= min(fitting.values())
    uniform = qcompile.compile(llama, tiny_inputs(), recipe="w4a16-g32", calibration=calibration, progress=False)
    assert _cosine(budget_compiled, llama, calibration) >= _cosine(uniform, llama, calibration) - 1e-12


def _cosine(cm, model, batches):
    """The output cosine to float over ``batches`` (the calibration set: what the budget optimised)."""
    with torch.no_grad():
        ref = torch.cat([model(*b).logits.flatten() for b in batches]).double()
        out = torch.cat([cm(*b).logits.flatten() for b in batches]).double()
    return float(torch.nn.functional.cosine_similarity(ref, out, dim=0))


def test_quality_floor_is_met_with_fewer_bits_and_the_rounds_are_reported(llama, calibration):
    cm = _compile(llama, calibration, quality={"cosine": 0.999})
    rec = _record(cm)
    assert rec["measured_cosine"] >= 0.999
    assert rec["totals"]["bits"] < 16.0
    assert rec["iterations"] and all("measured_cosine" in it for it in rec["iterations"])
    met = [it["bits"] for it in rec["iterations"] if it["meets_floor"]]
    assert rec["totals"]["bits"] == pytest.approx(min(met))
    assert "solve–verify rounds" in str(cm.report())


def test_two_budgets_at_once(llama, calibration):
    cm = _compile(llama, calibration, budget={"bits": 8.5, "latency_ms": 1.0})
    rec = _record(cm)
    assert rec["totals"]["bits"] <= 8.5 and rec["totals"]["latency_ms"] <= 1.0


def test_quality_floor_under_a_budget(llama, calibration):
    cm = _compile(llama, calibration, quality={"cosine": 0.999}, budget={"bits": 6.0, "prefill_latency_ms": 10.0})
    rec = _record(cm)
    assert rec["totals"]["bits"] <= 6.0 and rec["totals"]["prefill_latency_ms"] <= 10.0
    assert all(it["bits"] <= 6.0 for it in rec["iterations"])


def test_layers_an_override_decided_keep_their_spec_and_count_in_the_budget(llama, calibration):
    from qcompile.passes.mixed_precision_cost import option_bytes
    from qcompile.passes.mixed_precision_options import parse_option

    cm = qcompile.compile(llama, tiny_inputs(), recipe="w4a16", calibration=calibration, progress=False,
                          overrides={"*.down_proj": "int8"}, budget={"bits": 5.0},
                          mixed_precision={"candidates": CANDIDATES})
    rec = _record(cm)
    down = "model.layers.0.mlp.down_proj"
    assert rec["fixed_by_overrides"] == {down: "int8-pc"} and down not in rec["choice"]
    layer = {lr.path: lr for lr in cm.report().layers}
    assert layer[down].weight_format == "int8-pc"
    chosen = sum(lr.passes["mixed_precision"]["bytes"] for lr in layer.values() if "mixed_precision" in lr.passes)
    assert rec["totals"]["bytes"] == chosen + option_bytes(parse_option("int8"), 64, 128)
    assert rec["totals"]["bits"] <= 5.0


def test_infeasible_budget_names_the_smallest_model_before_measuring(llama, calibration, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("sensitivities were measured for an infeasible budget")

    monkeypatch.setattr(mp_pass, "measure_sensitivity", refuse)
    # int2-g32-asym: 2 bits + a 16-bit scale and an 8-bit zero point per 32 weights = 2.75 bits.
    with pytest.raises(MixedPrecisionError, match=r"bits ≤ 1 is below the smallest feasible bits, 2\.75"):
        _compile(llama, calibration, budget={"bits": 1.0})


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"budget": {"bitz": 4}}, r"unknown budget key 'bitz' .*valid keys: 'bits'"),
    ({"budget": {"bits": -1}}, r"budget 'bits' must be a positive finite number, got -1"),
    ({"quality": {"psnr": 30}}, r"unknown quality key 'psnr'"),
    ({"quality": {"cosine": 1.5}}, r"quality cosine 1.5 is above what 16-bit .* achieves: 1.0"),
    ({"budget": {}}, r"budget must be a non-empty dict"),
])
def test_bad_budgets_and_floors_name_the_number(kwargs, message):
    with pytest.raises(MixedPrecisionError, match=message):
        MixedPrecision(**kwargs)


def test_proxy_batches_measure_on_the_first_batches_and_key_the_cache(llama, monkeypatch):
    torch.manual_seed(2)
    batches = [tiny_inputs(2, 16) for _ in range(3)]
    cache: dict = {}
    cm = _compile(llama, batches, budget={"bits": 5.0},
                  mixed_precision={"candidates": CANDIDATES, "cache": cache, "proxy_batches": 1})
    rec = _record(cm)
    assert rec["proxy_batches"] == 1
    # The measured output error is on the first batch alone (RTN: the compiled weights are the measured ones).
    assert rec["measured_cosine"] == pytest.approx(_cosine(cm, llama, batches[:1]), abs=1e-6)
    assert rec["measured_cosine"] != pytest.approx(_cosine(cm, llama, batches), abs=1e-6)
    measured = []
    real = mp_pass.measure_sensitivity
    monkeypatch.setattr(mp_pass, "measure_sensitivity", lambda *a, **k: measured.append(1) or real(*a, **k))
    again = _compile(llama, batches, budget={"bits": 5.0}, mixed_precision={"candidates": CANDIDATES, "cache": cache})
    assert measured and _record(again)["proxy_batches"] == 3  # all batches: another measurement, not the cached one


@pytest.mark.parametrize("value", [0, 1.5, True])
def test_bad_proxy_batches_name_the_value(value):
    with pytest.raises(MixedPrecisionError, match=f"proxy_batches must be an int >= 1.*got {value!r}"):
        MixedPrecision(budget={"bits": 4.0}, proxy_batches=value)


def test_floor_above_the_best_option_names_what_is_reachable(llama, calibration):
    with pytest.raises(MixedPrecisionError, match=r"quality cosine 0.99999 is above what the best option per layer "
                                                  r"reaches on the calibration set: 0\.9\d+"):
        _compile(llama, calibration, quality={"cosine": 0.99999}, mixed_precision={"candidates": ["int2-g32-asym"]})


def test_options_must_use_the_pipelines_method(llama, calibration):
    with pytest.raises(MixedPrecisionError, match=r"candidates \['int4-g32-asym \(gptq\)'\] name another method"):
        _compile(llama, calibration, budget={"bits": 5.0},
                 mixed_precision={"candidates": [{"weight": "int4-g32-asym", "method": "gptq"}, None]})


def test_gptq_recipe_measures_with_gptq():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)).eval()
    calib = [(torch.randn(32, 32),)]
    cm = qcompile.compile(mlp, calib[0], recipe="w4a16-gptq", calibration=calib, progress=False,
                          budget={"bits": 5.0}, mixed_precision={"candidates": ["int4-g32-asym", "int2-g32-asym"]})
    rec = _record(cm)
    assert rec["method"] == "gptq" and rec["totals"]["bits"] <= 5.0
    assert {r.method for r in cm.report().layers if r.path in rec["choice"]} == {"gptq"}


def test_a_clip_search_pipeline_measures_with_its_searched_grids():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)).eval()
    calib = [(torch.randn(32, 32),)]
    cm = qcompile.compile(mlp, calib[0], passes=["canonicalize", "assign_quant_specs", "clip_search", "lower"],
                          calibration=calib, progress=False, budget={"bits": 4.0},
                          mixed_precision={"candidates": ["int4-g32-asym", "int2-g32-asym"]})
    rec = _record(cm)
    assert rec["method"] == "rtn-clip" and rec["totals"]["bits"] <= 4.0


def test_with_awq_it_runs_after_the_scales_and_before_the_clipping():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)).eval()
    calib = [(torch.randn(32, 32),)]
    cm = qcompile.compile(mlp, calib[0], recipe="w4a16-awq", calibration=calib, progress=False,
                          budget={"bits": 5.0}, mixed_precision={"candidates": ["int4-g32-asym", None]})
    order = [p["name"] for p in cm.report().passes]
    assert order.index("awq") < order.index("mixed_precision") < order.index("awq_clip")
    assert _record(cm)["method"] == "awq"


def test_the_users_model_is_not_mutated(llama, calibration, budget_compiled):
    before = {k: v.clone() for k, v in tiny_model("llama", layers=1).state_dict().items()}
    assert all(torch.equal(before[k], v) for k, v in llama.state_dict().items())


def test_load_restores_the_choice_without_solving(budget_compiled, llama, tmp_path, monkeypatch):
    budget_compiled.save(tmp_path / "art")

    def refuse(*a, **k):
        raise AssertionError("load re-solved or re-measured the mixed-precision choice")

    import qcompile.passes.mixed_precision_math as math_mod
    import qcompile.passes.sensitivity as sens_mod

    for mod, name in ((math_mod, "solve"), (mp_pass, "solve"), (sens_mod, "measure_sensitivity"),
                      (mp_pass, "measure_sensitivity"), (MixedPrecision, "run")):
        monkeypatch.setattr(mod, name, refuse)
    loaded = qcompile.load(tmp_path / "art", llama, tiny_inputs())
    decided = {n.meta["qcompile.module_path"]: d for n, d in decided_nodes(loaded.graph_module)}
    for path, option in _record(budget_compiled)["choice"].items():
        assert decided[path].extras["mixed_precision"]["option"] == option
    x = tiny_inputs()
    assert torch.equal(loaded(*x).logits, budget_compiled(*x).logits)


def test_a_shared_cache_re_solves_without_re_measuring(llama, calibration, budget_compiled, monkeypatch):
    assert not _record(budget_compiled)["sensitivity_cached"] and len(CACHE) == 1

    def refuse(*a, **k):
        raise AssertionError("re-measured although the cache holds this model's sensitivities")

    monkeypatch.setattr(mp_pass, "measure_sensitivity", refuse)
    again = _compile(llama, calibration, budget={"bits": 8.5})
    assert _record(again)["sensitivity_cached"]
    assert _record(again)["totals"]["bits"] > _record(budget_compiled)["totals"]["bits"]
    with pytest.raises(AssertionError, match="re-measured"):  # other calibration data: another measurement
        _compile(llama, [tiny_inputs(2, 8)], budget={"bits": 5.0})


def test_budget_with_a_custom_pipeline_needs_a_quantizer(llama):
    with pytest.raises(ValueError, match="need a weight quantizer in the pipeline"):
        qcompile.compile(llama, tiny_inputs(), passes=["canonicalize", "assign_quant_specs"], budget={"bits": 4},
                         progress=False)


def test_floor_out_of_reach_within_a_budget_names_the_budget(llama, calibration):
    with pytest.raises(MixedPrecisionError, match=r"above what the best option per layer reaches within budget "
                                                  r"\{'bits': 3.0\} on the calibration set: 0\.\d+"):
        _compile(llama, calibration, quality={"cosine": 0.9999}, budget={"bits": 3.0})


def test_outlier_splits_are_options_the_solver_can_take():
    """An option carrying ``extras["outlier_split"]`` (LLM.int8 here) is costed by outlier splitting's own
    bytes and time, measured through its product, chosen where it pays, and applied: compile adds the
    ``split_outliers`` pass the pipeline lacked. On planted outliers at W8A8 the choice under 9 bits beats
    plain W8A8 (8.0 bits) and is no worse than its predicted alternative."""
    from tests.outlier_models import outlier_llama

    model = outlier_llama(layers=1)
    calibration = [tiny_inputs(2, 16) for _ in range(3)]
    split = {"weight": "int8", "extras": {"outlier_split": {"method": "llm_int8", "channels": 4}}}
    cm = qcompile.compile(model, tiny_inputs(), recipe="w8a8", calibration=calibration, progress=False,
                          budget={"bits": 9.0}, mixed_precision={"candidates": ["int8", split]})
    assert "split_outliers" in [p["name"] for p in cm.manifest["passes"]]
    chosen = {n.meta.get("qcompile.module_path", n.name): d for n, d in decided_nodes(cm.graph_module)
              if d.weight is not None}
    with_split = [p for p, d in chosen.items() if "outlier_split" in d.extras]
    assert with_split and "index" in chosen[with_split[0]].extras["outlier_split"]  # applied, not only chosen
    assert _record(cm)["totals"]["bits"] <= 9.0
    plain = qcompile.compile(model, tiny_inputs(), recipe="w8a8", calibration=calibration, progress=False)
    assert _cosine(cm, model, calibration) > _cosine(plain, model, calibration)
