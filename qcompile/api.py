"""``qcompile.compile``: model in, quantized and lowered model out."""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

import qcompile.passes  # noqa: F401  (registers the built-in passes)
from qcompile.artifact import ONNX_GRAPH
from qcompile.compiled import CompiledModel, build_manifest
from qcompile.formats import QuantSpec
from qcompile.formats.kv import KVCacheSpec
from qcompile.frontend.inputs import split_inputs
from qcompile.frontend.onnx_import import OnnxModule, import_onnx
from qcompile.frontend.torch_export import export_model
from qcompile.ir.interpret import run_recording
from qcompile.models import transformers_description
from qcompile.passes.base import Pass, PassContext, PassManager, make_pass
from qcompile.passes.calibration import make_calibration
from qcompile.progress import CompileProgress
from qcompile.recipes import Recipe, get_recipe
from qcompile.report import LayerReport, Report, layer_reports
from qcompile.runtime.decoder import kv_cache_spec
from qcompile.targets import Target, get_target

if TYPE_CHECKING:
    import onnx

    from qcompile.onnx_export import ExportReport

VERIFY_AUTO_MAX_PARAMS = 200_000_000
"""``verify="auto"`` checks exact passes in float64 up to this many parameters
(each check holds two float64 copies of the model)."""


def _output_metrics(ref: list[Any], out: list[Any]) -> tuple[float | None, float | None]:
    """Cosine and relative error of the first floating output (logits, hidden states)."""
    pairs = [(a, b) for a, b in zip(ref, out) if isinstance(a, torch.Tensor) and a.is_floating_point()]
    if not pairs:
        return None, None
    a, b = (t.detach().double().flatten() for t in pairs[0])
    cos = torch.nn.functional.cosine_similarity(a, b, dim=0)
    return float(cos), float((a - b).norm() / a.norm().clamp_min(1e-30))


def _shape_notes(exported: Any, cm: CompiledModel) -> list[str]:
    """Which input dimensions the compiled graph fixes or bounds, and why (calls outside them
    raise a ValueError naming the argument and dimension)."""
    inputs = cm.input_dims()
    if inputs is None:
        return [] if exported.dynamic else ["exported with static shapes: call the compiled model with the example "
                                            "input shapes only"]
    why = ("dynamic=False" if exported.shape_fallback is None and not exported.dynamic
           else exported.shape_fallback or "the model's code fixes it")
    notes = [f"{d.describe()} ({why})" for d in inputs.static_dims()]
    notes += [f"{d.describe()} (a limit of the model's code)" for d in inputs.limited_dims()]
    return notes


def _notes(tgt: Target, layers: Sequence[LayerReport] = ()) -> list[str]:
    """Every layer that runs simulated, emulated or on the reference kernel on ``tgt`` (and what its
    kernel rounds or holds), grouped by note."""
    notes = []
    by_note: dict[str, list[str]] = {}
    for layer in layers:
        for note in layer.kernel_notes:
            by_note.setdefault(note, []).append(layer.path)
    for note, paths in by_note.items():
        shown = ", ".join(paths[:3]) + (f", ... ({len(paths)} layers)" if len(paths) > 3 else "")
        notes.append(f"on {tgt.name}, {note}: {shown}")
    return notes


def _is_onnx_source(model: Any) -> bool:
    """A path (to an ``.onnx`` file) or an ``onnx.ModelProto``, told apart without importing onnx."""
    return isinstance(model, (str, os.PathLike)) or (
        type(model).__name__ == "ModelProto" and type(model).__module__.startswith("onnx"))


