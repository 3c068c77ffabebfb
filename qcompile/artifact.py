"""Compiled-model artifacts: ``manifest.json`` + ``weights.safetensors`` (+ ``report.json``,
+ ``config.json`` for transformers models, + ``model.safetensors`` in the compressed-tensors layout
on request). ``docs/artifacts.md`` describes the layout.

The manifest records how the graph was built (model class, transformers class, target, recipe,
every pass with its load rule) and, per linear, its decision and its result (method, tensor names,
dtypes, shapes); the safetensors file holds every tensor of the lowered graph, the float remainder
(embeddings, norms, LM head) and the non-persistent buffers included. Loading re-traces the
architecture (from the model the user passes, or built from ``config.json`` with no checkpoint
read), then applies each pass's declared rule: structural passes re-run, data-dependent ones
restore their saved choices (decisions and quantized weights are never recomputed from the rebuilt
model's weights), and the state is loaded strictly.

An artifact is untrusted input: the manifest is checked against its schema (unknown keys, types,
dtypes outside an allow-list, tensors missing or shaped unlike the manifest says) and every failure
is an :class:`ArtifactError` naming the field. JSON and safetensors cannot carry code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import fx

from qcompile.codegen.op_schema import TENSOR_FIELDS, QuantizedLinearCall, is_quantized_linear
from qcompile.formats import QuantizedTensor, QuantSpec, quantize
from qcompile.ir.annotations import LayerDecision, LayerResult, decided_nodes, result_of
from qcompile.ir.graph import module_path
from qcompile.report import Report

if TYPE_CHECKING:
    from qcompile.compiled import CompiledModel

FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)
"""Version 3 added ``transformers`` (standalone loading) and ``buffers``; version 2 artifacts still load."""
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
REPORT = "report.json"
CONFIG = "config.json"
COMPRESSED_TENSORS = "model.safetensors"
ONNX_GRAPH = "onnx_graph.onnx"
"""An ONNX-imported model's graph without its weights (they are in ``weights.safetensors``)."""
ARTIFACT_FILES = (MANIFEST, WEIGHTS, REPORT, CONFIG, COMPRESSED_TENSORS, ONNX_GRAPH)

DTYPES = {name: getattr(torch, name) for name in (
    "float32", "float16", "bfloat16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool",
    "float8_e4m3fn", "float8_e5m2")}
"""Tensor dtypes an artifact may hold (and example inputs may name)."""
TENSOR_ALIGNMENT = 64
"""Bytes loaded tensors are aligned to: safetensors can hand out tensors 8 bytes off a boundary,
which some packed CPU kernels do not survive (``codegen/cpu/kernels.py``); those are copied."""


class ArtifactError(ValueError):
    """An artifact is malformed, corrupted, or does not fit the model; the message names the field."""


class ArtifactPathError(ValueError):
    """An artifact cannot be written where asked (a file, a foreign non-empty directory, no permission)."""


# ----------------------------------------------------------------------------- manifest schema
class _Marker:
    def __init__(self, name: str):
        self.name = name


DTYPE, SPEC = _Marker("dtype"), _Marker("spec")
"""Schema leaves: a name in :data:`DTYPES`; ``QuantSpec.encode()`` text or null."""


class OneOf:
    """Schema leaf: one of these literal values."""

    def __init__(self, *values: Any):
        self.values = values


_TENSOR = {"name": str, "dtype": DTYPE, "shape": [int]}
_LAYER = {
    "decision": {"weight": SPEC, "activation": SPEC, "extras": dict, "source": str, "reason": str},
    "result": ({"method": str, "epilogue": str, "float_dtype": str, "activation": SPEC, "metrics": dict,
                "tensors": {"qdata": _TENSOR, "scale": _TENSOR, "zero": (_TENSOR, None),
                            "global_scale": (_TENSOR, None)}}, None),
}
SCHEMA = {
    "format_version": int, "qcompile_version": str, "torch_version": str, "model_class": str, "target": str,
    "recipe": {"name": str, "description": str, "weight": SPEC, "activation": SPEC, "passes": [str],
               "exclude": [str], "overrides": [list], "pass_options": {str: dict}, "activation_overrides": [list]},
    "overrides": dict,
    "passes": [{"name": str, "on_load": OneOf("rerun", "restore", "skip"), "ensures": [str], "options": dict}],
    "pinned_kwargs": dict, "dynamic": bool, "example_inputs": {"args": list, "kwargs": dict},
    "layers": {str: _LAYER}, "source": (str, None),
    "transformers": {"class": str, "init_kwargs": {str: (bool, int, float, str)}},
    "buffers": [str],
    "onnx": {"graph": OneOf(ONNX_GRAPH)},
    "kv_cache": dict,
}
"""The manifest's shape: objects (exact key sets), ``{str: v}`` maps, ``[v]`` lists, tuples of
alternatives (``None`` = null), types and the leaves above."""
OPTIONAL = {"source", "transformers", "buffers", "onnx", "recipe.activation_overrides", "kv_cache"}
"""Fields (paths below the manifest) an artifact may omit: written only by some models, or added
after format 3 was fixed (older artifacts lack them and still load)."""


