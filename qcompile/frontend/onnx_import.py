"""ONNX model → a torch ``nn.Module`` that runs the ONNX graph with torch ops (``docs/onnx-import.md``).

The module's parameters are the graph's initializers (under their names where they are module
paths), each ``MatMul``/``Gemm`` with a constant weight is a real ``nn.Linear`` (weight in torch's
``[out, in]`` layout) and each norm a norm module, at the module path the exporter recorded (or
the initializer names give). Its ``forward`` takes the graph inputs by name, in order. So the
torch frontend (``torch_export.export_model``) traces it like any model: the FX graph has
``aten.linear`` with weight attributes and paths, norms the canonicalizer raises, plain ATen
elsewhere, and dynamic batch/sequence dimensions (shape subgraphs run as Python values on
``SymInt``s, ``onnx_values``). Constant subgraphs are folded at import time.
"""

from __future__ import annotations

import itertools
import keyword
import os
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from qcompile.frontend.onnx_graph import (
    LAYER_NORM,
    LINEAR,
    RMS_NORM,
    Graph,
    Node,
    Origin,
    attribute_values,
    clean_path,
    constant_value,
    fold_constants,
    is_module_path,
    layer_path,
    node_scope,
    recognize_linears,
    recognize_norms,
)
from qcompile.frontend.onnx_load import (
    DEFAULT_DOMAINS,
    LoadedOnnx,
    OnnxImportError,
    load_onnx,
    tensor_from_proto,
    weightless_copy,
)
from qcompile.frontend.onnx_ops import (
    MULTI_OUTPUT,
    ONNX_DTYPES,
    OPS,
    OpContext,
    UnsupportedOnnxNode,
)
from qcompile.frontend.onnx_values import host_from_tensor, to_tensor

if TYPE_CHECKING:
    import onnx

__all__ = ["OnnxImportError", "OnnxModule", "import_onnx"]

DEFAULT_BATCH, DEFAULT_SEQ = 2, 16
"""Sizes of the example inputs built for an ONNX model given none: symbolic dim 0 → batch, any other → seq."""
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def import_onnx(source: str | os.PathLike | onnx.ModelProto) -> OnnxModule:
    """Import an ONNX file or ``ModelProto`` (not modified) as an :class:`OnnxModule`.

    Raises :class:`OnnxImportError` naming the file for an unreadable, truncated or invalid model
    or a missing external-data file, and naming the op type, node and opset for an op or an
    opset the importer does not cover."""
    loaded = load_onnx(source)
    try:
        return _build(loaded)
    except UnsupportedOnnxNode as e:
        raise OnnxImportError(str(e)) from e.__cause__


@dataclass(frozen=True)
class InputSpec:
    """A graph input: its ONNX name, the ``forward`` parameter it became, dtype and dimensions
    (an int for a static size, the symbolic name or ``None`` otherwise)."""

    onnx_name: str
    arg_name: str
    dtype: torch.dtype
    dims: tuple[int | str | None, ...]


@dataclass
class _Step:
    op_type: str
    module: str | None
    inputs: tuple
    outputs: tuple[str, ...]
    attrs: dict
    label: str
    free: tuple[str, ...] = ()


class OnnxLayerNorm(nn.Module):
    """ONNX ``LayerNormalization`` over the last axis (or its decomposed form) as ``F.layer_norm``."""

    def __init__(self, weight: nn.Parameter | None, bias: nn.Parameter | None, eps: float):
        super().__init__()
        self.weight, self.bias, self.eps = weight, bias, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = tuple(self.weight.shape) if self.weight is not None else tuple(x.shape[-1:])
        return F.layer_norm(x, shape, self.weight, self.bias, self.eps)


class OnnxRMSNorm(nn.Module):
    """RMS norm over the last axis written as Llama writes it, which the canonicalizer raises to
    ``qcompile::rms_norm``: ``weight * (x * rsqrt(mean(x², -1) + eps)).to(dtype)``. ``stash``:
    compute half-precision inputs in float32 (``SimplifiedLayerNormalization``'s ``stash_type``);
    ``cast_to``: the dtype an exporter's ``Cast`` before the weight product names."""

    def __init__(self, weight: nn.Parameter, eps: float, stash: bool = False, cast_to: torch.dtype | None = None):
        super().__init__()
        self.weight, self.eps, self.stash, self.cast_to = weight, eps, stash, cast_to

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if self.stash and dtype in _LOW_PRECISION:
            x = x.to(torch.float32)
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(self.cast_to if self.cast_to is not None else dtype)


