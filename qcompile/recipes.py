"""Recipes by name: which weight and activation formats, which layers, which passes.

A recipe is data. ``decision_for(path)`` decides per layer (the ``assign_quant_specs``
pass writes it on the graph; nothing below reads the recipe); ``overrides`` maps glob
patterns on module paths to a weight spec (or ``None`` to keep a layer in float),
first match wins, so a user can say ``{"*.down_proj": "int8"}``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, replace
from typing import Any

from qcompile.formats.spec import PER_CHANNEL, PER_TENSOR, QuantSpec
from qcompile.ir.annotations import LayerDecision

DEFAULT_EXCLUDE = ("lm_head", "*.lm_head", "*embed*", "*classifier*", "*score")
"""Kept in float by default: the LM head and embeddings (most sensitive, and often tied)."""

DEFAULT_PASSES = ("canonicalize", "assign_quant_specs", "quantize_weights", "lower")
"""No norm folding before plain quantizers: it carries the norms' outlier channels into the weight
groups. SmolLM2-135M W4A16 RTN perplexity ×float: folded 1.87, ``when="if_better"`` 1.33, not
folded 1.27 (docs/accuracy-smollm2.md). Rotation recipes fold (``when="always"``): they need it."""


@dataclass(frozen=True)
class Recipe:
    """A named quantization recipe: default weight and activation specs, the passes to run (with their
    options), patterns of layers kept float, and per-layer overrides (first match wins)."""
    name: str
    description: str
    weight: QuantSpec | None
    """``None``: no layer is quantized unless an override says so (the ``none`` recipe)."""
    activation: QuantSpec | None = None
    passes: tuple[str, ...] = DEFAULT_PASSES
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    overrides: tuple[tuple[str, QuantSpec | None], ...] = ()
    pass_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Constructor options of the recipe's passes, by pass name."""
    activation_overrides: tuple[tuple[str, QuantSpec | None], ...] = ()
    """Glob patterns on module paths → the activation spec of matching quantized layers (``None``:
    16-bit activations); first match wins, else ``activation``."""

    def make_passes(self) -> list:
        """Fresh instances of the recipe's passes, with the recipe's options."""
        from qcompile.passes import make_pass

        return [make_pass(name, **self.pass_options.get(name, {})) for name in self.passes]

    def decision_for(self, path: str) -> LayerDecision:
        """The decision for the layer at ``path``: the first matching override, else float if an
        exclude pattern matches, else the recipe's weight and activation specs."""
        for pattern, spec in self.overrides:
            if fnmatch.fnmatchcase(path, pattern):
                if spec is None:
                    return LayerDecision(None, source=f"override {pattern}", reason=f"override {pattern!r} keeps it float")
                return LayerDecision(spec, self.activation_for(path), source=f"override {pattern}")
        for pattern in self.exclude:
            if fnmatch.fnmatchcase(path, pattern):
                return LayerDecision(None, source=f"exclude {pattern}", reason=f"the recipe keeps {pattern!r} float")
        return LayerDecision(self.weight, self.activation_for(path), source=f"recipe {self.name}")

    def activation_for(self, path: str) -> QuantSpec | None:
        """The activation spec of a quantized layer at ``path``: the first matching
        ``activation_overrides`` pattern's, else ``activation``."""
        return next((spec for pattern, spec in self.activation_overrides if fnmatch.fnmatchcase(path, pattern)),
                    self.activation)

    def with_overrides(self, overrides: dict[str, str | QuantSpec | None]) -> Recipe:
        """A copy whose ``overrides`` (``{glob: spec text, QuantSpec or None}``) take precedence over
        the recipe's own."""
        parsed = tuple((pat, parse_spec(s) if s is not None else None) for pat, s in overrides.items())
        return replace(self, overrides=parsed + self.overrides)

    def to_dict(self) -> dict[str, Any]:
        """Everything the recipe says, specs as ``QuantSpec.encode()`` text (for artifacts)."""
        enc = lambda s: s.encode() if s is not None else None  # noqa: E731
        return {"name": self.name, "description": self.description, "weight": enc(self.weight),
                "activation": enc(self.activation), "passes": list(self.passes), "exclude": list(self.exclude),
                "overrides": [[pattern, enc(spec)] for pattern, spec in self.overrides],
                "pass_options": self.pass_options,
                "activation_overrides": [[pattern, enc(spec)] for pattern, spec in self.activation_overrides]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        """Inverse of :meth:`to_dict` (specs parsed from their text)."""
        dec = lambda s: QuantSpec.parse(s) if s is not None else None  # noqa: E731
        return cls(d["name"], d["description"], dec(d["weight"]), dec(d["activation"]), tuple(d["passes"]),
                   tuple(d["exclude"]), tuple((pattern, dec(spec)) for pattern, spec in d["overrides"]),
                   dict(d["pass_options"]),
                   tuple((pattern, dec(spec)) for pattern, spec in d.get("activation_overrides", ())))


def _dyn(fmt: str, group: int = PER_CHANNEL) -> QuantSpec:
    return QuantSpec(fmt, group_size=group, dynamic=True)


PER_TOKEN_INT8 = QuantSpec("int8", dynamic=True, scale_dtype="float32")
"""W8A8's activations. float32 scales: computed at run time and never stored, rounding them to float16
buys nothing, and ONNX Runtime's per-token chain then needs no casts (docs/onnx-export.md)."""
PER_TENSOR_UINT8 = QuantSpec("int8", group_size=PER_TENSOR, symmetric=False, dynamic=True, scale_dtype="float32")
"""ONNX's ``DynamicQuantizeLinear``: one float32 scale and uint8 zero point for the whole activation tensor."""
FFN_DOWN_PROJECTIONS = ("*.down_proj", "*.mlp.c_proj", "*.fc2", "*.dense_4h_to_h", "*[0-9].output.dense")
"""The second linear of each feed-forward block (Llama/Qwen/Mistral/Phi-3/Gemma, GPT-2, OPT, GPT-NeoX,
BERT; ``*[0-9].output.dense`` is BERT's, not its ``attention.output.dense``): it reads the activation
function's output, whose outliers per-tensor scales cannot carry (docs/onnx-export.md)."""

GPTQ_PASSES = ("canonicalize", "assign_quant_specs", "gptq", "lower")
GPTQ_OPTIONS = {"gptq": {"damp": 0.1}}
"""Damping 0.1 × mean(diag H), not GPTQ's usual 0.01: with the few hundred calibration rows a user
typically has, 0.01 overfits the calibration subspace. MiniLM W4A16 held-out mean cosine (32
calibration sentences, docs/accuracy-minilm.md setup): damp 0.01 0.9637, 0.1 0.9732, 0.3 0.9727, 1.0 0.9724."""


def _derived(base: Recipe, suffix: str, what: str, passes: tuple[str, ...],
             pass_options: dict[str, dict[str, Any]] | None = None) -> Recipe:
    return replace(base, name=f"{base.name}-{suffix}", description=f"{base.description}; {what}", passes=passes,
                   pass_options=dict(pass_options or {}))


NO_QUANTIZATION = Recipe("none", "no quantization: every layer keeps the model's dtype (the lowered graph, its "
                         "fusions and generate, with nothing rounded)", None)

_RTN = (
        NO_QUANTIZATION,
        Recipe("w8a16", "int8 per-channel weights, 16-bit activations", QuantSpec("int8")),
        Recipe("w4a16", "int4 group-128 asymmetric weights, 16-bit activations",
               QuantSpec("int4", group_size=128, symmetric=False)),
        Recipe("w4a16-sym", "int4 group-128 symmetric weights, 16-bit activations", QuantSpec("int4", group_size=128)),
        Recipe("w4a16-g32", "int4 group-32 asymmetric weights, 16-bit activations",
               QuantSpec("int4", group_size=32, symmetric=False)),
        Recipe("nvfp4-w4a16", "NVFP4 weights (e2m1, e4m3 block-16 scales), 16-bit activations", QuantSpec("nvfp4")),
        Recipe("mxfp4-w4a16", "MXFP4 weights (e2m1, e8m0 block-32 scales), 16-bit activations", QuantSpec("mxfp4")),
        Recipe("w8a8", "int8 per-channel weights, int8 per-token dynamic activations", QuantSpec("int8"),
               PER_TOKEN_INT8),
        Recipe("w4a8", "int4 group-128 weights, fp8 e4m3 per-token dynamic activations",
               QuantSpec("int4", group_size=128, symmetric=False), _dyn("fp8_e4m3")),
        Recipe("w4a4", "int4 group-128 weights, int4 per-token dynamic activations",
               QuantSpec("int4", group_size=128, symmetric=False), _dyn("int4")),
        Recipe("fp8", "fp8 e4m3 per-channel weights, fp8 e4m3 per-token dynamic activations",
               QuantSpec("fp8_e4m3", scale_dtype="float32"), _dyn("fp8_e4m3")),
        Recipe("nvfp4", "NVFP4 weights and activations", QuantSpec("nvfp4"), _dyn("nvfp4")),
        Recipe("mxfp4", "MXFP4 weights and activations", QuantSpec("mxfp4"), _dyn("mxfp4")),
)
_BY_NAME = {r.name: r for r in _RTN}
_GPTQ = tuple(_derived(_BY_NAME[n], "gptq", "GPTQ weights (passes/gptq.py)", GPTQ_PASSES, GPTQ_OPTIONS)
              for n in ("w4a16", "w4a16-g32", "nvfp4-w4a16", "w8a8", "w4a8", "w4a4", "nvfp4"))

SMOOTH_GPTQ_PASSES = ("canonicalize", "assign_quant_specs", "smooth_quant", "gptq", "lower")
_MIGRATED = (
    _derived(_BY_NAME["w4a16"], "awq", "AWQ scales and clipping, then RTN (passes/scale_migration.py)",
             ("canonicalize", "assign_quant_specs", "awq", "awq_clip", "quantize_weights", "lower")),
    _derived(_BY_NAME["w8a8"], "smooth", "SmoothQuant scales, then RTN",
             ("canonicalize", "assign_quant_specs", "smooth_quant", "quantize_weights", "lower")),
    replace(_derived(_BY_NAME["w8a8"], "pt-smooth", "", ("canonicalize", "assign_quant_specs", "smooth_quant",
                                                          "quantize_weights", "lower")),
            description="int8 per-channel weights, per-tensor uint8 dynamic activations (ONNX Runtime's "
                        "DynamicQuantizeLinear), per-token int8 on the feed-forward down projections; SmoothQuant "
                        "scales, then RTN", activation=PER_TENSOR_UINT8,
            activation_overrides=tuple((p, PER_TOKEN_INT8) for p in FFN_DOWN_PROJECTIONS)),
    *(_derived(_BY_NAME[n], "smooth-gptq", "SmoothQuant scales, then GPTQ", SMOOTH_GPTQ_PASSES, GPTQ_OPTIONS)
      for n in ("w8a8", "w4a8", "w4a4", "nvfp4")),
)

ROTATE_GPTQ_PASSES = ("canonicalize", "assign_quant_specs", "fold_norm_scales", "rotate_residual", "rotate_online",
                      "gptq", "lower")
"""Residual rotation (R1) where the model allows it, online Hadamards (R4 before down_proj; every
quantized input of post-norm encoders), then GPTQ. No R2: it mixes V's outlier rows within a head
(docs/rotation.md)."""
_ROTATED = tuple(_derived(_BY_NAME[n], "rotate-gptq", "rotation folding (passes/rotation.py), then GPTQ",
                          ROTATE_GPTQ_PASSES, {**GPTQ_OPTIONS, "fold_norm_scales": {"when": "always"}})
                 for n in ("w4a16", "w8a8", "w4a8", "w4a4", "nvfp4"))

WEIGHT_GROUP_ROTATION = 128
"""The W4A16 fitted recipes rotate each 128-channel weight group on its own (``rotate_online(group_size=128)``,
``I ⊗ Q_128``): weight-only quantization needs outliers spread within a group only. On the real MiniLM,
``w4a16-sym-rotate-gptq-fit``: held-out cosine 0.99033 against 0.99035 with the full 384/1536 rotations
(benchmarks/accuracy.py protocol, CPU, 2026-12-02), with one 128 x 128 MatMul per transform in ONNX
Runtime instead of two factors and a sign Mul (docs/benchmarks/onnx-ort-cpu.md)."""

GPTQ_FIT_OPTIONS = {"gptq": {"damp": 0.3, "grid": "mse", "targets": "float"}}
"""GPTQ fitted to the float model: each group's grid searched for the least weight error
(``grid="mse"``, passes/clip_search_math.py), each layer fitted to the float model's outputs
rather than to its own (``targets="float"``, passes/gptq_targets.py), damping 0.3. Chosen on a
split of the calibration sentences, never the test set (benchmarks/minilm_tuning.py, docs/gptq.md):
MiniLM W4A16 validation mean cosine, sentences / 3-sentence paragraphs, 348 calibration sentences
and their paragraphs: plain GPTQ (damp 0.1) 0.98725 / 0.98616, this 0.99166 / 0.99099."""

_FIT = (
    _derived(_BY_NAME["w4a16"], "gptq-fit",
             "GPTQ on error-minimising grids, fitted to the float model's outputs (passes/gptq.py)",
             GPTQ_PASSES, GPTQ_FIT_OPTIONS),
    *(_derived(_BY_NAME[base], "rotate-gptq-fit",
               "rotation folding with online Hadamards (passes/rotation.py), then GPTQ on error-minimising grids, "
               "fitted to the float model's outputs", ROTATE_GPTQ_PASSES,
               {**GPTQ_FIT_OPTIONS, "fold_norm_scales": {"when": "always"},
                **({"rotate_online": {"group_size": WEIGHT_GROUP_ROTATION}} if base != "w4a8" else {})})
      for base in ("w4a16", "w4a16-sym", "w4a8")),
    _derived(_BY_NAME["nvfp4"], "smooth-gptq-fit", "SmoothQuant scales, then GPTQ fitted to the float model's outputs",
             SMOOTH_GPTQ_PASSES, {"gptq": {k: v for k, v in GPTQ_FIT_OPTIONS["gptq"].items() if k != "grid"}}),
)
"""The W4A16 recipes that fit the float model (``GPTQ_FIT_OPTIONS``): without online rotation
(no run-time cost beyond the int4 GEMM) and with it (post-norm encoders: an online Hadamard before
every quantized linear, pre-norm decoders: residual rotation plus one before down_proj). The
symmetric one is for ONNX Runtime: ``MatMulNBits`` stores float32 scales, so group-128 symmetric is
4.25 bits per weight there and asymmetric 4.28 (docs/onnx-export.md). ``w4a8-rotate-gptq-fit`` fits
the same way with fp8 activations (the fit sees the quantized activations); ``nvfp4-smooth-gptq-fit``
is ``nvfp4-smooth-gptq`` with the fit's damping and float targets (NVFP4's e4m3 block scales leave no
grid to search; rotation hurts NVFP4: docs/accuracy-minilm.md)."""

SPLIT_PASSES = ("canonicalize", "assign_quant_specs", "split_outliers", "quantize_weights", "lower")
ARC_PASSES = ("canonicalize", "assign_quant_specs", "split_outliers", "quantize_weights", "residual_channels", "lower")
_SPLIT = (
    *(_derived(_BY_NAME[n], "llmint8", "LLM.int8: per layer the 8 input channels of largest calibration |x| in a "
               "16-bit GEMM (passes/outlier_splitting.py)", SPLIT_PASSES,
               {"split_outliers": {"method": "llm_int8", "channels": 8}}) for n in ("w8a8", "w4a8")),
    _derived(_BY_NAME["w4a16"], "sparse", "dense-and-sparse: 0.5 % of the weights (largest RTN error x mean |x|) "
             "kept as a float16 sparse residual", SPLIT_PASSES,
             {"split_outliers": {"method": "sparse", "fraction": 0.005}}),
    _derived(_BY_NAME["nvfp4"], "arc", "ARCQuant residual channels: per layer the 16 input channels of largest "
             "calibration |x| moved into one NVFP4 block and their activation residual carried by 16 extra K channels",
             ARC_PASSES, {"split_outliers": {"method": "residual_channels", "channels": 16}}),
)
"""Outlier splitting (docs/outlier-splitting.md): on the planted-outlier Llama of the tests, logits
cosine loss to float vs plain RTN: W8A8 0.0030 → 0.000026, W4A8 0.0172 → 0.0043, NVFP4 W4A4
0.106 → 0.026 (residual channels; LLM.int8 0.0058)."""

RECIPES: dict[str, Recipe] = {r.name: r for r in (*_RTN, *_GPTQ, *_MIGRATED, *_ROTATED, *_FIT, *_SPLIT)}


def get_recipe(name: str | Recipe) -> Recipe:
    """The recipe named ``name`` (a :class:`Recipe` passes through); ``ValueError`` lists the valid
    names for an unknown one."""
    if isinstance(name, Recipe):
        return name
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; valid recipes: {', '.join(RECIPES)}")
    return RECIPES[name]


def parse_spec(text: str | QuantSpec) -> QuantSpec:
    """``"int4"``, ``"int4-g32"``, ``"int4-g128-asym"``, ``"nvfp4"``, ``"int8-pc"`` → QuantSpec
    (the grammar of ``QuantSpec.parse``)."""
    return text if isinstance(text, QuantSpec) else QuantSpec.parse(text)
