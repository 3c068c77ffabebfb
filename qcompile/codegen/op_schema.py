"""The schema of ``qcompile::quantized_linear``: the one place that knows its arguments.

Lowering builds a :class:`QuantizedLinearCall` and calls :meth:`~QuantizedLinearCall.op_args`;
the op, its fake kernel, the artifact, the report and the ONNX exporter read a node or an
argument tuple back with :meth:`~QuantizedLinearCall.from_node` /
:meth:`~QuantizedLinearCall.from_op_args`. Specs travel whole, as ``QuantSpec.encode()`` text
(format, group, symmetry, scale dtype, dynamic), so nothing is lost between recipe and kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import fx

from qcompile.formats import QuantizedTensor, QuantSpec

OP_NAMESPACE = "qcompile"
OP_NAME = "quantized_linear"

_TYPES = {  # field -> schema type; the field order of QuantizedLinearCall is the op's argument order
    "x": "Tensor", "qdata": "Tensor", "scale": "Tensor", "zero": "Tensor?", "global_scale": "Tensor?",
    "bias": "Tensor?", "weight_spec": "str", "in_features": "int", "act_spec": "str",
    "residual": "Tensor?", "epilogue": "str",
}
_DEFAULTS = {"residual": "None", "epilogue": '"none"'}
EPILOGUES = ("none", "silu_mul")
"""What the kernel computes after ``x · Wᵀ + bias``: nothing, or ``silu(y[..., :N/2]) · y[..., N/2:]`` on a
merged gate/up weight (``passes/fusion.py``); ``residual`` is added after it."""
TENSOR_FIELDS = ("qdata", "scale", "zero", "global_scale")
"""The packed weight's tensors, as QuantizedTensor names them (``qdata`` is its ``data``)."""


@dataclass(frozen=True)
class QuantizedLinearCall:
    """``y = epilogue(act_quant(x) @ dequant(W)ᵀ + bias) + residual`` with ``W`` stored as packed tensors.

    Tensor fields hold tensors (a call at run time) or fx nodes (a call in a graph).
    ``act_spec`` ``None`` means 16-bit activations (weight-only). ``residual`` and ``epilogue``
    (:data:`EPILOGUES`) are written by the fusion passes of execution graphs only; compiled graphs,
    artifacts and the ONNX exporter see plain calls.
    """

    x: Any
    qdata: Any
    scale: Any
    zero: Any
    global_scale: Any
    bias: Any
    weight_spec: QuantSpec
    in_features: int
    act_spec: QuantSpec | None
    residual: Any = None
    epilogue: str = "none"

    def __post_init__(self) -> None:
        if self.epilogue not in EPILOGUES:
            raise ValueError(f"{OP_NAMESPACE}::{OP_NAME}: epilogue must be one of {EPILOGUES}, got {self.epilogue!r}")

    @staticmethod
    def schema() -> str:
        args = ", ".join(f"{_TYPES[f.name]} {f.name}" + (f"={_DEFAULTS[f.name]}" if f.name in _DEFAULTS else "")
                         for f in fields(QuantizedLinearCall))
        return f"({args}) -> Tensor"

    def op_args(self) -> tuple:
        """The positional arguments of the op, specs encoded."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["weight_spec"] = self.weight_spec.encode()
        values["act_spec"] = self.act_spec.encode() if self.act_spec is not None else ""
        return tuple(values.values())

    @classmethod
    def from_op_args(cls, args: tuple | list) -> QuantizedLinearCall:
        names = [f.name for f in fields(cls)]
        if not len(names) - 2 <= len(args) <= len(names):
            raise ValueError(f"{OP_NAMESPACE}::{OP_NAME} takes {len(names) - 2} to {len(names)} arguments "
                             f"({', '.join(names)}), got {len(args)}")
        values = dict(zip(names, args))
        values["weight_spec"] = QuantSpec.parse(values["weight_spec"])
        values["act_spec"] = QuantSpec.parse(values["act_spec"]) if values["act_spec"] else None
        return cls(**values)

    @classmethod
    def from_node(cls, node: fx.Node) -> QuantizedLinearCall:
        if not is_quantized_linear(node):
            raise ValueError(f"node {node.name} is not a {OP_NAMESPACE}::{OP_NAME} call (target {node.target})")
        return cls.from_op_args(node.args)

    @property
    def out_features(self) -> int:
        """Rows of the weight (``N``)."""
        return self.scale.shape[0]

    @property
    def output_features(self) -> int:
        """The last dimension of the result: ``N``, or ``N / 2`` after the ``silu_mul`` epilogue."""
        return self.out_features // 2 if self.epilogue == "silu_mul" else self.out_features

    def tensor_targets(self) -> dict[str, str | None]:
        """For a call in a graph: the attribute names holding the packed tensors."""
        return {k: getattr(self, k).target if getattr(self, k) is not None else None for k in TENSOR_FIELDS}

    def resolve(self, gm: fx.GraphModule) -> QuantizedLinearCall:
        """For a call in a graph: the same call with the packed tensors read from ``gm``."""
        from qcompile.ir.graph import get_attr

        return replace(self, **{k: get_attr(gm, t) if t is not None else None
                                for k, t in self.tensor_targets().items()})

    def quantized_weight(self) -> QuantizedTensor:
        """The packed weight as a QuantizedTensor (tensor fields must hold tensors)."""
        return QuantizedTensor(self.weight_spec, (self.scale.shape[0], self.in_features), self.qdata, self.scale,
                               self.zero, self.global_scale)

    @classmethod
    def for_weight(cls, x: Any, weight: QuantizedTensor, tensors: dict[str, Any], bias: Any,
                   act_spec: QuantSpec | None) -> QuantizedLinearCall:
        """A call of ``weight`` whose packed tensors are ``tensors`` (keyed as ``weight.tensors()``)."""
        return cls(x, tensors["data"], tensors["scale"], tensors.get("zero"), tensors.get("global_scale"), bias,
                   weight.spec, weight.shape[1], act_spec)


def quantized_linear_overload() -> torch._ops.OpOverload:
    import qcompile.codegen.quantized_linear  # noqa: F401  (defines the op)

    return getattr(getattr(torch.ops, OP_NAMESPACE), OP_NAME).default


def is_quantized_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target == quantized_linear_overload()


def quantized_linear_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if is_quantized_linear(n)]