class OnnxModule(nn.Module):
    """An imported ONNX graph (build it with :func:`import_onnx`). ``forward`` takes the graph
    inputs (names made Python identifiers: ``input.1`` → ``input_1``) and returns the output
    tensor, or a tuple of them for a graph with several outputs (``output_names``).

    ``import_notes``: what the importer did (linears, norms) and every fast path it did not take
    (a constant weight left as a float matmul, a norm-like pattern not recognized)."""

    input_specs: tuple[InputSpec, ...]
    output_names: tuple[str, ...]
    source: str
    import_notes: list[str]

    def _run(self, inputs: tuple) -> Any:
        self._check_inputs(inputs)
        device = next((t.device for t in inputs if isinstance(t, torch.Tensor)), None)
        env: dict[str, Any] = {spec.onnx_name: t for spec, t in zip(self.input_specs, inputs)}
        ctx = OpContext(device)
        for step in self._steps:
            args = [self._value(ref, env) for ref in step.inputs]
            try:
                if step.module is not None:
                    out = self.get_submodule(step.module)(args[0])
                else:
                    ctx.node = f"{self.source}: {step.label}"
                    out = OPS[step.op_type](ctx, args, step.attrs)
            except UnsupportedOnnxNode as e:
                raise OnnxImportError(str(e)) from None
            except Exception as e:
                e.add_note(f"while running ONNX {step.label} of {self.source}")
                raise
            outs = out if isinstance(out, tuple) else (out,)
            for name, value in zip(step.outputs, outs):
                if name:
                    env[name] = value
            for name in step.free:
                env.pop(name, None)
        results = [to_tensor(self._value(ref, env), device) for ref in self._outputs]
        return results[0] if len(results) == 1 else tuple(results)

    def _value(self, ref: tuple, env: dict) -> Any:
        kind = ref[0]
        if kind == "env":
            return env[ref[1]]
        if kind == "value":
            return ref[1]
        if kind == "attr":
            owner, _, leaf = ref[1].rpartition(".")
            return getattr(self.get_submodule(owner) if owner else self, leaf)
        return None

    def _check_inputs(self, inputs: tuple) -> None:
        """Types, ranks and static sizes as the graph declares them; dimensions sharing a symbolic
        name (``batch``) are equal (under torch.export, ``torch._check`` tells the tracer so at once,
        which keeps the shape expressions of later ops simple)."""
        named: dict[str, tuple[str, int, Any]] = {}
        for spec, t in zip(self.input_specs, inputs):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{self.source}: input {spec.onnx_name!r} must be a tensor, got {type(t).__name__}")
            if t.dtype != spec.dtype:
                raise TypeError(f"{self.source}: input {spec.onnx_name!r} must be {str(spec.dtype)[6:]} (the ONNX "
                                f"graph's type), got {str(t.dtype)[6:]}")
            if t.dim() != len(spec.dims):
                raise ValueError(f"{self.source}: input {spec.onnx_name!r} must have {len(spec.dims)} dimensions, "
                                 f"got shape {list(t.shape)}")
            for i, (want, got) in enumerate(zip(spec.dims, t.shape)):
                if isinstance(want, int) and isinstance(got, int) and want != got:
                    raise ValueError(f"{self.source}: input {spec.onnx_name!r} dim {i} is fixed at {want} by the ONNX "
                                     f"graph, got {got}")
                if not isinstance(want, str):
                    continue
                if want not in named:
                    named[want] = (spec.onnx_name, i, got)
                    continue
                first, j, size = named[want]
                message = f"{self.source}: input {spec.onnx_name!r} dim {i} and input {first!r} dim {j} are both " \
                          f"{want!r} in the ONNX graph, but differ ({got} and {size})"
                if isinstance(got, int) and isinstance(size, int):
                    if got != size:
                        raise ValueError(message)
                else:
                    torch._check(got == size, lambda message=message: message)

    def example_inputs(self, batch: int = DEFAULT_BATCH, seq: int = DEFAULT_SEQ, seed: int = 0) -> dict[str, torch.Tensor]:
        """Inputs built from the graph inputs' names and types, by ``forward`` parameter name: static
        dimensions as declared, a symbolic dim 0 of size ``batch`` and any other of size ``seq``;
        integer inputs named like a mask all ones, like token types zeros, like positions
        ``0..seq-1``, token ids random below the embedding table's size (zeros where no table is
        found); floating inputs standard normal."""
        gen = torch.Generator().manual_seed(seed)
        out = {}
        for spec in self.input_specs:
            shape = [d if isinstance(d, int) else (batch if i == 0 else seq) for i, d in enumerate(spec.dims)]
            name = spec.onnx_name.lower()
            if spec.dtype.is_floating_point:
                t = torch.randn(shape, generator=gen).to(spec.dtype)
            elif spec.dtype == torch.bool or "mask" in name:
                t = torch.ones(shape, dtype=spec.dtype)
            elif "position" in name and shape:
                t = torch.arange(shape[-1]).expand(shape).to(spec.dtype).contiguous()
            elif spec.onnx_name in self._vocab and "type" not in name:
                t = torch.randint(0, self._vocab[spec.onnx_name], shape, generator=gen).to(spec.dtype)
            else:
                t = torch.zeros(shape, dtype=spec.dtype)
            out[spec.arg_name] = t
        return out

    def describe_example_inputs(self, inputs: dict[str, torch.Tensor]) -> str:
        """One line saying what :meth:`example_inputs` built (a report note)."""
        parts = [f"{k} {str(v.dtype)[6:]} {list(v.shape)}" for k, v in inputs.items()]
        return f"example inputs built from the ONNX graph inputs ({', '.join(parts)}); pass example_inputs= and " \
               "calibration= with real data for meaningful errors and calibration"

    def weightless_graph(self) -> bytes:
        """The ONNX graph without the tensors this module holds (they are in its state dict): what
        an artifact stores to rebuild the module's architecture (``import_onnx`` reads it back,
        with those weights on the meta device)."""
        return self._weightless

    def extra_repr(self) -> str:
        return f"source={self.source!r}, inputs={[s.onnx_name for s in self.input_specs]}"