def _onnx_model(model: Any, example_inputs: Any, example_kwargs: Mapping | None) -> tuple[Any, Any, list[str]]:
    """An ONNX source imported as a module (``frontend/onnx_import.py``), its example inputs (built
    from the graph inputs when none are given) and the import's notes for the report."""
    if _is_onnx_source(model):
        model = import_onnx(model)
    if not isinstance(model, OnnxModule):
        if example_inputs is None and not example_kwargs:
            raise TypeError(f"compile({type(model).__name__}, ...): example_inputs is required for a torch model "
                            "(only an ONNX model's inputs can be built from its graph)")
        return model, example_inputs, []
    notes = list(model.import_notes[1:])
    if example_inputs is None and not example_kwargs:
        example_inputs = model.example_inputs()
        notes.append(model.describe_example_inputs(example_inputs))
    return model, example_inputs, notes


def compile(  # noqa: A001 - the public name is the point
    model: torch.nn.Module | str | os.PathLike | onnx.ModelProto,
    example_inputs: Any = None,
    target: str | Target = "cpu",
    recipe: str | Recipe | None = None,
    *,
    example_kwargs: Mapping | None = None,
    overrides: Mapping[str, str | QuantSpec | None] | None = None,
    passes: Sequence[str | Pass] | None = None,
    calibration: Sequence[Any] | None = None,
    tokenizer: Any = None,
    verify: bool | str = "auto",
    dynamic: bool = True,
    progress: bool = True,
    budget: Mapping[str, float] | None = None,
    quality: Mapping[str, float] | None = None,
    mixed_precision: Mapping[str, Any] | None = None,
    kv_cache: str | KVCacheSpec | None = None,
) -> CompiledModel:
    """Quantize and lower ``model`` for ``target``.

    Args:
        model: any ``nn.Module`` torch.export can trace (transformers models included), or an
            ONNX model: a path to an ``.onnx`` file or an ``onnx.ModelProto``, imported by
            ``frontend/onnx_import.py`` (its graph inputs become ``forward``'s parameters, in order).
        example_inputs: a tensor, a tuple of positional arguments, or a dict of keyword
            arguments (e.g. a tokenizer's output). Used to trace, to measure errors and to
            verify exact passes. Batch and sequence dimensions stay dynamic whatever their sizes
            here (where the model allows; the report's notes name any static dimension). May be
            omitted for an ONNX model: inputs are built from the graph inputs' names and types
            (``OnnxModule.example_inputs``: batch 2, sequence 16; a report note says so).
        target: ``cpu``, ``ampere``, ``hopper``, ``blackwell``, or ``ort-cpu`` / ``ort-cuda`` for
            ``export_onnx`` (see ``qcompile.TARGETS``).
        recipe: a name from ``qcompile.RECIPES``; default: the target's default recipe.
        overrides: ``{glob on module path: spec or None}``, e.g. ``{"*.down_proj": "int8", "*.0.*": None}``.
        passes: replace the recipe's pass list (names from the registry, or Pass instances);
            the manager orders them by their declared constraints.
        calibration: batches for calibration statistics, each like ``example_inputs``, or a
            list of texts (with ``tokenizer``); default: the example inputs.
        tokenizer: tokenizes ``calibration`` texts (a transformers tokenizer).
        verify: check every exact pass in float64 on the example inputs (``"auto"``: on for
            models up to 200M parameters).
        dynamic: trace with dynamic batch/sequence dimensions where the model allows (``False``:
            every input dimension static at the example's size).
        progress: show progress on stderr.
        budget: mixed precision under a budget, e.g. ``{"bits": 4.25}``, ``{"bytes": 2e6}``,
            ``{"latency_ms": 0.5}`` (several keys: several constraints): each quantized layer takes
            the candidate option that minimises the predicted output error overall (exact ILP).
        quality: mixed precision to a quality floor, ``{"cosine": 0.995}``: the smallest model whose
            output cosine to float on the calibration set meets it (solved, verified, re-solved).
        mixed_precision: further options of the ``mixed_precision`` pass: ``candidates``,
            ``proxy`` (``model``, ``layer``, ``hessian``), ``tie``, ``prefill_tokens``, ``cache`` (a
            dict shared between compiles: sensitivities measured once per model and calibration set).
            With ``budget``/``quality`` the recipe still provides the passes and the quantizer
            (RTN, GPTQ, AWQ's scales) and the excluded layers; docs/mixed-precision.md.
        kv_cache: the KV-cache format of ``CompiledModel.generate`` (causal LMs): ``None``
            (uncompressed, the model's dtype), ``"int8"``, ``"fp8"``, ``"int4"``, ``"int2"``,
            ``"bf16"``, or a ``qcompile.runtime.KVCacheSpec``; docs/generate.md.

    The user's model is not modified.
    """
    tgt = get_target(target)
    kv_spec = kv_cache_spec(kv_cache)
    rcp = get_recipe(recipe if recipe is not None else tgt.default_recipe)
    if overrides:
        rcp = rcp.with_overrides(dict(overrides))
    model, example_inputs, import_notes = _onnx_model(model, example_inputs, example_kwargs)
    args, kwargs = split_inputs(example_inputs, example_kwargs)
    if verify == "auto":
        verify = sum(p.numel() for p in model.parameters()) <= VERIFY_AUTO_MAX_PARAMS
    if passes is None:
        pass_list = rcp.make_passes()
    else:
        pass_list = [p if isinstance(p, Pass) else make_pass(p, **rcp.pass_options.get(p, {})) for p in passes]
    if budget is not None or quality is not None:
        pass_list = _with_mixed_precision(pass_list, budget, quality, mixed_precision)
    elif mixed_precision is not None:
        raise ValueError("mixed_precision= options need a budget= or a quality=")

    hungry = [p.name for p in pass_list if p.uses_calibration]
    if calibration is None and hungry:
        warnings.warn(f"recipe {rcp.name!r} runs {', '.join(hungry)}, which calibrate on data, and no calibration= "
                      "was given: the example inputs are used; pass calibration= (batches, or texts with "
                      "tokenizer=) distinct from the data you evaluate on", stacklevel=2)
    with CompileProgress(progress) as prog, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)  # torch-internal noise
        prog.step(f"export {type(model).__name__} with torch.export")
        exported = export_model(model, args, kwargs, dynamic=dynamic)
        calib = make_calibration(calibration, exported.args, exported.kwargs, exported.pinned_kwargs, tokenizer)
        ref, _ = run_recording(exported.gm, exported.args, exported.kwargs, names=())  # float reference
        ctx = PassContext(exported.args, exported.kwargs, tgt, rcp, progress=prog, calibration=calib)
        pm = PassManager(pass_list, verify=bool(verify))
        gm = pm.run(exported.gm, ctx)
        prog.step("measure the compiled model against float")
        out, _ = run_recording(gm, exported.args, exported.kwargs, names=())
    cosine, rel = _output_metrics(ref, out)
    layers = layer_reports(gm, tgt)
    report = Report(
        model=exported.model_class.rsplit(".", 1)[-1], target=tgt.name, recipe=rcp.name,
        layers=layers, output_cosine=cosine, output_rel_error=rel,
        passes=[{"name": r.name, "exact": r.exact, "changed": r.changed, "seconds": round(r.seconds, 4),
                 "nodes": [r.nodes_before, r.nodes_after], "verified_rel_error": r.verified_error,
                 "stats": r.stats} for r in pm.records],
        notes=_notes(tgt, layers) + [note for r in pm.records for note in (r.stats or {}).get("notes", [])]
        + [f"calibration: {calib.source}"] * (calibration is not None) + import_notes,
    )
    manifest = build_manifest(exported, tgt, rcp, dict(overrides or {}), pm.passes)
    if (hf := transformers_description(model)) is not None:
        manifest["transformers"] = hf  # what a standalone load rebuilds the architecture from
    if isinstance(model, OnnxModule):
        manifest["onnx"] = {"graph": ONNX_GRAPH}  # the artifact stores the weight-less graph to rebuild from
    if kv_spec is not None:
        manifest["kv_cache"] = dataclasses.asdict(kv_spec)
    cm = CompiledModel(gm, pinned_kwargs=exported.pinned_kwargs, target=tgt, recipe=rcp, report=report,
                       manifest=manifest, model=model, kv_cache=kv_spec)
    report.notes[:0] = _shape_notes(exported, cm)
    return cm


