"""``export_onnx``: a compiled model → one ONNX file that stock ONNX Runtime runs.

Steps: compile (for an ``nn.Module``), bind the example inputs to the compiled graph, lower it for
ONNX (``lowering.py``: repacked tensors, no re-quantization), trace it with ``torch.export``
(dynamic batch and sequence axes by ``frontend/dynamic_shapes.py``, the same fallbacks as
compile), translate with ``torch.onnx`` (the export ops' translations from ``ops.py``), name the
axes and outputs, and write atomically: a temporary directory next to ``path`` receives the file
(with external data above :data:`EXTERNAL_DATA_THRESHOLD`), which must pass
``onnx.checker.check_model(full_check=True)``, strict shape inference and, with ``verify``, match
qcompile's own reference output on the example inputs in ONNX Runtime; only then is it renamed
to ``path``. On any failure nothing is left at ``path``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
import torch
import torch.utils._pytree as pytree
from torch import fx

from qcompile.codegen.op_schema import QuantizedLinearCall, quantized_linear_nodes
from qcompile.codegen.outlier_ops import SPARSE_RESIDUAL
from qcompile.codegen.quantized_linear import reference_quantized_linear
from qcompile.compiled import CompiledModel
from qcompile.formats import PER_TENSOR, QuantSpec
from qcompile.frontend.inputs import split_inputs
from qcompile.frontend.torch_export import export_with_fallbacks
from qcompile.ir.interpret import flat_inputs
from qcompile.onnx_export.lowering import (
    NO_ONNX_SPLIT,
    LayerExport,
    OnnxExportError,
    lower_for_onnx,
    shared_copy,
    spec_unsupported_reason,
)
from qcompile.onnx_export.ops import (
    OPSET,
    TRANSLATIONS,
    int8_dynamic_matmul,
    uint8_per_tensor_matmul,
)
from qcompile.onnx_export.repack import to_matmul_integer
from qcompile.recipes import Recipe, get_recipe
from qcompile.targets import Target, get_target

ONNX_TARGETS = ("ort-cpu", "ort-cuda")
ACCURACY_LEVELS = {"ort-cpu": 0, "ort-cuda": 0}
"""MatMulNBits ``accuracy_level`` by target. 0 (unset): ONNX Runtime computes in float32, so its
output equals qcompile's reference within ``MAX_REL_ERROR`` / ``MIN_COSINE``. Level 4 lets ORT's
CPU kernel quantize activations to int8 per block: faster, but on random data max rel err ~5e-3
and cosine ~0.99998 (docs/onnx-export.md), outside those bounds."""
MAX_REL_ERROR = 1e-3
MIN_COSINE = 0.99999
"""What ``verify`` requires of ONNX Runtime's output against qcompile's reference (at accuracy levels
0-1, weight-only models): ``max |ort − ref| / max |ref|`` and the cosine of the flattened outputs, per
output."""
ACTIVATION_QUANT_MIN_COSINE = 0.995
"""With quantized activations (W8A8) only a cosine is required, and a looser one: rounding activations
is discontinuous, so last-bit differences between torch's and ONNX Runtime's float ops (LayerNorm,
GELU, softmax) flip a few int8 codes per layer, and the flips compound over layers. The bound catches
a wrong layout or scale (ORT's bias-scaling fusion gave cosine 0.50) while leaving room for that. Each W8A8 linear
agrees to float32 rounding given the same input (same codes and integer products,
tests/onnx_export/test_repack.py); end to end on MiniLM (6 layers)
ONNX Runtime vs the compiled model: cosine 0.99955 (4 README sentences) and 0.99898 (8 x 128 tokens),
max rel err 1.6e-2, while qcompile's own float32 reference (fake-quantized activations, float
matmul) and its own CPU kernel (integer matmul) differ more (cosine 0.9983; docs/onnx-export.md)."""
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26
"""Initializer bytes above which tensors go to ``<file>.data`` (protobuf's 2 GiB limit, less 64 MiB
for the graph itself)."""


@dataclass
class ExportReport:
    """What ``export_onnx`` wrote: the file, its size next to the compiled model's packed bytes, the
    ONNX op each quantized layer runs as, the check against qcompile's reference, and notes."""

    path: str
    target: str
    recipe: str
    opset: int
    accuracy_level: int
    file_bytes: int
    """The ONNX file plus its external data file, if any."""
    external_data: str | None
    packed_bytes: int
    """The compiled model's packed weight tensors (codes, scales, zero points) of the quantized layers."""
    onnx_quantized_bytes: int
    """The same layers' repacked tensors in the file."""
    float_bytes: int
    """Every other initializer in the file (embeddings, LM head, norms, biases, float layers)."""
    inputs: dict[str, list[Any]]
    """ONNX input name → dims (a name for a dynamic axis)."""
    outputs: list[str]
    layers: list[LayerExport]
    max_rel_error: float | None = None
    cosine: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-ready data."""
        return asdict(self)

    def to_json(self, indent: int = 2) -> str:
        """:meth:`to_dict` as JSON text."""
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        ops: dict[str, int] = {}
        for layer in self.layers:
            ops[layer.onnx_op] = ops.get(layer.onnx_op, 0) + 1
        lines = [f"{self.path}: {self.file_bytes:,} bytes (quantized layers {self.onnx_quantized_bytes:,} B, "
                 f"compiled packed {self.packed_bytes:,} B; other initializers {self.float_bytes:,} B)"
                 + (f", external data {self.external_data}" if self.external_data else ""),
                 f"target {self.target}, recipe {self.recipe}, opset {self.opset}, MatMulNBits accuracy_level "
                 f"{self.accuracy_level}",
                 "inputs: " + ", ".join(f"{k} {v}" for k, v in self.inputs.items())]
        lines += [f"  {count} x {name}" for name, count in ops.items()]
        if self.max_rel_error is not None:
            lines.append(f"ONNX Runtime vs qcompile reference on the example inputs: max rel err "
                         f"{self.max_rel_error:.2e}, cosine {self.cosine:.7f}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- inputs and reference
def _reference_linear(*args: Any) -> torch.Tensor:
    call = QuantizedLinearCall.from_op_args(args)
    qt = call.quantized_weight()
    if call.act_spec is not None and spec_unsupported_reason(qt.spec, call.act_spec) is None:
        w = to_matmul_integer(qt)  # W8A8: the integer product is exact (what qcompile's CPU kernel computes)
        if call.act_spec.group_size == PER_TENSOR:
            return uint8_per_tensor_matmul(call.x, w.b, w.scale, call.bias)
        return int8_dynamic_matmul(call.x, w.b, w.scale, call.bias, call.act_spec.scale_dtype)
    return reference_quantized_linear(call.x, qt, call.bias, call.act_spec)


def reference_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` (tensors shared) whose quantized linears compute qcompile's reference in float32
    whatever the device's kernels: weight-only layers dequantize and run a float32 matmul; W8A8 layers
    quantize activations (per token or per tensor) as ``fake_quantize`` does and take the exact integer product
    (``torch._int_mm``'s result, not a float32 matmul of the fake-quantized values)."""
    ref = shared_copy(gm)
    for node in quantized_linear_nodes(ref):
        node.target = _reference_linear
    ref.recompile()
    return ref