# ----------------------------------------------------------------------------- building
def _identifier(name: str, taken: set[str]) -> str:
    ident = re.sub(r"\W", "_", name, flags=re.ASCII) or "input"
    if ident[0].isdigit() or keyword.iskeyword(ident) or ident in ("self",):
        ident = f"input_{ident}"
    base, i = ident, 1
    while ident in taken:
        ident, i = f"{base}_{i}", i + 1
    if not ident.isidentifier() or keyword.iskeyword(ident):  # the forward is generated source: identifiers only
        raise OnnxImportError(f"graph input {name!r} cannot be made a Python parameter name")
    taken.add(ident)
    return ident


def _forward_for(arg_names: list[str]) -> Any:
    """``def forward(self, <args>)`` calling ``_run`` (names are validated identifiers)."""
    params = ", ".join(arg_names)
    src = f"def forward(self, {params}):\n    return self._run(({params}{',' if len(arg_names) == 1 else ''}))\n"
    namespace: dict[str, Any] = {}
    exec(compile(src, "<onnx-import forward>", "exec"), namespace)  # noqa: S102 - identifiers only
    fn = namespace["forward"]
    fn.__doc__ = f"Run the ONNX graph on ({params})."
    return fn


def _input_spec(value_info: Any, arg_name: str, where: str) -> InputSpec:
    t = value_info.type.tensor_type
    if not value_info.type.HasField("tensor_type") or t.elem_type not in ONNX_DTYPES:
        raise OnnxImportError(f"{where}: graph input {value_info.name!r} is not a tensor of a supported type")
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim)
    return InputSpec(value_info.name, arg_name, ONNX_DTYPES[t.elem_type], dims)


