"""What one layer can become under mixed precision: :class:`PrecisionOption` and the default list.

An option is a weight spec (``None``: the layer stays 16-bit), an activation spec, the weight
quantizer's method and ``extras``: a JSON dict for what other passes add to a layer. Outlier
splitting, for example, contributes options with ``extras["outlier_split"] = {"method":
"llm_int8" | "sparse" | "residual_channels", ...}``; it registers how such an option changes a
layer's bytes, time and output with :func:`register_extras` (``mixed_precision_cost`` and
``sensitivity`` ask the registry), and the chosen option's extras are written into the layer's
``LayerDecision.extras`` for the pass that implements them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from qcompile.formats import QuantSpec

FLOAT_NAMES = ("16-bit", "float", "bf16", "fp16")
"""Candidate names that mean "keep this layer in 16-bit" (as does ``None``)."""

DEFAULT_WEIGHTS = ("int8", "int4-g128-asym", "int4-g64-asym", "int4-g32-asym", "int3-g64-asym", "int3-g32-asym",
                   "int2-g32-asym", None)
"""The default candidates' weight specs: int8 per channel, int4 at groups 128/64/32, int3 at 64/32
and int2 at 32 (asymmetric: their zero points lower the error more than they cost at these group
sizes), and 16-bit."""

METHODS = ("rtn", "gptq", "awq", "rtn-clip")
"""The methods of the built-in pipelines (``awq``: AWQ's scales, then RTN; ``rtn-clip``: clip
search). An option's method must be its pipeline's (the pass checks, naming both)."""


@dataclass(frozen=True)
class PrecisionOption:
    """One choice for one layer.

    ``weight``: the weight spec, ``None`` for 16-bit. ``activation``: the activation spec
    (``None``: 16-bit activations). ``method``: the quantizer that makes the weight (``rtn``,
    ``gptq``, ``awq``, ``rtn-clip``: the pipeline's own). ``extras``: JSON-serializable additions, written to the
    decision's ``extras`` when the option is chosen; a key registered with :func:`register_extras`
    also changes the option's bytes, time and measured error.
    """

    weight: QuantSpec | None
    activation: QuantSpec | None = None
    method: str = "rtn"
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or not self.method:
            raise ValueError(f"option method must be a quantizer's method name ({', '.join(METHODS)}, ...), "
                             f"got {self.method!r}")
        if self.weight is None and self.activation is not None:
            raise ValueError(f"a 16-bit option takes no activation spec (got {self.activation.short()})")

    @property
    def name(self) -> str:
        """Short text: ``int4-g32-asym``, ``int8-pc+a:int8-pc-dynamic``, ``16-bit``, ``… [outlier_split]``."""
        text = "16-bit" if self.weight is None else self.weight.short()
        if self.activation is not None:
            text += f"+a:{self.activation.encode()}"
        if self.weight is not None and self.method != "rtn":
            text += f" ({self.method})"
        if self.extras:
            text += " [" + ",".join(sorted(self.extras)) + "]"
        return text

    @property
    def nominal_bits(self) -> float:
        """Bits per stored code (16 for a 16-bit layer): for sorting and plots, not budgets."""
        return 16.0 if self.weight is None else float(self.weight.bits)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (specs as ``QuantSpec.encode()`` text), as the manifest records pass options."""
        return {"weight": self.weight.encode() if self.weight is not None else None,
                "activation": self.activation.encode() if self.activation is not None else None,
                "method": self.method, "extras": dict(self.extras)}


ExtrasBytes = Callable[[PrecisionOption, int, int], int]
"""``(option, rows, k) -> extra bytes`` the extras add to the layer (sparse residuals, kept channels)."""
ExtrasSeconds = Callable[[PrecisionOption, int, int, int, Any], float]
"""``(option, rows, k, tokens, target) -> extra seconds`` per call (a 16-bit GEMM on outlier columns)."""
ExtrasForward = Callable[[torch.Tensor, Any, PrecisionOption], Callable[[torch.Tensor], torch.Tensor]]
"""``(float weight [N, K], the layer's ActivationStats or None, option) -> (x ↦ x Ŵᵀ)``: the
layer's approximate product without bias (the sensitivity measurement runs it)."""


@dataclass(frozen=True)
class ExtrasHandler:
    """How an ``extras`` key changes an option's bytes, time and product (see :func:`register_extras`)."""

    nbytes: ExtrasBytes
    seconds: ExtrasSeconds | None = None
    forward: ExtrasForward | None = None


EXTRAS: dict[str, ExtrasHandler] = {}
"""Registered ``extras`` keys (outlier splitting registers ``outlier_split``)."""


def register_extras(key: str, nbytes: ExtrasBytes, seconds: ExtrasSeconds | None = None,
                    forward: ExtrasForward | None = None) -> None:
    """Teach mixed precision what options carrying ``extras[key]`` cost and compute: ``nbytes``
    adds to the option's bytes, ``seconds`` to its time, ``forward`` replaces its product when its
    sensitivity is measured. An option with an unregistered key is an error naming the key."""
    EXTRAS[key] = ExtrasHandler(nbytes, seconds, forward)


def handlers_for(option: PrecisionOption) -> list[ExtrasHandler]:
    """The handlers of the option's extras keys; ``ValueError`` naming a key nothing registered."""
    missing = [k for k in option.extras if k not in EXTRAS]
    if missing:
        raise ValueError(f"option {option.name}: no handler registered for extras key(s) {missing} "
                         f"(registered: {sorted(EXTRAS) or 'none'}); see mixed_precision_options.register_extras")
    return [EXTRAS[k] for k in option.extras]


def _spec(value: Any, what: str) -> QuantSpec | None:
    if value is None or (isinstance(value, str) and value in FLOAT_NAMES):
        return None
    if isinstance(value, QuantSpec):
        return value
    try:
        return QuantSpec.parse(value)
    except ValueError as e:
        raise ValueError(f"mixed-precision candidate {what} {value!r}: {e}") from None


def parse_option(value: Any, activation: QuantSpec | None = None, method: str = "rtn") -> PrecisionOption:
    """A :class:`PrecisionOption` from a spec string (``"int4-g32-asym"``; ``None`` or ``"16-bit"``
    keeps the layer 16-bit), a dict (``{"weight": ..., "activation": ..., "method": ...,
    "extras": {...}}``) or an option. Missing fields take ``activation`` and ``method``."""
    if isinstance(value, PrecisionOption):
        return value
    if isinstance(value, Mapping):
        unknown = set(value) - {"weight", "activation", "method", "extras"}
        if unknown:
            raise ValueError(f"mixed-precision candidate {dict(value)}: unknown keys {sorted(unknown)} "
                             "(expected weight, activation, method, extras)")
        weight = _spec(value.get("weight"), "weight")
        act = _spec(value["activation"], "activation") if "activation" in value else activation
        return PrecisionOption(weight, act if weight is not None else None, value.get("method", method),
                               dict(value.get("extras") or {}))
    weight = _spec(value, "weight")
    return PrecisionOption(weight, activation if weight is not None else None, method)


def candidate_options(candidates: Iterable[Any] | None, activation: QuantSpec | None = None,
                      method: str = "rtn") -> list[PrecisionOption]:
    """The options every layer chooses among: ``candidates`` parsed with :func:`parse_option`, or
    :data:`DEFAULT_WEIGHTS` with the recipe's ``activation`` spec and ``method``. Duplicates are
    an error naming the option."""
    raw = list(DEFAULT_WEIGHTS if candidates is None else candidates)
    if not raw:
        raise ValueError("mixed precision needs at least one candidate option")
    options = [parse_option(c, activation, method) for c in raw]
    names = [o.name for o in options]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"mixed-precision candidates repeat {dupes}")
    return options