def _check(value: Any, schema: Any, where: str) -> None:
    """Raise ArtifactError at the first place ``value`` does not fit ``schema``."""
    def fail(expected: str) -> None:
        raise ArtifactError(f"manifest field {where}: expected {expected}, got {json.dumps(value)[:80]}")

    if isinstance(schema, tuple):
        if value is None and None in schema:
            return
        errors = []
        for alt in (a for a in schema if a is not None):
            try:
                return _check(value, alt, where)
            except ArtifactError as e:
                errors.append(str(e))
        raise ArtifactError(" / ".join(errors) if errors else f"manifest field {where}: expected null")
    if isinstance(schema, OneOf):
        if value not in schema.values:
            fail(f"one of {', '.join(map(repr, schema.values))}")
    elif schema is DTYPE:
        if value not in DTYPES:
            fail(f"a dtype in {', '.join(DTYPES)}")
    elif schema is SPEC:
        if value is None:
            return
        if not isinstance(value, str):
            fail("a spec string or null")
        try:
            QuantSpec.parse(value)
        except ValueError as e:
            raise ArtifactError(f"manifest field {where}: {e}") from None
    elif isinstance(schema, list):
        if not isinstance(value, list):
            fail("a list")
        for i, item in enumerate(value):
            _check(item, schema[0], f"{where}[{i}]")
    elif isinstance(schema, dict) and set(schema) == {str}:
        if not isinstance(value, dict):
            fail("an object")
        for k, v in value.items():
            _check(v, schema[str], f"{where}.{k}")
    elif isinstance(schema, dict):
        if not isinstance(value, dict):
            fail("an object")
        unknown = sorted(set(value) - set(schema))
        if unknown:
            raise ArtifactError(f"manifest field {where}: unknown key(s) {', '.join(map(repr, unknown))}")
        for k, sub in schema.items():
            if k not in value:
                if f"{where}.{k}".removeprefix("manifest.") in OPTIONAL:
                    continue
                raise ArtifactError(f"manifest field {where}.{k} is missing")
            _check(value[k], sub, f"{where}.{k}")
    elif schema is int:
        if not isinstance(value, int) or isinstance(value, bool):
            fail("an integer")
    elif not isinstance(value, schema):
        fail(f"a {schema.__name__}")


def validate_manifest(manifest: Any) -> dict[str, Any]:
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{MANIFEST} must hold a JSON object, got {type(manifest).__name__}")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise ArtifactError(f"manifest field manifest.format_version: artifact format {manifest.get('format_version')!r} "
                            f"is not supported (this qcompile reads {', '.join(map(str, READABLE_VERSIONS))})")
    _check(manifest, SCHEMA, "manifest")
    return manifest


# ----------------------------------------------------------------------------- save
def layer_records(gm: fx.GraphModule) -> dict[str, dict[str, Any]]:
    """Per decided linear: its decision and (quantized ones) its result, with tensor names,
    dtypes and shapes read off the lowered graph."""
    state = gm.state_dict()
    layers = {}
    for node, decision in decided_nodes(gm):
        record: dict[str, Any] = {"decision": decision.to_dict(), "result": None}
        result = result_of(node)
        if is_quantized_linear(node) and result is not None:
            targets = QuantizedLinearCall.from_node(node).tensor_targets()
            record["result"] = {
                "method": result.method, "epilogue": result.epilogue, "float_dtype": result.float_dtype,
                "activation": result.activation.encode() if result.activation is not None else None,
                "metrics": result.metrics,
                "tensors": {k: None if t is None else {"name": t, "dtype": str(state[t].dtype).removeprefix("torch."),
                                                        "shape": list(state[t].shape)} for k, t in targets.items()},
            }
        path = module_path(node)
        if path in layers:
            raise ArtifactError(f"layer {path!r} is called more than once in the model's forward; each call was "
                                f"quantized on its own and artifacts key layers by module path, so this model cannot "
                                f"be saved yet (its compiled model runs)")
        layers[path] = record
    return layers