def agreement(got: list[torch.Tensor], ref: list[torch.Tensor]) -> tuple[float, float]:
    """Worst over outputs of ``max |got − ref| / max |ref|``, and the lowest cosine of the flattened outputs."""
    worst, cos = 0.0, 1.0
    for g, r in zip(got, ref):
        if not (isinstance(r, torch.Tensor) and r.is_floating_point()):
            continue
        g, r = g.double().flatten(), r.double().flatten()
        worst = max(worst, float((g - r).abs().max() / r.abs().max().clamp_min(1e-30)))
        cos = min(cos, float(torch.nn.functional.cosine_similarity(g, r, dim=0)))
    return worst, cos


# ----------------------------------------------------------------------------- the ONNX model
def _rename_axes(model: ir.Model, inputs: list[torch.Tensor]) -> None:
    """Dynamic axes named as the trace named them (``frontend/dynamic_shapes.py``): ``batch`` (dim 0 of
    the first input), ``seq`` (dim 1 of the first token-shaped input); others keep torch's symbols."""
    names: dict[str, str] = {}
    first_token = next((i for i, t in enumerate(inputs) if t.dim() == 2 and not t.is_floating_point()), None)
    for i, value in enumerate(model.graph.inputs):
        shape = value.shape
        if shape is None:
            continue
        for d, dim in enumerate(shape):
            if isinstance(dim, ir.SymbolicDim) and dim.value is not None:
                if i == 0 and d == 0:
                    names.setdefault(dim.value, "batch")
                elif i == first_token and d == 1:
                    names.setdefault(dim.value, "seq")
    if not names:
        return
    for value in [*model.graph.inputs, *model.graph.outputs]:
        if value.shape is not None:
            value.shape = ir.Shape([names.get(d.value, d.value) if isinstance(d, ir.SymbolicDim) else d
                                    for d in value.shape])


