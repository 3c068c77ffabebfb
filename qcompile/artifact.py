"""Compiled-model artifacts: ``manifest.json`` + ``weights.safetensors``.

The manifest records how the graph was built (model class or source, target,
recipe, pass list, per-layer formats, example input shapes); the safetensors
file holds every tensor of the lowered graph: packed codes, scales, zero points
and the float weights that stayed float. Loading re-traces the architecture
(from the model the user passes, or from the manifest's ``source`` when the CLI
built it), replays the exact passes, attaches the saved quantized weights and
loads the state strictly, so a mismatch between model and artifact fails loudly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import fx

from qcompile.codegen.quantized_linear import QUANTIZED_LINEAR, activation_spec, as_quantized_tensor
from qcompile.ir.graph import get_attr, linear_nodes, module_path
from qcompile.passes.base import Pass, PassContext, PassResult

if TYPE_CHECKING:
    from qcompile.api import CompiledModel

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
REPORT = "report.json"


def quantized_layers(gm: fx.GraphModule) -> dict[str, dict[str, Any]]:
    """Per lowered linear: its formats and logical shape, read off the graph."""
    layers = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == QUANTIZED_LINEAR:
            (_, qdata, scale, zero, gscale, bias, fmt, group, sym, k, act, act_group) = node.args
            layers[module_path(node)] = {
                "weight_format": fmt, "group_size": group, "symmetric": sym, "in_features": k,
                "act_format": act, "act_group_size": act_group,
                "tensors": {"data": qdata.target, "scale": scale.target,
                            "zero": zero.target if zero is not None else None,
                            "global_scale": gscale.target if gscale is not None else None},
            }
    return layers


def save(cm: CompiledModel, path: str | Path) -> Path:
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in cm.graph_module.state_dict().items()}
    save_file(state, str(out / WEIGHTS), metadata={"format": "qcompile", "version": str(FORMAT_VERSION)})
    manifest = {
        "format_version": FORMAT_VERSION,
        "qcompile_version": _version(),
        "torch_version": torch.__version__,
        **cm.manifest,
        "layers": quantized_layers(cm.graph_module),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    (out / REPORT).write_text(cm.report().to_json())
    return out


class AttachSavedWeights(Pass):
    """Stands in for the weight quantizers at load time: annotate each linear with
    the QuantizedTensor read from the artifact instead of computing one."""

    name = "attach_saved_weights"
    exact = False

    def __init__(self, layers: dict[str, dict[str, Any]], state: dict[str, torch.Tensor]):
        self.layers, self.state = layers, state

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        from qcompile.passes.weight_quantization import QUANT, LinearQuant

        seen = 0
        for node in linear_nodes(gm):
            info = self.layers.get(module_path(node))
            if info is None:
                continue
            t = {k: self.state[v] if v is not None else None for k, v in info["tensors"].items()}
            n_out = get_attr(gm, node.args[1].target).shape[0]
            if t["scale"].shape[0] != n_out:
                raise ValueError(f"artifact layer {module_path(node)} has {t['scale'].shape[0]} outputs, model has {n_out}")
            qt = as_quantized_tensor(t["data"], t["scale"], t["zero"], t["global_scale"], info["weight_format"],
                                     info["group_size"], info["symmetric"], info["in_features"])
            node.meta[QUANT] = LinearQuant(qt, activation_spec(info["act_format"], info["act_group_size"]), "saved")
            seen += 1
        missing = set(self.layers) - {module_path(n) for n in linear_nodes(gm)}
        if missing:
            raise ValueError(f"the model has no linear layers named {sorted(missing)[:5]} that the artifact quantized")
        return PassResult(bool(seen), {"attached": seen})


def load(path: str | Path, model: torch.nn.Module | None = None, example_inputs: Any = None,
         *, example_kwargs: dict | None = None) -> CompiledModel:
    """Load an artifact written by ``CompiledModel.save``.

    ``model``: an instance of the same architecture (its weights are not used and
    may be random). Omit it when the artifact was built by the CLI from a model
    directory or a builtin demo: the manifest's ``source`` then rebuilds it.
    ``example_inputs``: as for ``compile``; by default, tensors of the recorded shapes.
    """
    from qcompile.api import CompiledModel, _split_inputs
    from qcompile.frontend.torch_export import export_model
    from qcompile.passes.base import PassManager, make_pass
    from qcompile.recipes import get_recipe
    from qcompile.report import Report
    from qcompile.targets import get_target

    root = Path(path)
    if not (root / MANIFEST).exists():
        raise FileNotFoundError(f"{root} is not a qcompile artifact (no {MANIFEST})")
    manifest = json.loads((root / MANIFEST).read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"artifact format {manifest.get('format_version')} is not supported (expected {FORMAT_VERSION})")
    state = load_file(str(root / WEIGHTS))
    args = kwargs = None
    if model is None:
        source = manifest.get("source")
        if source is None:
            raise ValueError("this artifact was saved from Python: pass the model (same architecture) to qcompile.load")
        from qcompile.models import load_source

        model, args, kwargs = load_source(source)
    if example_inputs is not None or example_kwargs:
        args, kwargs = _split_inputs(example_inputs if example_inputs is not None else (), example_kwargs)
    elif args is None:
        args, kwargs = _inputs_from_manifest(manifest["example_inputs"])
    exported = export_model(model, args, kwargs, dynamic=manifest.get("dynamic", True))
    passes = [AttachSavedWeights(manifest["layers"], state) if name == "quantize_weights" else make_pass(name)
              for name in manifest["passes"]]
    gm = PassManager(passes, verify=False).run(exported.gm, PassContext(exported.args, exported.kwargs))
    gm.load_state_dict(state, strict=True)
    report = Report.from_dict(json.loads((root / REPORT).read_text())) if (root / REPORT).exists() else None
    return CompiledModel(gm, pinned_kwargs=exported.pinned_kwargs, target=get_target(manifest["target"]),
                         recipe=get_recipe(manifest["recipe"]), report=report, manifest=manifest)


def _inputs_from_manifest(spec: dict) -> tuple[tuple, dict]:
    def make(x: Any) -> Any:
        if isinstance(x, dict) and set(x) == {"shape", "dtype"}:
            dtype = getattr(torch, x["dtype"].removeprefix("torch."))
            return torch.ones(x["shape"], dtype=dtype) if not dtype.is_floating_point else torch.randn(x["shape"]).to(dtype)
        if isinstance(x, list):
            return [make(v) for v in x]
        if isinstance(x, dict):
            return {k: make(v) for k, v in x.items()}
        return x

    return tuple(make(spec["args"])), make(spec["kwargs"])


def _version() -> str:
    from qcompile import __version__

    return __version__
