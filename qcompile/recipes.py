"""Recipes by name: which weight and activation formats, which layers, which passes.

A recipe is data. ``spec_for(path)`` decides per layer; ``overrides`` maps glob
patterns on module paths to a weight spec (or ``None`` to keep a layer in float),
first match wins, so a user can say ``{"*.down_proj": "int8"}``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, replace

from qcompile.formats.spec import PER_CHANNEL, QuantSpec

DEFAULT_EXCLUDE = ("lm_head", "*.lm_head", "*embed*", "*classifier*", "*score")
"""Kept in float by default: the LM head and embeddings (most sensitive, and often tied)."""

DEFAULT_PASSES = ("canonicalize", "fold_norm_scales", "quantize_weights", "lower")


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    weight: QuantSpec
    activation: QuantSpec | None = None
    passes: tuple[str, ...] = DEFAULT_PASSES
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    overrides: tuple[tuple[str, QuantSpec | None], ...] = ()

    def spec_for(self, path: str) -> tuple[QuantSpec, QuantSpec | None] | None:
        """(weight spec, activation spec) for the layer at ``path``, or None to keep it float."""
        for pattern, spec in self.overrides:
            if fnmatch.fnmatchcase(path, pattern):
                return None if spec is None else (spec, self.activation)
        if any(fnmatch.fnmatchcase(path, p) for p in self.exclude):
            return None
        return self.weight, self.activation

    def with_overrides(self, overrides: dict[str, str | QuantSpec | None]) -> Recipe:
        parsed = tuple((pat, parse_spec(s) if s is not None else None) for pat, s in overrides.items())
        return replace(self, overrides=parsed + self.overrides)


def _dyn(fmt: str, group: int = PER_CHANNEL) -> QuantSpec:
    return QuantSpec(fmt, group_size=group, dynamic=True)


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("w8a16", "int8 per-channel weights, 16-bit activations", QuantSpec("int8")),
        Recipe("w4a16", "int4 group-128 asymmetric weights, 16-bit activations",
               QuantSpec("int4", group_size=128, symmetric=False)),
        Recipe("w4a16-g32", "int4 group-32 asymmetric weights, 16-bit activations",
               QuantSpec("int4", group_size=32, symmetric=False)),
        Recipe("nvfp4-w4a16", "NVFP4 weights (e2m1, e4m3 block-16 scales), 16-bit activations", QuantSpec("nvfp4")),
        Recipe("mxfp4-w4a16", "MXFP4 weights (e2m1, e8m0 block-32 scales), 16-bit activations", QuantSpec("mxfp4")),
        Recipe("w8a8", "int8 per-channel weights, int8 per-token dynamic activations",
               QuantSpec("int8"), _dyn("int8")),
        Recipe("w4a8", "int4 group-128 weights, fp8 e4m3 per-token dynamic activations",
               QuantSpec("int4", group_size=128, symmetric=False), _dyn("fp8_e4m3")),
        Recipe("w4a4", "int4 group-128 weights, int4 per-token dynamic activations",
               QuantSpec("int4", group_size=128, symmetric=False), _dyn("int4")),
        Recipe("fp8", "fp8 e4m3 per-channel weights, fp8 e4m3 per-token dynamic activations",
               QuantSpec("fp8_e4m3", scale_dtype="float32"), _dyn("fp8_e4m3")),
        Recipe("nvfp4", "NVFP4 weights and activations", QuantSpec("nvfp4"), _dyn("nvfp4")),
        Recipe("mxfp4", "MXFP4 weights and activations", QuantSpec("mxfp4"), _dyn("mxfp4")),
    )
}


def get_recipe(name: str | Recipe) -> Recipe:
    if isinstance(name, Recipe):
        return name
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; valid recipes: {', '.join(RECIPES)}")
    return RECIPES[name]


def parse_spec(text: str | QuantSpec) -> QuantSpec:
    """``"int4"``, ``"int4-g32"``, ``"int4-g128-asym"``, ``"nvfp4"``, ``"int8-pc"`` → QuantSpec."""
    if isinstance(text, QuantSpec):
        return text
    parts = text.split("-")
    fmt, group, symmetric = parts[0], PER_CHANNEL, True
    for part in parts[1:]:
        if part == "asym":
            symmetric = False
        elif part == "pc":
            group = PER_CHANNEL
        elif part.startswith("g") and part[1:].isdigit():
            group = int(part[1:])
        else:
            raise ValueError(f"cannot parse {part!r} in spec {text!r} (expected gN, pc or asym)")
    return QuantSpec(fmt, group_size=group, symmetric=symmetric)