def check_output_dir(path: str | Path) -> Path:
    """``path`` as a place to write an artifact, or an :class:`ArtifactPathError`: it must be a
    new or empty directory, or an existing artifact (overwritten), under a writable parent.
    Called before any work so a bad path fails in a second, not after a compile."""
    out = Path(path)
    if out.exists():
        if not out.is_dir():
            raise ArtifactPathError(f"cannot write the artifact to {out}: it is a file, not a directory")
        entries = sorted(p.name for p in out.iterdir())
        if entries and MANIFEST not in entries:
            shown = ", ".join(entries[:5]) + (", …" if len(entries) > 5 else "")
            raise ArtifactPathError(f"cannot write the artifact to {out}: a non-empty directory that is not a qcompile "
                                    f"artifact (it holds {shown}); choose a new or empty directory")
        if not os.access(out, os.W_OK | os.X_OK):
            raise ArtifactPathError(f"cannot write the artifact to {out}: the directory is not writable")
        return out
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ArtifactPathError(f"cannot write the artifact to {out}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ArtifactPathError(f"cannot write the artifact to {out}: {parent} is not writable")
    return out


def save(cm: CompiledModel, path: str | Path, *, compressed_tensors: bool = False) -> Path:
    """Write ``cm`` to the directory ``path`` (see :func:`check_output_dir`); everything is
    checked before the first byte is written. ``compressed_tensors``: also write
    ``model.safetensors`` and a ``quantization_config`` in ``config.json`` in the compressed-tensors
    layout (transformers models whose every layer maps; otherwise an :class:`ArtifactError` says
    which layer does not)."""
    out = check_output_dir(path)
    gm = cm.graph_module
    state = {k: v.detach().contiguous().cpu() for k, v in gm.state_dict().items()}
    buffers = {k: v.detach().contiguous().cpu() for k, v in gm.named_buffers() if k not in state}
    hf = cm.manifest.get("transformers")
    manifest = {
        "format_version": FORMAT_VERSION,
        "qcompile_version": _version(),
        "torch_version": torch.__version__,
        **{k: v for k, v in cm.manifest.items() if k != "transformers"},
        "layers": layer_records(gm),
        "buffers": sorted(buffers),
    }
    if hf is not None:
        manifest["transformers"] = {"class": hf["class"], "init_kwargs": hf["init_kwargs"]}
    validate_manifest(json.loads(json.dumps(manifest)))  # what load will demand, checked at save
    config = dict(hf["config"]) if hf is not None else None
    onnx_graph = _onnx_graph(cm) if "onnx" in manifest else None
    layout = None
    if compressed_tensors:
        from qcompile.compressed_tensors_layout import to_compressed_tensors

        if config is None:
            raise ArtifactError(f"the compressed-tensors layout needs a transformers model (a config.json); "
                                f"{cm.manifest.get('model_class', 'this model')} is not one")
        layout = to_compressed_tensors(gm, hf)
        config["quantization_config"] = layout.quantization_config
    out.mkdir(parents=True, exist_ok=True)
    save_file({**state, **buffers}, str(out / WEIGHTS), metadata={"format": "qcompile", "version": str(FORMAT_VERSION)})
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    written = {MANIFEST, WEIGHTS}
    if config is not None:
        (out / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
        written.add(CONFIG)
    if layout is not None:
        save_file(layout.tensors, str(out / COMPRESSED_TENSORS), metadata={"format": "pt"})
        written.add(COMPRESSED_TENSORS)
    if onnx_graph is not None:
        (out / ONNX_GRAPH).write_bytes(onnx_graph)
        written.add(ONNX_GRAPH)
    if cm.report() is not None:
        (out / REPORT).write_text(cm.report().to_json())
        written.add(REPORT)
    for stale in set(ARTIFACT_FILES) - written:  # left by an earlier artifact in the same directory
        (out / stale).unlink(missing_ok=True)
    return out


def _onnx_graph(cm: CompiledModel) -> bytes:
    """The weight-less ONNX graph an ONNX-imported model's architecture is rebuilt from."""
    graph = getattr(cm.architecture, "weightless_graph", None)
    if graph is None:
        raise ArtifactError(f"the manifest says {cm.manifest.get('model_class')} was imported from ONNX, but the "
                            "compiled model holds no ONNX architecture to save")
    return graph()


# ----------------------------------------------------------------------------- load
class LoadedArtifact:
    """A validated artifact, as passes that restore (``on_load = restore``) read it."""

    def __init__(self, root: Path | None, manifest: dict[str, Any], state: dict[str, torch.Tensor]):
        self.root, self.manifest, self.state = root, manifest, state

    def decisions(self) -> dict[str, LayerDecision]:
        out = {}
        for path, layer in self.manifest["layers"].items():
            try:
                out[path] = LayerDecision.from_dict(layer["decision"])
            except (ValueError, TypeError) as e:
                raise ArtifactError(f"manifest field manifest.layers.{path}.decision: {e}") from None
        return out

    def result(self, path: str, decision: LayerDecision, weight_shape: tuple[int, int]) -> LayerResult | None:
        """The saved result of the linear at ``path`` (``None`` if the artifact kept it float),
        its tensors checked against the shapes the decision implies for ``weight_shape``."""
        layer = self.manifest["layers"].get(path)
        if layer is None or layer["result"] is None:
            return None
        saved = layer["result"]
        where = f"manifest.layers.{path}.result"
        expected = _expected_shapes(decision.weight, weight_shape)
        tensors = {}
        for role in TENSOR_FIELDS:
            info = saved["tensors"][role]
            key = "data" if role == "qdata" else role
            if info is None:
                if key in expected:
                    raise ArtifactError(f"manifest field {where}.tensors.{role} is null, but {decision.weight.short()} "
                                        f"weights need it")
                tensors[key] = None
                continue
            if key not in expected:
                raise ArtifactError(f"manifest field {where}.tensors.{role}: {decision.weight.short()} weights have no {role}")
            t = self.state.get(info["name"])
            if t is None:
                raise ArtifactError(f"{WEIGHTS} has no tensor {info['name']!r} ({where}.tensors.{role})")
            dtype, shape = expected[key]
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise ArtifactError(f"tensor {info['name']!r} ({where}.tensors.{role}) is {str(t.dtype)[6:]} "
                                    f"{list(t.shape)}; a {decision.weight.short()} weight of shape {list(weight_shape)} "
                                    f"needs {str(dtype)[6:]} {list(shape)}")
            tensors[key] = t
        qt = QuantizedTensor(decision.weight, weight_shape, tensors["data"], tensors["scale"], tensors["zero"],
                             tensors["global_scale"])
        activation = QuantSpec.parse(saved["activation"]) if saved["activation"] is not None else None
        return LayerResult(qt, activation, saved["method"], saved["epilogue"], saved["float_dtype"], dict(saved["metrics"]))


def _expected_shapes(spec: QuantSpec, shape: tuple[int, int]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Dtype and shape of each stored tensor of a ``spec`` weight of ``shape`` (one row quantized)."""
    row = quantize(torch.zeros(1, shape[1]), spec)
    return {k: (t.dtype, (shape[0], *t.shape[1:]) if k != "global_scale" else tuple(t.shape))
            for k, t in row.tensors().items()}


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``weights.safetensors``, with a named error for a corrupt file or a dtype
    outside :data:`DTYPES`."""
    if not path.exists():
        raise ArtifactError(f"{path} is missing")
    allowed = {str(d).removeprefix("torch.") for d in DTYPES.values()}
    try:
        with safe_open(str(path), framework="pt") as f:
            state = {}
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                t = f.get_tensor(key)
                if str(t.dtype).removeprefix("torch.") not in allowed:
                    raise ArtifactError(f"{path.name}: tensor {key!r} has dtype {t.dtype}, not one of {', '.join(sorted(allowed))}")
                state[key] = t.clone() if t.data_ptr() % TENSOR_ALIGNMENT else t
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ArtifactError(f"{path} is not a readable safetensors file (truncated or corrupted?): {e}") from None
    return state


def read_manifest(root: Path) -> dict[str, Any]:
    """The validated manifest of the artifact directory ``root``."""
    if not root.exists():
        raise FileNotFoundError(f"artifact {root}: no such directory")
    if not root.is_dir():
        raise ArtifactError(f"artifact {root} is a file; an artifact is a directory holding {MANIFEST}")
    if not (root / MANIFEST).exists():
        raise ArtifactError(f"{root} is not a qcompile artifact (no {MANIFEST})")
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{root / MANIFEST} is not valid JSON: {e}") from None
    return validate_manifest(manifest)


def read_report(root: Path) -> Report | None:
    """``report.json`` of the artifact ``root``, ``None`` when it has none."""
    if not (root / REPORT).exists():
        return None
    try:
        return Report.from_dict(json.loads((root / REPORT).read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError, ValueError) as e:
        raise ArtifactError(f"{root / REPORT} is malformed: {e}") from None


def _read_config(root: Path) -> dict[str, Any]:
    if not (root / CONFIG).exists():
        raise ArtifactError(f"{root / CONFIG} is missing: the manifest names a transformers model, whose "
                            "architecture is rebuilt from its config")
    try:
        config = json.loads((root / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{root / CONFIG} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ArtifactError(f"{root / CONFIG} must hold a JSON object, got {type(config).__name__}")
    return config


def load(path: str | Path, model: torch.nn.Module | None = None, example_inputs: Any = None,
         *, example_kwargs: dict | None = None) -> CompiledModel:
    """Load an artifact written by ``CompiledModel.save``.

    ``model``: an instance of the same architecture (its weights are not used and may be random).
    Omit it for a transformers model: the architecture is built from the artifact's
    ``config.json`` (no checkpoint is read, the source directory need not exist). A plain
    ``nn.Module`` saved from Python needs ``model``. ``example_inputs``: as for ``compile``; by
    default, tensors of the recorded shapes. Raises :class:`ArtifactError` for a malformed artifact.
    """
    from qcompile.frontend.inputs import split_inputs
    from qcompile.models import ModelSourceError, build_from_config

    root = Path(path)
    manifest = read_manifest(root)
    state = read_weights(root / WEIGHTS)
    absent = [name for name in manifest.get("buffers", []) if name not in state]
    if absent:
        raise ArtifactError(f"{WEIGHTS} has no tensor {absent[0]!r} (manifest.buffers)")
    hf = manifest.get("transformers")
    if hf is not None:
        config = _read_config(root)
        if model is None:
            try:
                model = build_from_config(hf["class"], config, hf["init_kwargs"], str(root / CONFIG))
            except ModelSourceError as e:
                raise ArtifactError(str(e)) from None
        manifest["transformers"] = {**hf, "config": {k: v for k, v in config.items() if k != "quantization_config"}}

    if model is None and "onnx" in manifest:
        model = _onnx_architecture(root / ONNX_GRAPH)
    args = kwargs = None
    if model is None:
        source = manifest.get("source")
        if source is None:
            raise ValueError(f"artifact {root} holds a plain nn.Module ({manifest['model_class']}), saved from Python: "
                             "pass an instance of it (any weights) as qcompile.load(path, model)")
        from qcompile.models import load_source

        try:  # format 2 artifacts written by the CLI: rebuilt from their source
            model, args, kwargs = load_source(source)
        except ModelSourceError as e:
            raise ArtifactError(f"artifact {root} (format {manifest['format_version']}) rebuilds its model from "
                                f"its source, which is unusable: {e}; pass model=") from None
    if example_inputs is not None or example_kwargs:
        args, kwargs = split_inputs(example_inputs if example_inputs is not None else (), example_kwargs)
    elif args is None:
        args, kwargs = inputs_from_manifest(manifest["example_inputs"])
    return rebuild(manifest, state, model, args, kwargs, report=read_report(root), root=root)


def _onnx_architecture(path: Path) -> torch.nn.Module:
    """The architecture of an ONNX-imported model from the artifact's weight-less graph (weights on meta)."""
    from qcompile.frontend.onnx_import import OnnxImportError, import_onnx

    if not path.is_file():
        raise ArtifactError(f"{path} is missing: the manifest names an ONNX-imported model, whose architecture is "
                            "rebuilt from it")
    try:
        return import_onnx(path)
    except OnnxImportError as e:
        raise ArtifactError(str(e)) from None


def rebuild(manifest: dict[str, Any], state: dict[str, torch.Tensor], model: torch.nn.Module, args: tuple,
            kwargs: dict, *, report: Report | None = None, root: Path | None = None) -> CompiledModel:
    """Re-trace ``model`` on ``(args, kwargs)`` and apply each recorded pass's load rule, then load
    ``state`` strictly: the compiled model a validated ``manifest`` and its tensors describe.

    ``load`` calls it with what it read from disk; it also serves an in-memory re-trace (the same
    compiled layers, traced for other inputs). ``model``'s own weights are never used.
    """
    from qcompile.compiled import CompiledModel
    from qcompile.frontend.torch_export import export_model
    from qcompile.passes import PassContext, PassManager
    from qcompile.recipes import Recipe
    from qcompile.targets import get_target

    try:
        target = get_target(manifest["target"])
        recipe = Recipe.from_dict(manifest["recipe"])
    except ValueError as e:
        raise ArtifactError(f"manifest field manifest.target/recipe: {e}") from None
    kv_cache = _kv_cache_spec(manifest.get("kv_cache"))
    passes = [_pass_for_load(entry) for entry in manifest["passes"]]
    exported = export_model(model, args, kwargs, dynamic=manifest["dynamic"])
    ctx = PassContext(exported.args, exported.kwargs, target, recipe,
                      artifact=LoadedArtifact(root, manifest, state))
    gm = PassManager(passes, verify=False, load=True).run(exported.gm, ctx)
    _load_state(gm, state)
    return CompiledModel(gm, pinned_kwargs=exported.pinned_kwargs, target=target, recipe=recipe, report=report,
                         manifest={k: v for k, v in manifest.items()
                                   if k not in ("format_version", "qcompile_version", "torch_version", "layers",
                                                "buffers")},
                         model=model, kv_cache=kv_cache)


def _kv_cache_spec(record: dict[str, Any] | None) -> Any:
    """The recorded ``compile(kv_cache=...)`` spec, or ``None``; a malformed record is an ArtifactError."""
    if record is None:
        return None
    from qcompile.formats.kv import KVCacheSpec
    from qcompile.runtime.decoder import kv_cache_spec

    try:
        return kv_cache_spec(KVCacheSpec(**record))
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"manifest field manifest.kv_cache: {e}") from None


class _Skipped:
    """Stands in for a pass whose load rule is ``skip`` (its class need not be importable)."""

    exact = False
    requires: tuple[str, ...] = ()
    runs_after: tuple[str, ...] = ()
    runs_before: tuple[str, ...] = ()

    def __init__(self, name: str, ensures: list[str]):
        from qcompile.passes import OnLoad

        self.name, self.ensures, self.on_load = name, tuple(ensures), OnLoad.SKIP


def _pass_for_load(entry: dict[str, Any]) -> Any:
    from qcompile.passes import make_pass

    if entry["on_load"] == "skip":
        return _Skipped(entry["name"], entry["ensures"])
    try:
        return make_pass(entry["name"], **entry["options"])
    except ValueError as e:
        raise ArtifactError(f"manifest field manifest.passes: pass {entry['name']!r} must {entry['on_load']} at load, "
                            f"but it is not registered (import the module that defines it first): {e}") from None


def _load_state(gm: fx.GraphModule, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` strictly; non-persistent buffers (rotary frequencies, position ids) it
    holds replace the rebuilt model's own."""
    expected = gm.state_dict()
    buffers = {name: b for name, b in gm.named_buffers() if name not in expected}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected) - set(buffers))
    if missing or unexpected:
        raise ArtifactError(f"{WEIGHTS} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, t in {**expected, **buffers}.items():
        if name in state and (tuple(state[name].shape) != tuple(t.shape) or state[name].dtype != t.dtype):
            raise ArtifactError(f"{WEIGHTS}: tensor {name!r} is {state[name].dtype} {list(state[name].shape)}, "
                                f"the model needs {t.dtype} {list(t.shape)}")
    assign = any(t.is_meta for t in expected.values())  # an in-memory re-trace shares the state's tensors
    gm.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=True, assign=assign)
    with torch.no_grad():
        for name in set(state) & set(buffers):
            if buffers[name].is_meta:
                owner, _, leaf = name.rpartition(".")
                gm.get_submodule(owner).register_buffer(leaf, state[name], persistent=False)
            else:
                buffers[name].copy_(state[name])


def inputs_from_manifest(spec: dict) -> tuple[tuple, dict]:
    def make(x: Any) -> Any:
        if isinstance(x, dict) and set(x) == {"shape", "dtype"}:
            name = str(x["dtype"]).removeprefix("torch.")
            if name not in DTYPES or not isinstance(x["shape"], list) or not all(isinstance(d, int) and d >= 0 for d in x["shape"]):
                raise ArtifactError(f"manifest field manifest.example_inputs: bad tensor description {x}")
            dtype = DTYPES[name]
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
