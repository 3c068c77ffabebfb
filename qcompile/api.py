"""``qcompile.compile``: model in, quantized and lowered model out."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx

import qcompile.codegen.lowering  # noqa: F401  (registers "lower")
import qcompile.frontend.canonicalize  # noqa: F401  (registers "canonicalize")
import qcompile.passes.norm_folding  # noqa: F401  (registers "fold_norm_scales")
import qcompile.passes.weight_quantization  # noqa: F401  (registers "quantize_weights")
from qcompile.formats import QuantSpec
from qcompile.frontend.torch_export import export_model
from qcompile.ir.interpret import run_recording
from qcompile.passes.base import Pass, PassContext, PassManager, make_pass
from qcompile.progress import CompileProgress
from qcompile.recipes import Recipe, get_recipe
from qcompile.report import LayerReport, Report
from qcompile.targets import Target, get_target

VERIFY_AUTO_MAX_PARAMS = 200_000_000
"""``verify="auto"`` checks exact passes in float64 up to this many parameters
(each check holds two float64 copies of the model)."""


class CompiledModel:
    """A lowered model, callable like the original (same arguments, same output
    structure), with its report and an artifact writer."""

    def __init__(self, gm: fx.GraphModule, *, pinned_kwargs: dict, target: Target, recipe: Recipe,
                 report: Report, manifest: dict[str, Any]):
        self.graph_module = gm
        self.pinned_kwargs = pinned_kwargs
        self.target = target
        self.recipe = recipe
        self._report = report
        self.manifest = manifest

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self.graph_module(*args, **{**self.pinned_kwargs, **kwargs})

    forward = __call__

    def report(self) -> Report:
        return self._report

    def to(self, device: torch.device | str) -> CompiledModel:
        self.graph_module.to(device)
        return self

    def save(self, path: str) -> None:
        from qcompile.artifact import save

        save(self, path)

    def __repr__(self) -> str:
        return f"CompiledModel(model={self._report.model}, target={self.target.name}, recipe={self.recipe.name})"


def _split_inputs(example_inputs: Any, example_kwargs: Mapping | None) -> tuple[tuple, dict]:
    kwargs = dict(example_kwargs or {})
    if isinstance(example_inputs, Mapping):
        return (), {**dict(example_inputs), **kwargs}
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), kwargs
    if isinstance(example_inputs, Sequence):
        return tuple(example_inputs), kwargs
    raise TypeError(f"example_inputs must be a tensor, a tuple of arguments or a dict of keyword arguments, "
                    f"got {type(example_inputs).__name__}")


def _output_metrics(ref: list[Any], out: list[Any]) -> tuple[float | None, float | None]:
    """Cosine and relative error of the first floating output (logits, hidden states)."""
    pairs = [(a, b) for a, b in zip(ref, out) if isinstance(a, torch.Tensor) and a.is_floating_point()]
    if not pairs:
        return None, None
    a, b = (t.detach().double().flatten() for t in pairs[0])
    cos = torch.nn.functional.cosine_similarity(a, b, dim=0)
    return float(cos), float((a - b).norm() / a.norm().clamp_min(1e-30))


def compile(  # noqa: A001 - the public name is the point
    model: torch.nn.Module,
    example_inputs: Any,
    target: str | Target = "cpu",
    recipe: str | Recipe | None = None,
    *,
    example_kwargs: Mapping | None = None,
    overrides: Mapping[str, str | QuantSpec | None] | None = None,
    passes: Sequence[str | Pass] | None = None,
    verify: bool | str = "auto",
    dynamic: bool = True,
    progress: bool = True,
) -> CompiledModel:
    """Quantize and lower ``model`` for ``target``.

    Args:
        model: any ``nn.Module`` torch.export can trace (transformers models included).
        example_inputs: a tensor, a tuple of positional arguments, or a dict of keyword
            arguments (e.g. a tokenizer's output). Used to trace, to measure errors and to
            verify exact passes; batch ≥ 2 keeps the batch dimension dynamic.
        target: ``cpu``, ``ampere``, ``hopper`` or ``blackwell`` (see ``qcompile.TARGETS``).
        recipe: a name from ``qcompile.RECIPES``; default: the target's default recipe.
        overrides: ``{glob on module path: spec or None}``, e.g. ``{"*.down_proj": "int8", "*.0.*": None}``.
        passes: replace the recipe's pass list (names from the registry, or Pass instances).
        verify: check every exact pass in float64 on the example inputs (``"auto"``: on for
            models up to 200M parameters).
        dynamic: trace with dynamic batch/sequence dimensions where the model allows.
        progress: show progress on stderr.

    The user's model is not modified.
    """
    tgt = get_target(target)
    rcp = get_recipe(recipe if recipe is not None else tgt.default_recipe)
    if overrides:
        rcp = rcp.with_overrides(dict(overrides))
    args, kwargs = _split_inputs(example_inputs, example_kwargs)
    if verify == "auto":
        verify = sum(p.numel() for p in model.parameters()) <= VERIFY_AUTO_MAX_PARAMS
    pass_list = [p if isinstance(p, Pass) else make_pass(p) for p in (passes or rcp.passes)]

    with CompileProgress(progress) as prog, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)  # torch-internal noise
        prog.step(f"export {type(model).__name__} with torch.export")
        exported = export_model(model, args, kwargs, dynamic=dynamic)
        ref, _ = run_recording(exported.gm, exported.args, exported.kwargs, names=())  # float reference
        ctx = PassContext(exported.args, exported.kwargs, tgt, rcp, progress=prog)
        pm = PassManager(pass_list, verify=bool(verify))
        gm = pm.run(exported.gm, ctx)
        prog.step("measure the compiled model against float")
        out, _ = run_recording(gm, exported.args, exported.kwargs, names=())
    cosine, rel = _output_metrics(ref, out)

    notes = []
    if not exported.dynamic:
        notes.append("exported with static shapes: call the compiled model with the example input shapes only")
    if rcp.activation is not None and not tgt.is_native(rcp.weight.format, rcp.activation.format):
        notes.append(f"{rcp.activation.format} activations are not native on {tgt.name}: simulated (fake-quantized)")
    elif not tgt.is_native(rcp.weight.format, None):
        notes.append(f"{rcp.weight.format} weights are not native on {tgt.name}: dequantized to 16-bit for the matmul")
    report = Report(
        model=exported.model_class.rsplit(".", 1)[-1], target=tgt.name, recipe=rcp.name,
        layers=[LayerReport(path=path, **info) for path, info in ctx.layers.items()],
        output_cosine=cosine, output_rel_error=rel,
        passes=[{"name": r.name, "exact": r.exact, "changed": r.changed, "seconds": round(r.seconds, 4),
                 "nodes": [r.nodes_before, r.nodes_after], "verified_rel_error": r.verified_error,
                 "stats": r.stats} for r in pm.records],
        notes=notes,
    )
    manifest = {
        "model_class": exported.model_class,
        "target": tgt.name,
        "recipe": rcp.name,
        "overrides": {k: (v.to_dict() if isinstance(v, QuantSpec) else v) for k, v in (overrides or {}).items()},
        "passes": [p.name for p in pass_list],
        "pinned_kwargs": exported.pinned_kwargs,
        "dynamic": exported.dynamic,
        "example_inputs": pytree.tree_map(
            lambda t: {"shape": list(t.shape), "dtype": str(t.dtype)} if isinstance(t, torch.Tensor) else t,
            {"args": list(exported.args), "kwargs": {k: v for k, v in exported.kwargs.items() if k not in exported.pinned_kwargs}},
        ),
    }
    return CompiledModel(gm, pinned_kwargs=exported.pinned_kwargs, target=tgt, recipe=rcp, report=report, manifest=manifest)
