"""Reading an ONNX model as untrusted input: file errors, opsets, op coverage, ``onnx.checker``.

Every failure is an :class:`OnnxImportError` whose message names the file (or the in-memory
model), and for graph problems the op type, the node and the opset. Checks run before any
weight is converted, so a bad file fails in a second.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from qcompile.frontend.onnx_ops import MAX_OPSET, MIN_OPSET, ONNX_DTYPES, OPS

if TYPE_CHECKING:
    import onnx

DEFAULT_DOMAINS = ("", "ai.onnx")
CONTRIB_IN_DEFAULT_DOMAIN = frozenset({"SimplifiedLayerNormalization"})
"""ONNX Runtime ops registered in the default domain that ``onnx``'s schemas do not know."""
WEIGHTS_KEY = "qcompile.weights"
"""Metadata of a weight-less graph (an artifact's ``onnx_graph.onnx``): the graph inputs that
stand for initializers stripped from it (their values live in the artifact's tensors)."""
_CHECK_DOMAIN = "qcompile.onnx_runtime_contrib"
SCOPE_KEY = "pkg.torch.onnx.name_scopes"
"""Node metadata torch.onnx's dynamo exporter writes: the module scopes a node ran in."""


class OnnxImportError(ValueError):
    """An ONNX model cannot be imported: an unreadable, truncated or invalid file, a missing
    external-data file, an opset or op the importer does not cover. The message names it."""


@dataclass
class LoadedOnnx:
    """A checked model, where it came from (for messages), its default-domain opset, and the
    names of the graph inputs that stand for stripped weights (a weight-less graph)."""

    model: onnx.ModelProto
    where: str
    opset: int
    stripped: dict[str, tuple[torch.dtype, tuple[int, ...]]]


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as e:
        raise ImportError("importing ONNX models needs the onnx package: pip install 'qcompile[onnx]'") from e
    return onnx


def load_onnx(source: str | os.PathLike | onnx.ModelProto) -> LoadedOnnx:
    """Read and check ``source`` (a path or a ``ModelProto``, not modified)."""
    onnx = _onnx()
    from google.protobuf.message import DecodeError

    if isinstance(source, onnx.ModelProto):
        model, where = source, f"ONNX model {source.graph.name or '(unnamed graph)'!r}"
        base = None
    else:
        path = Path(source)
        where = str(path)
        if not path.exists():
            raise OnnxImportError(f"{where}: no such file")
        if not path.is_file():
            raise OnnxImportError(f"{where} is not a file (expected an .onnx model file)")
        base = path.parent
        try:
            model = onnx.load(str(path), load_external_data=False)
        except DecodeError as e:
            raise OnnxImportError(f"{where} is not a readable ONNX model (truncated or corrupted?): {e}") from None
        except OSError as e:
            raise OnnxImportError(f"{where} cannot be read: {e}") from None
    opset = check_opsets(model, where)
    check_ops(model, where, opset)
    stripped = _stripped_weights(model, where)
    _check_external_data(model, where, base)
    _run_checker(model, where, stripped)
    if base is not None:
        try:
            from onnx.external_data_helper import load_external_data_for_model

            load_external_data_for_model(model, str(base))
        except (OSError, ValueError) as e:
            raise OnnxImportError(f"{where}: its external data cannot be read: {e}") from None
    return LoadedOnnx(model, where, opset, stripped)


def check_opsets(model: onnx.ModelProto, where: str) -> int:
    """The default-domain opset, or an error when it is outside ``MIN_OPSET..MAX_OPSET``."""
    versions = {o.domain: o.version for o in model.opset_import}
    opset = next((versions[d] for d in DEFAULT_DOMAINS if d in versions), None)
    if opset is None:
        raise OnnxImportError(f"{where} imports no default-domain (ai.onnx) opset")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise OnnxImportError(f"{where} uses opset {opset}; the importer supports opsets {MIN_OPSET} to {MAX_OPSET} "
                              "(convert it with onnx.version_converter.convert_version)")
    return opset


def check_ops(model: onnx.ModelProto, where: str, opset: int) -> None:
    """Every node's op must be in the op table: one error listing each uncovered op with a node."""
    versions = {o.domain: o.version for o in model.opset_import}
    missing: dict[str, str] = {}
    for node in model.graph.node:
        domain = node.domain if node.domain not in DEFAULT_DOMAINS else ""
        if domain == "" and (node.op_type in OPS or node.op_type == "Constant"):
            continue
        key = f"{domain}::{node.op_type}" if domain else node.op_type
        if key not in missing:
            version = opset if domain == "" else versions.get(domain, "?")
            missing[key] = f"{key} (node {node.name or '(unnamed)'!r}, opset {version})"
    if missing:
        raise OnnxImportError(f"{where}: ONNX op{'s' if len(missing) > 1 else ''} not covered by the importer: "
                              f"{'; '.join(missing.values())} (the covered ops are listed in docs/onnx-import.md)")