def _with_mixed_precision(pass_list: list[Pass], budget: Mapping[str, float] | None,
                         quality: Mapping[str, float] | None, options: Mapping[str, Any] | None) -> list[Pass]:
    """``pass_list`` with a ``mixed_precision`` pass inserted before the first pass it must precede
    (clipping, the quantizer), told which quantizer the pipeline runs. Raises naming a bad budget,
    floor or option before anything is traced."""
    from qcompile.passes.mixed_precision import MixedPrecision
    from qcompile.passes.weight_quantization import WeightQuantizer

    if any(p.name == "mixed_precision" for p in pass_list):
        raise ValueError("budget=/quality= add the mixed_precision pass, but the pass list already has one")
    quantizer = next((p for p in pass_list if isinstance(p, WeightQuantizer)), None)
    if quantizer is None:
        raise ValueError(f"budget=/quality= need a weight quantizer in the pipeline (quantize_weights, gptq, "
                         f"clip_search); the passes are {[p.name for p in pass_list]}")
    mp = MixedPrecision(budget=budget, quality=quality, quantizer=quantizer.name, **dict(options or {}))
    mp.quantizer_pass = quantizer
    names = [p.name for p in pass_list]
    mp.check_candidates(None, "awq" if "awq" in names and quantizer.method == "rtn" else quantizer.method, quantizer.name)
    at = next((i for i, p in enumerate(pass_list) if p.name in MixedPrecision.runs_before), len(pass_list))
    out = [*pass_list[:at], mp, *pass_list[at:]]
    return _with_split_passes(out, mp)