_PROBE = nn.Module()


class _Tree:
    """Places modules and tensors at dotted paths under the root, suffixing a path that is taken."""

    def __init__(self, root: nn.Module):
        self.root = root

    def _free(self, parts: list[str]) -> bool:
        owner: nn.Module | None = self.root
        for i, p in enumerate(parts):
            last = i == len(parts) - 1
            if owner is None:  # inside a container still to be created
                if hasattr(_PROBE, p):
                    return False
                continue
            if not last and p in owner._modules:
                owner = owner._modules[p]
                continue
            if hasattr(owner, p):
                return False
            owner = None
        return True

    def holds(self, path: str, value: torch.Tensor) -> bool:
        """Whether ``path`` already names ``value`` itself (a weight a linear or norm shares)."""
        owner, _, leaf = path.rpartition(".")
        try:
            module = self.root.get_submodule(owner) if owner else self.root
        except AttributeError:
            return False
        return getattr(module, leaf, None) is value

    def place(self, path: str, value: nn.Module | torch.Tensor, fallback: str) -> str:
        """Put ``value`` (a module, a Parameter, or a buffer tensor) at ``path`` or a free variant."""
        candidates = itertools.chain([path], (f"{path}_{i}" for i in range(1, 100)), [fallback],
                                     (f"{fallback}_{i}" for i in itertools.count(1)))
        for cand in candidates:
            parts = cand.split(".")
            if not self._free(parts):
                continue
            owner = self.root
            for p in parts[:-1]:
                if p not in owner._modules:
                    owner.add_module(p, nn.Module())
                owner = owner._modules[p]
            if isinstance(value, nn.Module):
                owner.add_module(parts[-1], value)
            elif isinstance(value, nn.Parameter):
                owner.register_parameter(parts[-1], value)
            else:
                owner.register_buffer(parts[-1], value, persistent=True)
            return cand
        raise AssertionError("unreachable: the fallback candidates are endless")


