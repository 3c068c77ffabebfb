"""A compiled transformers model in the compressed-tensors layout: ``model.safetensors`` with
compressed-tensors' tensor names and packing, and the ``quantization_config`` (``quant_method:
"compressed-tensors"``) that describes it, so a transformers or vLLM user can read the artifact.

Written from the lowered graph's stored tensors: codes and scales are repacked, never
re-quantized. What maps (``docs/artifacts.md``): int4/int8 weights per group or channel,
symmetric or asymmetric (``pack-quantized``; ``int-quantized`` for int8 weights with int8
activations), fp8 e4m3 weights (``float-quantized``), NVFP4 weights (``nvfp4-pack-quantized``),
dynamic per-token int8/int4/fp8 activations. Anything else raises :class:`UnmappableError` naming
the layer and the reason.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from qcompile.codegen.op_schema import QuantizedLinearCall, is_quantized_linear
from qcompile.formats import QuantSpec
from qcompile.formats.packing import unpack_bits
from qcompile.formats.spec import PER_CHANNEL
from qcompile.ir.annotations import decided_nodes
from qcompile.ir.graph import get_attr, module_path

ONLINE_OPS = ("hadamard_transform", "channel_scale", "zero_columns", "outlier_columns", "sparse_residual",
              "activation_residual")
"""qcompile ops a transformers model does not run between its modules (online rotations,
unfolded smoothing scales, outlier splits): a graph holding one has no compressed-tensors equivalent."""


class UnmappableError(ValueError):
    """The compiled model has something compressed-tensors cannot describe; the message names it."""


@dataclass
class CompressedTensorsLayout:
    """``quantization_config`` (for ``config.json``) and the tensors of ``model.safetensors``."""

    quantization_config: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def _format_for(weight: QuantSpec, activation: QuantSpec | None) -> str:
    if weight.format == "nvfp4":
        return "nvfp4-pack-quantized"
    if weight.format == "fp8_e4m3":
        return "float-quantized"
    if weight.format == "int8" and activation is not None and activation.format == "int8":
        return "int-quantized"
    return "pack-quantized"


def _weight_args(spec: QuantSpec) -> dict[str, Any]:
    if spec.format == "nvfp4":
        return {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16, "strategy": "tensor_group",
                "dynamic": False}
    if spec.format not in ("int4", "int8", "fp8_e4m3"):
        raise UnmappableError(f"{spec.short()} weights: compressed-tensors describes int4/int8, fp8_e4m3 and nvfp4 "
                              "weights (mxfp4's scale convention differs from OCP's e8m0 codes; others have no format)")
    group = spec.group_size != PER_CHANNEL
    return {"num_bits": spec.bits, "type": "int" if spec.format.startswith("int") else "float",
            "symmetric": spec.symmetric, "group_size": spec.group_size if group else None,
            "strategy": "group" if group else "channel", "dynamic": False}


def _activation_args(spec: QuantSpec | None) -> dict[str, Any] | None:
    if spec is None:
        return None
    if not spec.dynamic:
        raise UnmappableError(f"{spec.short()} activations are static: compressed-tensors would need the "
                              "calibrated input scales, which qcompile does not store")
    if spec.format not in ("int8", "int4", "fp8_e4m3") or spec.group_size != PER_CHANNEL or not spec.symmetric:
        raise UnmappableError(f"{spec.encode()} activations: compressed-tensors describes dynamic symmetric "
                              "per-token int8/int4/fp8_e4m3 (nvfp4 activations need a calibrated global scale)")
    return {"num_bits": spec.bits, "type": "int" if spec.format.startswith("int") else "float", "symmetric": True,
            "group_size": None, "strategy": "token", "dynamic": True}


def scheme_for(weight: QuantSpec, activation: QuantSpec | None) -> dict[str, Any]:
    """The compressed-tensors scheme (``format``, ``weights``, ``input_activations``) of a
    layer quantized to ``weight`` with ``activation``; :class:`UnmappableError` if there is none."""
    return {"format": _format_for(weight, activation), "weights": _weight_args(weight),
            "input_activations": _activation_args(activation)}


def recipe_unmappable_reason(recipe: Any) -> str | None:
    """Why a model compiled with ``recipe`` (a :class:`~qcompile.Recipe`) cannot be written in
    the compressed-tensors layout, known before compiling; ``None`` if it may be."""
    if recipe.weight is None:
        return f"recipe {recipe.name} quantizes nothing: save the model itself"
    try:
        scheme_for(recipe.weight, recipe.activation)
    except UnmappableError as e:
        return f"recipe {recipe.name}: {e}"
    if "rotate_online" in recipe.passes:
        return (f"recipe {recipe.name} inserts online Hadamard transforms, which a transformers model does "
                "not run (compressed-tensors' transform configs are not written)")
    return None


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned ``codes`` ``[rows, n]`` → compressed-tensors' ``int32 [rows, ceil(n / (32 / bits))]``,
    element ``j`` of each word at bits ``bits * j`` (zero codes pad the last word)."""
    per_word = 32 // bits
    rows, n = codes.shape
    pad = (-n) % per_word
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, pad)).reshape(rows, -1, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = (c << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _codes(call: QuantizedLinearCall) -> torch.Tensor:
    """The unsigned integer codes ``[rows, K]`` of an int weight (padding dropped): the
    symmetric ones offset by ``2**(bits-1)``, as compressed-tensors packs them."""
    spec, k = call.weight_spec, call.in_features
    if spec.bits == 8:
        data = call.qdata[:, :k]
        return (data.to(torch.int16) + 128).to(torch.uint8) if data.dtype == torch.int8 else data
    return unpack_bits(call.qdata, spec.bits, call.scale.shape[1] * (spec.group_size or k))[:, :k]


def layer_tensors(path: str, call: QuantizedLinearCall, fmt: str) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one quantized linear (``call`` resolved to tensors)."""
    spec, rows, k = call.weight_spec, call.out_features, call.in_features
    out: dict[str, torch.Tensor] = {}
    if spec.format == "nvfp4":
        if k % 16:
            raise UnmappableError(f"layer {path}: nvfp4 needs in_features divisible by 16, got {k}")
        out[f"{path}.weight_packed"] = call.qdata[:, : k // 2].clone()
        out[f"{path}.weight_scale"] = call.scale.clone()
        # compressed-tensors divides by its global scale; qcompile multiplies by its own
        out[f"{path}.weight_global_scale"] = (1.0 / call.global_scale.float()).reshape(1)
        return out
    if spec.group_size != PER_CHANNEL and k % spec.group_size:
        raise UnmappableError(f"layer {path}: in_features {k} is not a multiple of the group size {spec.group_size} "
                              "(qcompile pads the last group; compressed-tensors expects whole groups)")
    out[f"{path}.weight_scale"] = call.scale.clone()
    if spec.format == "fp8_e4m3":
        out[f"{path}.weight"] = call.qdata[:, :k].clone()
        return out
    codes = _codes(call)
    offset = 2 ** (spec.bits - 1)
    zero = None if call.zero is None else call.zero.to(torch.int16)
    if fmt == "int-quantized":
        out[f"{path}.weight"] = (codes.to(torch.int16) - offset).to(torch.int8)
        if zero is not None:
            out[f"{path}.weight_zero_point"] = (zero - offset).to(torch.int8)
        return out
    out[f"{path}.weight_packed"] = pack_int32(codes, spec.bits)
    out[f"{path}.weight_shape"] = torch.tensor([rows, k], dtype=torch.int64)
    if zero is not None:
        out[f"{path}.weight_zero_point"] = pack_int32(zero.to(torch.uint8).t().contiguous(), spec.bits).t().contiguous()
    return out


def _online_ops(gm: fx.GraphModule) -> Iterable[fx.Node]:
    for node in gm.graph.nodes:
        name = getattr(node.target, "__name__", str(node.target))
        if node.op == "call_function" and any(op in name for op in ONLINE_OPS):
            yield node


def to_compressed_tensors(gm: fx.GraphModule, hf: dict[str, Any]) -> CompressedTensorsLayout:
    """The compressed-tensors layout of the lowered ``gm`` of the transformers model ``hf``
    (``CompiledModel.manifest["transformers"]``). Every tensor of the transformers model must be
    found: a quantized linear's packed weight, or a graph tensor under the same name and shape."""
    from qcompile.models import build_from_config

    for node in _online_ops(gm):
        raise UnmappableError(f"layer {module_path(node) or node.name}: the graph runs {node.target} online, "
                              "which a transformers model does not")
    skeleton = build_from_config(hf["class"], hf["config"], hf["init_kwargs"], "the model's config")
    modules = dict(skeleton.named_modules())
    hf_state = skeleton.state_dict()
    graph_state = {**dict(gm.named_buffers()), **gm.state_dict()}
    tensors: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    groups: dict[str, dict[str, Any]] = {}
    ignore: list[str] = []
    for node, _ in decided_nodes(gm):
        path = module_path(node)
        if not isinstance(modules.get(path), torch.nn.Linear):
            raise UnmappableError(f"layer {path}: {hf['class']} has no nn.Linear there "
                                  f"({type(modules.get(path)).__name__}); compressed-tensors quantizes Linear modules")
        if not is_quantized_linear(node):
            ignore.append(path)
            continue
        call = QuantizedLinearCall.from_node(node)
        used.update(t for t in call.tensor_targets().values() if t is not None)
        call = call.resolve(gm)
        try:
            scheme = scheme_for(call.weight_spec, call.act_spec)
        except UnmappableError as e:
            raise UnmappableError(f"layer {path}: {e}") from None
        if (call.out_features, call.in_features) != tuple(modules[path].weight.shape):
            raise UnmappableError(f"layer {path}: quantized weight {call.out_features}x{call.in_features} does not fit "
                                  f"{hf['class']}'s {list(modules[path].weight.shape)}")
        tensors.update(layer_tensors(path, call, scheme["format"]))
        bias_name = f"{path}.bias"
        if (call.bias is None) != (bias_name not in hf_state):
            raise UnmappableError(f"layer {path}: the graph's bias does not correspond to {bias_name}")
        if call.bias is not None:
            tensors[bias_name] = get_attr(gm, call.bias.target).detach().clone()
            used.add(call.bias.target)
        key = repr(sorted(scheme.items(), key=lambda kv: kv[0]))
        groups.setdefault(key, {"scheme": scheme, "targets": []})["targets"].append(path)
    quantized = {t for g in groups.values() for t in g["targets"]}
    tied: dict[int, list[str]] = {}  # tied parameters (embeddings and LM head): one graph tensor, several names
    for name, ref in hf_state.items():
        tied.setdefault(ref.data_ptr(), []).append(name)
    for name, ref in hf_state.items():
        owner = name.rpartition(".")[0]
        if owner in quantized and name.endswith((".weight", ".bias")):
            continue
        t = next((graph_state[a] for a in [name, *tied[ref.data_ptr()]] if a in graph_state), None)
        if t is None or tuple(t.shape) != tuple(ref.shape):
            raise UnmappableError(f"tensor {name} of {hf['class']}: the compiled graph has no tensor of that name and "
                                  f"shape {list(ref.shape)} (a pass rewrote it)")
        tensors[name] = t.detach().clone()
        used.update(a for a in [name, *tied[ref.data_ptr()]] if a in graph_state)
    non_persistent = set(dict(gm.named_buffers())) - set(gm.state_dict())
    extra = sorted(set(gm.state_dict()) - used - non_persistent)
    if extra:
        raise UnmappableError(f"tensor {extra[0]} of the compiled graph has no place in {hf['class']} "
                              f"({len(extra)} such tensors)")
    return CompressedTensorsLayout(_quantization_config(groups, ignore), {k: v.contiguous() for k, v in tensors.items()})


def _quantization_config(groups: dict[str, dict[str, Any]], ignore: list[str]) -> dict[str, Any]:
    formats = {g["scheme"]["format"] for g in groups.values()}
    config_groups = {}
    for i, group in enumerate(groups.values()):
        scheme = group["scheme"]
        entry = {"targets": ["Linear"] if len(groups) == 1 else sorted(group["targets"]),
                 "weights": scheme["weights"], "input_activations": scheme["input_activations"],
                 "output_activations": None}
        if len(formats) > 1:
            entry["format"] = scheme["format"]
        config_groups[f"group_{i}"] = entry
    return {"quant_method": "compressed-tensors", "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed", "config_groups": config_groups, "ignore": sorted(ignore),
            "kv_cache_scheme": None}