def _with_split_passes(pass_list: list[Pass], mp: Any) -> list[Pass]:
    """``pass_list`` plus the outlier-splitting passes that candidates with ``extras["outlier_split"]``
    need and it lacks: ``split_outliers`` right after ``mixed_precision``, ``residual_channels`` right
    before ``lower``, where their declared constraints put them."""
    from qcompile.passes.outlier_splitting import OutlierSplit, ResidualChannels

    splits = [c.get("extras", {}).get("outlier_split") for c in (mp.candidates or ()) if isinstance(c, Mapping)]
    methods = {s.get("method") for s in splits if isinstance(s, Mapping)}
    names = [p.name for p in pass_list]
    out = list(pass_list)
    if methods and OutlierSplit.name not in names:
        out.insert(out.index(mp) + 1, OutlierSplit())
    if "residual_channels" in methods and ResidualChannels.name not in names:
        last = next((i for i, p in enumerate(out) if p.name == "lower"), len(out))
        out.insert(last, ResidualChannels())
    return out


def export_onnx(
    model_or_compiled: torch.nn.Module | CompiledModel,
    example_inputs: Any,
    path: str,
    target: str | Target = "ort-cpu",
    recipe: str | Recipe | None = None,
    **kwargs: Any,
) -> ExportReport:
    """Write a compiled model (or an ``nn.Module``, compiled here for ``target`` with ``recipe``) as one
    ONNX file that stock ONNX Runtime runs: quantized linears as ``com.microsoft.MatMulNBits``,
    ``MatMulInteger`` (W8A8) or ``DequantizeLinear`` (fp8), repacked from the compiled tensors, never
    re-quantized. Returns an ``ExportReport`` (file and packed bytes, the ONNX op per layer, ONNX
    Runtime's agreement with qcompile's reference). Needs the ``onnx`` extra; see
    ``qcompile.onnx_export.export_onnx`` for the options and docs/onnx-export.md for the lowering."""
    from qcompile.onnx_export import export_onnx as _export_onnx

    return _export_onnx(model_or_compiled, example_inputs, path, target, recipe, **kwargs)