class _Builder:
    def __init__(self, loaded: LoadedOnnx):
        self.loaded, self.where = loaded, loaded.where
        self.shared: dict[str, torch.Tensor] = {}
        """Initializer name → the Parameter/buffer every module holding it exactly shares."""
        self.attr_of: dict[str, str] = {}
        """Constant name → attribute path of the registered tensor."""
        self.used_weights: set[str] = set()

    def build(self) -> OnnxModule:
        model = self.loaded.model
        graph = self._graph(model)
        norms = recognize_norms(graph)
        linears = recognize_linears(graph)
        notes = [f"{linears} linear layer(s) and {norms} norm(s) recognized", *graph.notes, *_unrecognized_norms(graph)]

        taken: set[str] = set()
        specs = tuple(_input_spec(vi, _identifier(vi.name, taken), self.where)
                      for vi in model.graph.input if vi.name not in graph.consts)
        cls = type("OnnxModule", (OnnxModule,), {"forward": _forward_for([s.arg_name for s in specs]),
                                                  "__module__": OnnxModule.__module__,
                                                  "__doc__": OnnxModule.__doc__})
        root = cls()
        root.input_specs = specs
        root.output_names = tuple(graph.outputs)
        root.source = self.where
        root.import_notes = notes
        root._vocab = _vocabularies(graph, [s.onnx_name for s in specs])
        root._steps, root._outputs, root._weightless = [], (), b""
        self.tree = _Tree(root)
        self.graph = graph
        self.layers = {id(n): self._linear(n) if n.op_type == LINEAR else self._norm(n)
                       for n in graph.nodes if n.op_type in (LINEAR, LAYER_NORM, RMS_NORM)}  # before other tensors
        steps = [self._step(node) for node in graph.nodes]
        outputs = tuple(self._ref(name) for name in graph.outputs)
        _mark_free(steps, outputs)
        root._steps = steps
        root._outputs = outputs
        stripped = {w for name in self.used_weights for w in graph.deps.get(name, {name})} & graph.initializers
        root._weightless = weightless_copy(model, stripped | set(self.loaded.stripped)).SerializeToString()
        if len(notes) > 1:
            warnings.warn(f"{self.where}: {'; '.join(notes[1:])}", stacklevel=3)
        return root

    def _graph(self, model: onnx.ModelProto) -> Graph:
        consts: dict[str, torch.Tensor] = {}
        origins: dict[str, Origin] = {}
        for init in model.graph.initializer:
            consts[init.name] = tensor_from_proto(init, self.where)
            origins[init.name] = Origin(init.name)
        for name, (dtype, shape) in self.loaded.stripped.items():
            consts[name] = torch.empty(shape, dtype=dtype, device="meta")
            origins[name] = Origin(name)
        initializers = set(consts)
        nodes = []
        for n in model.graph.node:
            if n.op_type == "Constant" and n.domain in DEFAULT_DOMAINS:
                consts[n.output[0]] = constant_value(n, self.where, tensor_from_proto)
                continue
            attrs = attribute_values(n, self.where, tensor_from_proto)
            if n.op_type in MULTI_OUTPUT:
                attrs["_outputs"] = len(n.output)
            if n.op_type == "ConstantOfShape" and "value" in attrs:  # a Python value: no tensor op at trace time
                attrs["value"] = host_from_tensor(attrs["value"].reshape(-1)[:1].reshape(()))
            nodes.append(Node(n.op_type, n.name, list(n.input), list(n.output), attrs, node_scope(n)))
        deps: dict[str, set[str]] = {name: {name} for name in initializers}
        runtime = fold_constants(nodes, consts, origins, self.where, self.loaded.opset, deps)
        return Graph([i.name for i in model.graph.input if i.name not in consts], [o.name for o in model.graph.output],
                      runtime, consts, origins, initializers, self.loaded.opset, deps=deps)

    # ------------------------------------------------------------------ constants
    def _tensor_attr(self, name: str) -> str:
        """Register constant ``name`` (a Parameter if floating, else a buffer) once; its attribute path."""
        if name in self.attr_of:
            return self.attr_of[name]
        t = self.graph.consts[name]
        value = self._shared(name, t)
        path = name if name in self.graph.initializers and is_module_path(name) else f"onnx_constants.{_flat(name)}"
        attr = path if self.tree.holds(path, value) else self.tree.place(path, value, f"onnx_constants.{_flat(name)}")
        self.attr_of[name] = attr
        self.used_weights.add(name)
        return attr

    def _shared(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """The one Parameter (floating) or buffer tensor standing for initializer/constant ``name``."""
        if name not in self.shared:
            self.shared[name] = nn.Parameter(t, requires_grad=False) if t.is_floating_point() else t
        return self.shared[name]

    def _exact(self, name: str, transposed: bool) -> torch.Tensor | None:
        """The shared tensor of the initializer constant ``name`` is a relayout of, when
        transposing ``name`` (or not) gives that initializer exactly."""
        origin = self.graph.origins.get(name)
        if origin is None or origin.transposed != transposed:
            return None
        self.used_weights.add(origin.name)
        return self._shared(origin.name, self.graph.consts[origin.name])

    def _ref(self, name: str) -> tuple:
        if not name:
            return ("none",)
        if name not in self.graph.consts:
            return ("env", name)
        small = host_from_tensor(self.graph.consts[name])
        return ("value", small) if small is not None else ("attr", self._tensor_attr(name))

    # ------------------------------------------------------------------ steps
    def _step(self, node: Node) -> _Step:
        label = node.describe(self.loaded.opset)
        path = self.layers.get(id(node))
        if path is None:
            return _Step(node.op_type, None, tuple(self._ref(i) for i in node.inputs), tuple(node.outputs), node.attrs, label)
        return _Step(node.op_type, path, (self._ref(node.inputs[0]),), tuple(node.outputs), {}, label)

    def _linear(self, node: Node) -> str:
        a = node.attrs
        w = self.graph.consts[a["weight"]]
        weight = self._exact(a["weight"], a["transposed"]) if a["alpha"] == 1.0 else None
        if weight is None:
            self.used_weights.add(a["weight"])
            t = w.t() if a["transposed"] else w
            weight = nn.Parameter((t * a["alpha"] if a["alpha"] != 1.0 else t).contiguous(), requires_grad=False)
        bias = None
        if a["bias"] is not None:
            b = self.graph.consts[a["bias"]]
            bias = self._exact(a["bias"], False) if a["beta"] == 1.0 and b.dim() == 1 else None
            if bias is None:
                self.used_weights.add(a["bias"])
                b = b.reshape(-1)
                bias = nn.Parameter((b * a["beta"] if a["beta"] != 1.0 else b).contiguous(), requires_grad=False)
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype)
        linear.weight = weight
        if bias is not None:
            linear.bias = bias
        fallback = f"onnx_layers.{_flat(node.name or a['weight'])}"
        return self.tree.place(layer_path(node, self.graph, "weight", "bias", fallback), linear, fallback)

    def _norm(self, node: Node) -> str:
        a = node.attrs
        weight = self._norm_tensor(a["weight"])
        bias = self._norm_tensor(a.get("bias"))
        if node.op_type == LAYER_NORM:
            module: nn.Module = OnnxLayerNorm(weight, bias, a["epsilon"])
        else:
            cast_to = ONNX_DTYPES.get(a["cast_to"]) if a.get("cast_to") is not None else None
            module = OnnxRMSNorm(weight, a["epsilon"], a["stash"], cast_to)
        fallback = f"onnx_norms.{_flat(node.name or a['weight'] or 'norm')}"
        return self.tree.place(layer_path(node, self.graph, "weight", "bias", fallback), module, fallback)

    def _norm_tensor(self, name: str | None) -> nn.Parameter | None:
        if name is None:
            return None
        exact = self._exact(name, False)
        if isinstance(exact, nn.Parameter):
            return exact
        self.used_weights.add(name)
        return nn.Parameter(self.graph.consts[name].contiguous(), requires_grad=False)