def _stripped_weights(model: onnx.ModelProto, where: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    entries = {p.key: p.value for p in model.metadata_props}
    if WEIGHTS_KEY not in entries:
        return {}
    try:
        names = json.loads(entries[WEIGHTS_KEY])
    except json.JSONDecodeError:
        names = None
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise OnnxImportError(f"{where}: metadata {WEIGHTS_KEY!r} must be a JSON list of names")
    inputs = {i.name: i for i in model.graph.input}
    out = {}
    for name in names:
        if name not in inputs:
            raise OnnxImportError(f"{where}: metadata {WEIGHTS_KEY!r} names {name!r}, which is not a graph input")
        tensor_type = inputs[name].type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
        if tensor_type.elem_type not in ONNX_DTYPES or any(d is None for d in dims):
            raise OnnxImportError(f"{where}: stripped weight {name!r} needs a static shape and a supported type")
        out[name] = (ONNX_DTYPES[tensor_type.elem_type], tuple(dims))
    return out


def _check_external_data(model: onnx.ModelProto, where: str, base: Path | None) -> None:
    """Each external-data file must exist next to the model (named in the error if not)."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    for init in model.graph.initializer:
        if not uses_external_data(init):
            continue
        location = ExternalDataInfo(init).location
        if base is None:
            raise OnnxImportError(f"{where}: initializer {init.name!r} refers to external data {location!r}, which an "
                                  "in-memory model cannot read; load it with onnx.load(path) or pass the file path")
        file = (base / location).resolve()
        if base.resolve() not in file.parents and file.parent != base.resolve():
            raise OnnxImportError(f"{where}: initializer {init.name!r} refers to external data {location!r} outside "
                                  f"the model's directory")
        if not file.is_file():
            raise OnnxImportError(f"{where}: external data file {file} (initializer {init.name!r}) is missing")


def _run_checker(model: onnx.ModelProto, where: str, stripped: dict) -> None:
    """``onnx.checker`` on the graph without its large initializers (checked when converted) and
    with ONNX Runtime's default-domain contrib ops moved to a domain the checker skips."""
    onnx = _onnx()
    proto = weightless_copy(model, {i.name for i in model.graph.initializer if _nbytes(i) > 4096})
    contrib = False
    for node in proto.graph.node:
        if node.domain in DEFAULT_DOMAINS and node.op_type in CONTRIB_IN_DEFAULT_DOMAIN:
            node.domain = _CHECK_DOMAIN
            contrib = True
    if contrib:
        proto.opset_import.append(onnx.helper.make_opsetid(_CHECK_DOMAIN, 1))
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OnnxImportError(f"{where} is not a valid ONNX model: {first}") from None


def _nbytes(t: Any) -> int:
    from onnx.external_data_helper import uses_external_data

    if uses_external_data(t):
        return 1 << 30
    return len(t.raw_data) + 8 * (len(t.float_data) + len(t.int64_data) + len(t.int32_data) + len(t.double_data))


def weightless_copy(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """``model`` with the initializers ``names`` replaced by typed graph inputs (listed in the
    ``qcompile.weights`` metadata); everything else copied. ``model`` is not modified."""
    onnx = _onnx()
    out = onnx.ModelProto()
    out.ir_version = model.ir_version
    out.producer_name, out.producer_version = model.producer_name, model.producer_version
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    g = out.graph
    g.name = model.graph.name
    g.node.extend(model.graph.node)
    for node in g.node:  # keep the module scopes (layer paths), drop stack traces and the like
        kept_props = [(p.key, p.value) for p in node.metadata_props if p.key == SCOPE_KEY]
        del node.metadata_props[:]
        for key, value in kept_props:
            node.metadata_props.add(key=key, value=value)
        node.doc_string = ""
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    g.value_info.extend(model.graph.value_info)
    kept = []
    for init in model.graph.initializer:
        if init.name in names:
            g.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            kept.append(init)
    g.initializer.extend(kept)
    meta = [p for p in model.metadata_props if p.key != WEIGHTS_KEY]
    previous = json.loads(next((p.value for p in model.metadata_props if p.key == WEIGHTS_KEY), "[]"))
    for p in meta:
        out.metadata_props.add(key=p.key, value=p.value)
    if names or previous:
        out.metadata_props.add(key=WEIGHTS_KEY, value=json.dumps(sorted(set(previous) | names)))
    return out


def tensor_from_proto(t: onnx.TensorProto, where: str) -> torch.Tensor:
    """An initializer or Constant value as a torch tensor (a named error for a bad one)."""
    onnx = _onnx()
    if t.data_type not in ONNX_DTYPES:
        name = onnx.TensorProto.DataType.Name(t.data_type) if t.data_type in onnx.TensorProto.DataType.values() else t.data_type
        raise OnnxImportError(f"{where}: tensor {t.name!r} has element type {name}, which the importer does not support")
    try:
        if t.data_type == onnx.TensorProto.BFLOAT16:
            raw = np.frombuffer(t.raw_data, dtype=np.uint16) if t.raw_data else np.asarray(t.int32_data, np.uint16)
            return torch.from_numpy(raw.copy()).view(torch.bfloat16).reshape(tuple(t.dims))
        array = onnx.numpy_helper.to_array(t)
    except (ValueError, TypeError, RuntimeError) as e:
        raise OnnxImportError(f"{where}: tensor {t.name!r} cannot be read (truncated or corrupted data?): {e}") from None
    return torch.from_numpy(np.array(array, copy=True)).reshape(tuple(t.dims))
