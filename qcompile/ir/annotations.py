"""The two per-linear annotations every pass, backend and report goes through.

- A :class:`LayerDecision` says what a linear *should* become: weight spec (``None`` keeps it
  float), activation spec, and ``extras`` for what later passes add (kept outlier channels, an
  online rotation, ...). ``assign_quant_specs`` writes one on every linear from the recipe and the
  overrides; later passes (mixed precision, outlier splitting, a researcher's pass) rewrite it.
  Nothing below the decision (quantizers, kernels) reads the recipe.
- A :class:`LayerResult` says what it *became*: the quantized tensor, the activation spec, the
  method that produced it and the epilogue. Weight quantizers (RTN, GPTQ, AWQ) write it from the
  decision; fusion, lowering, ONNX export and the report read it.

Both live in ``node.meta`` under :data:`DECISION` and :data:`RESULT`, and survive lowering (the
lowered op node keeps them), so whatever comes after lowering can still ask what was decided.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from torch import fx

from qcompile.formats import QuantizedTensor, QuantSpec

DECISION = "qcompile.decision"
"""``node.meta`` key of a linear's :class:`LayerDecision`."""
RESULT = "qcompile.result"
"""``node.meta`` key of a linear's :class:`LayerResult`."""


@dataclass(frozen=True)
class LayerDecision:
    """What one linear should become.

    ``weight``: the weight spec, or ``None`` to keep the layer in float (``reason`` says why).
    ``activation``: the activation spec (``None``: 16-bit activations, weight-only).
    ``extras``: JSON-serializable choices of later passes, saved in artifacts and restored at load.
    ``source``: who decided (``recipe``, ``override <pattern>``, ``exclude <pattern>``, or a pass name).
    """

    weight: QuantSpec | None
    activation: QuantSpec | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    source: str = "recipe"
    reason: str = ""

    def __post_init__(self) -> None:
        try:
            json.dumps(self.extras)
        except TypeError as e:
            raise TypeError(f"LayerDecision.extras must be JSON-serializable (it is saved in artifacts): {e}") from e

    @property
    def quantized(self) -> bool:
        """True when the layer gets a quantized weight (``weight`` is not None)."""
        return self.weight is not None

    def replace(self, **changes: Any) -> LayerDecision:
        """A copy with ``changes`` applied (decisions are immutable: a pass writes a new one)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (specs as ``QuantSpec.encode()`` text), as artifacts store it."""
        return {
            "weight": self.weight.encode() if self.weight is not None else None,
            "activation": self.activation.encode() if self.activation is not None else None,
            "extras": self.extras, "source": self.source, "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerDecision:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` for a spec that does not parse."""
        return cls(
            weight=QuantSpec.parse(d["weight"]) if d.get("weight") is not None else None,
            activation=QuantSpec.parse(d["activation"]) if d.get("activation") is not None else None,
            extras=dict(d.get("extras") or {}), source=d.get("source", "recipe"), reason=d.get("reason", ""),
        )


@dataclass
class LayerResult:
    """What one linear became.

    ``weight``: the quantized weight in the canonical layout (formats library). Lowering moves its
    tensors into the graph and leaves ``None`` here (so moving the model to a device leaves no
    stale copy behind): read them back with ``QuantizedLinearCall.from_node(node).resolve(gm)``.
    ``activation``: the activation spec the op applies at run time (``None``: weight-only).
    ``method``: how the weight was made (``rtn``, ``gptq``, ...; kept across save and load).
    ``epilogue``: what the kernel fuses after the GEMM (``none`` until fusion passes exist).
    ``float_dtype``: the dtype of the float weight it replaced (for the report's sizes).
    ``metrics``: measured errors (``weight_rel_error``, ``output_rel_error``) for the report.
    """

    weight: QuantizedTensor | None
    activation: QuantSpec | None
    method: str
    epilogue: str = "none"
    float_dtype: str = "torch.float32"
    metrics: dict[str, float | None] = field(default_factory=dict)


def decision_of(node: fx.Node) -> LayerDecision | None:
    return node.meta.get(DECISION)


def set_decision(node: fx.Node, decision: LayerDecision) -> None:
    if not isinstance(decision, LayerDecision):
        raise TypeError(f"node {node.name}: expected a LayerDecision, got {type(decision).__name__}")
    node.meta[DECISION] = decision


def result_of(node: fx.Node) -> LayerResult | None:
    return node.meta.get(RESULT)


def set_result(node: fx.Node, result: LayerResult) -> None:
    if not isinstance(result, LayerResult):
        raise TypeError(f"node {node.name}: expected a LayerResult, got {type(result).__name__}")
    node.meta[RESULT] = result


def decided_nodes(gm: fx.GraphModule) -> list[tuple[fx.Node, LayerDecision]]:
    """Every node carrying a decision, in graph order (float linears and lowered ops alike)."""
    return [(n, n.meta[DECISION]) for n in gm.graph.nodes if DECISION in n.meta]
