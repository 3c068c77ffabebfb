"""The compiled model users hold: callable like the original, with its report and artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx

from qcompile.formats import QuantSpec
from qcompile.recipes import Recipe
from qcompile.report import Report
from qcompile.targets import Target


class CompiledModel:
    """A lowered model, callable like the original (same arguments, same output
    structure), with its report and an artifact writer.

    ``manifest``: how it was built (model class, target, recipe, passes with their load rules,
    pinned keyword arguments, example input shapes); ``save`` adds the per-layer decisions and
    results and the tensors.
    """

    def __init__(self, gm: fx.GraphModule, *, pinned_kwargs: dict, target: Target, recipe: Recipe,
                 report: Report | None, manifest: dict[str, Any]):
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

    def report(self) -> Report | None:
        return self._report

    def to(self, device: torch.device | str) -> CompiledModel:
        self.graph_module.to(device)
        return self

    def save(self, path: str | Path, *, compressed_tensors: bool = False) -> Path:
        """Write the artifact to the directory ``path`` (new, empty, or an earlier artifact);
        ``compressed_tensors`` also writes the transformers-readable compressed-tensors layout
        (``docs/artifacts.md``)."""
        from qcompile.artifact import save

        return save(self, path, compressed_tensors=compressed_tensors)

    def __repr__(self) -> str:
        model = self._report.model if self._report is not None else self.manifest.get("model_class", "?")
        return f"CompiledModel(model={model}, target={self.target.name}, recipe={self.recipe.name})"


def build_manifest(exported: Any, target: Target, recipe: Recipe, overrides: dict, passes: list) -> dict[str, Any]:
    """What an artifact records of how the model was compiled (``artifact.save`` adds layers)."""

    def describe(t: Any) -> Any:
        return {"shape": list(t.shape), "dtype": str(t.dtype)} if isinstance(t, torch.Tensor) else t

    return {
        "model_class": exported.model_class,
        "target": target.name,
        "recipe": recipe.to_dict(),
        "overrides": {k: (v.encode() if isinstance(v, QuantSpec) else v) for k, v in overrides.items()},
        "passes": [{"name": p.name, "on_load": p.on_load.value, "ensures": list(p.ensures), "options": p.options()}
                   for p in passes],
        "pinned_kwargs": exported.pinned_kwargs,
        "dynamic": exported.dynamic,
        "example_inputs": pytree.tree_map(describe, {
            "args": list(exported.args),
            "kwargs": {k: v for k, v in exported.kwargs.items() if k not in exported.pinned_kwargs}}),
    }