def _build(loaded: LoadedOnnx) -> OnnxModule:
    return _Builder(loaded).build()


def _flat(name: str) -> str:
    return clean_path(name).replace(".", "_")


def _mark_free(steps: list[_Step], outputs: tuple) -> None:
    """Each runtime value is dropped after its last use (graph outputs are kept)."""
    keep = {ref[1] for ref in outputs if ref[0] == "env"}
    last: dict[str, int] = {}
    for i, step in enumerate(steps):
        for ref in step.inputs:
            if ref[0] == "env":
                last[ref[1]] = i
    frees: dict[int, list[str]] = {}
    for name, i in last.items():
        if name not in keep:
            frees.setdefault(i, []).append(name)
    for i, step in enumerate(steps):
        step.free = tuple(frees.get(i, ()))


def _vocabularies(graph: Graph, inputs: list[str]) -> dict[str, int]:
    """Per integer input, the rows of the constant table a ``Gather`` looks it up in (token ids)."""
    casts = {n.outputs[0]: n.inputs[0] for n in graph.nodes if n.op_type == "Cast"}
    out: dict[str, int] = {}
    for n in graph.nodes:
        if n.op_type == "Gather" and n.inputs[0] in graph.consts and n.attrs.get("axis", 0) == 0:
            idx = casts.get(n.inputs[1], n.inputs[1])
            table = graph.consts[n.inputs[0]]
            if idx in inputs and table.dim() == 2 and table.is_floating_point():
                out[idx] = max(out.get(idx, 0), int(table.shape[0]))
    return out


def _unrecognized_norms(graph: Graph) -> list[str]:
    """Norm-like ``Sqrt(ReduceMean(...) + eps)`` left in the graph: a fast path not taken."""
    producer = {o: n for n in graph.nodes for o in n.outputs}
    notes = []
    for n in graph.nodes:
        if n.op_type != "Sqrt":
            continue
        add = producer.get(n.inputs[0])
        if add is not None and add.op_type == "Add" and any(
                producer.get(i) is not None and producer[i].op_type == "ReduceMean" for i in add.inputs):
            notes.append(f"{n.describe(graph.opset)} computes a norm the importer did not recognize: it runs as "
                         "plain ops (not a norm op for the passes)")
    return notes