def _strip_debug_metadata(model: ir.Model) -> None:
    """Drop torch.onnx's per-node debug records (stack traces, FX node text): about 1.3 kB a node,
    more than a tiny model's weights, and nothing ONNX Runtime reads."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        node.metadata_props.clear()
    for value in [*model.graph.inputs, *model.graph.outputs, *model.graph.initializers.values()]:
        value.metadata_props.clear()


def _output_names(structure: Any) -> list[str]:
    """``logits``, ``last_hidden_state``, ``output_0``: the tensor leaves' pytree paths as names."""
    leaves = [(path, v) for path, v in pytree.tree_flatten_with_path(structure)[0] if isinstance(v, torch.Tensor)]
    names = []
    for i, (path, _) in enumerate(leaves):
        name = re.sub(r"[^0-9A-Za-z_]+", "_", pytree.keystr(path)).strip("_") or f"output_{i}"
        names.append(name if name not in names else f"{name}_{i}")
    return names


def _initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def _quantized_initializer_names(model: ir.Model, layers: list[LayerExport]) -> set[str]:
    """The initializers the lowering added for the quantized layers (named ``<layer>.onnx_*``)."""
    prefixes = tuple(f"{layer.path}.onnx_" if layer.path else "onnx_" for layer in layers)
    return {name for name in model.graph.initializers if name.startswith(prefixes)} if prefixes else set()


def _check_written(file: Path) -> None:
    """onnx's full check and strict shape inference on the written file (paths, so external data works)."""
    try:
        onnx.checker.check_model(str(file), full_check=True)
        onnx.shape_inference.infer_shapes_path(str(file), str(file.with_suffix(".inferred")), check_type=True,
                                               strict_mode=True)
    except Exception as e:  # noqa: BLE001 - any checker failure is an export failure
        raise OnnxExportError(f"the exported model fails onnx's checks: {type(e).__name__}: {e}") from e
    finally:
        file.with_suffix(".inferred").unlink(missing_ok=True)


def _run_onnxruntime(file: Path, feeds: dict[str, Any], threads: int | None = None) -> list[torch.Tensor]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    return [torch.from_numpy(o) for o in session.run(None, feeds)]


# ----------------------------------------------------------------------------- the public function
def check_output_path(path: str | os.PathLike) -> Path:
    out = Path(path)
    if out.is_dir():
        raise OnnxExportError(f"output {str(out)!r} is a directory; give a file path such as {str(out / 'model.onnx')!r}")
    if not out.parent.is_dir():
        raise OnnxExportError(f"output {str(out)!r}: directory {str(out.parent)!r} does not exist")
    return out


def precheck_recipe(rcp: Recipe, overrides: dict | None) -> None:
    """Fail before compiling when the recipe's formats have no ONNX Runtime export."""
    specs = [("the recipe", rcp.weight, rcp.activation)]
    specs += [(f"override {pattern!r}", spec, rcp.activation) for pattern, spec in rcp.overrides if spec is not None]
    for pattern, text in (overrides or {}).items():
        if text is not None:
            specs.append((f"override {pattern!r}", text if isinstance(text, QuantSpec) else QuantSpec.parse(text),
                          rcp.activation))
    for where, weight, act in specs:
        if weight is None:
            continue
        reason = spec_unsupported_reason(weight, act)
        if reason is not None:
            raise OnnxExportError(f"recipe {rcp.name!r} ({where}): {reason}")
    if rcp.pass_options.get("split_outliers", {}).get("method") == "sparse":
        raise OnnxExportError(f"recipe {rcp.name!r}: {NO_ONNX_SPLIT[SPARSE_RESIDUAL]}")


def export_onnx(
    model_or_compiled: CompiledModel | torch.nn.Module | Any,
    example_inputs: Any,
    path: str | os.PathLike,
    target: str | Target = "ort-cpu",
    recipe: str | Recipe | None = None,
    *,
    example_kwargs: dict | None = None,
    accuracy_level: int | None = None,
    verify: bool = True,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    **compile_kwargs: Any,
) -> ExportReport:
    """Write ``model_or_compiled`` as an ONNX file stock ONNX Runtime runs; see the module docstring.

    Args:
        model_or_compiled: a ``CompiledModel`` (exported as compiled, for whatever target: its packed
            tensors are read, never a device's weight cache), or what ``qcompile.compile`` takes (an
            ``nn.Module``), compiled first with ``qcompile.compile(model, example_inputs, target=target,
            recipe=recipe, **compile_kwargs)``.
        example_inputs: as for ``qcompile.compile``; traced (batch and sequence stay dynamic) and used to
            check ONNX Runtime's output.
        path: the ``.onnx`` file to write (its directory must exist); external data goes to ``<path>.data``.
        target: ``ort-cpu`` or ``ort-cuda`` (sets the default recipe and ``accuracy_level``).
        accuracy_level: MatMulNBits' attribute; default :data:`ACCURACY_LEVELS` of the target (exact).
        verify: run the file in ONNX Runtime (CPU) on the example inputs against qcompile's reference
            (:func:`reference_graph`) and require ``MAX_REL_ERROR`` / ``MIN_COSINE`` (weight-only) or
            ``ACTIVATION_QUANT_MIN_COSINE`` (W8A8); at accuracy level 2 and up the agreement is a note.
        external_data_threshold: initializer bytes above which tensors are written as external data.
    """
    tgt = get_target(target)
    if tgt.name not in ONNX_TARGETS:
        raise OnnxExportError(f"target {tgt.name!r} is not an ONNX Runtime target; use one of {', '.join(ONNX_TARGETS)}")
    level = ACCURACY_LEVELS[tgt.name] if accuracy_level is None else int(accuracy_level)
    if level not in (0, 1, 2, 3, 4):
        raise OnnxExportError(f"accuracy_level must be 0-4 (MatMulNBits), got {accuracy_level!r}")
    out = check_output_path(path)
    args, kwargs = split_inputs(example_inputs, example_kwargs)
    if isinstance(model_or_compiled, CompiledModel):
        if recipe is not None or compile_kwargs:
            given = ["recipe"] * (recipe is not None) + sorted(compile_kwargs)
            raise TypeError(f"export_onnx: a CompiledModel is exported as compiled; {', '.join(given)} apply only "
                            "when an nn.Module is compiled here")
        cm = model_or_compiled
    else:  # whatever qcompile.compile takes (an nn.Module; an ONNX file once the importer exists)
        import qcompile

        rcp = get_recipe(recipe if recipe is not None else tgt.default_recipe)
        precheck_recipe(rcp, compile_kwargs.get("overrides"))
        cm = qcompile.compile(model_or_compiled, args, target=tgt, recipe=rcp, example_kwargs=kwargs, **compile_kwargs)

    gm, call_args, call_kwargs = cm.graph_call(args, kwargs)
    lowered = lower_for_onnx(gm, level)
    ref_gm = reference_graph(gm)
    with torch.no_grad():
        structure = ref_gm(*call_args, **call_kwargs)  # the output names, and the reference for verify
    names = _output_names(structure)
    reference = [t for t in pytree.tree_leaves(structure) if isinstance(t, torch.Tensor)]

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*training mode.*", category=UserWarning)
        ep, _, _ = export_with_fallbacks(lowered.gm, call_args, call_kwargs, True)
        program = torch.onnx.export(ep, dynamo=True, custom_translation_table=TRANSLATIONS, opset_version=OPSET,
                                    optimize=True, verbose=False)
    model = program.model
    inputs = [t for t in flat_inputs(gm, call_args, call_kwargs) if isinstance(t, torch.Tensor)]
    if len(model.graph.inputs) != len(inputs):
        raise OnnxExportError(f"the ONNX graph takes {len(model.graph.inputs)} inputs, the compiled graph "
                              f"{len(inputs)} tensors")
    _rename_axes(model, inputs)
    taken = {v.name for node in model.graph for v in node.outputs} | {v.name for v in model.graph.inputs} \
        | set(model.graph.initializers)
    if len(names) == len(model.graph.outputs) and not (set(names) - {v.name for v in model.graph.outputs}) & taken:
        for value, name in zip(model.graph.outputs, names):
            value.name = name
    _strip_debug_metadata(model)
    model.producer_name = "qcompile"
    model.metadata_props.update({"qcompile.target": tgt.name, "qcompile.recipe": cm.recipe.name,
                                 "qcompile.accuracy_level": str(level)})

    total = _initializer_bytes(model)
    quantized = _quantized_initializer_names(model, lowered.layers)
    quantized_bytes = sum(model.graph.initializers[n].const_value.nbytes for n in quantized)
    external = total > external_data_threshold
    data_name = f"{out.name}.data" if external else None
    feeds = {v.name: t.numpy() for v, t in zip(model.graph.inputs, inputs)}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        file = tmp / out.name
        ir.save(model, file, external_data=data_name)
        _check_written(file)
        rel = cos = None
        notes = list(lowered.notes)
        if verify:
            got = _run_onnxruntime(file, feeds)
            rel, cos = agreement(got, reference)
            quantized_acts = any(layer.activation is not None for layer in lowered.layers)
            if level >= 2:
                notes.append(f"accuracy_level {level}: ONNX Runtime may quantize activations inside MatMulNBits; "
                             f"max rel err {rel:.2e}, cosine {cos:.7f} against qcompile's reference (not required "
                             f"to be within {MAX_REL_ERROR:g} / {MIN_COSINE})")
            elif quantized_acts and cos < ACTIVATION_QUANT_MIN_COSINE:
                raise OnnxExportError(f"ONNX Runtime's output differs from qcompile's reference on the example inputs: "
                                      f"cosine {cos:.7f} (required {ACTIVATION_QUANT_MIN_COSINE} with quantized "
                                      f"activations), max rel err {rel:.2e}")
            elif not quantized_acts and (rel > MAX_REL_ERROR or cos < MIN_COSINE):
                raise OnnxExportError(f"ONNX Runtime's output differs from qcompile's reference on the example inputs: "
                                      f"max rel err {rel:.2e} (allowed {MAX_REL_ERROR:g}), cosine {cos:.7f} "
                                      f"(required {MIN_COSINE})")
        size = file.stat().st_size + ((tmp / data_name).stat().st_size if data_name else 0)
        if data_name:
            os.replace(tmp / data_name, out.parent / data_name)
        os.replace(file, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    dims = {v.name: [d.value if isinstance(d, ir.SymbolicDim) else int(d) for d in (v.shape or [])]
            for v in model.graph.inputs}
    return ExportReport(
        path=str(out), target=tgt.name, recipe=cm.recipe.name, opset=OPSET, accuracy_level=level, file_bytes=size,
        external_data=str(out.parent / data_name) if data_name else None,
        packed_bytes=sum(layer.packed_bytes for layer in lowered.layers), onnx_quantized_bytes=quantized_bytes,
        float_bytes=total - quantized_bytes, inputs=dims, outputs=[v.name for v in model.graph.outputs],
        layers=lowered.layers, max_rel_error=rel, cosine=cos, notes=notes,
    )
