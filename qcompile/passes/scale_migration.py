"""Scale migration: SmoothQuant, AWQ (scale search, then clipping) and the Outlier Suppression+ shift.

They run after ``assign_quant_specs`` (they read each linear's decision) and ``fold_norm_scales``,
before the weight quantizer; ``docs/scale-migration.md`` has the rules, folds and measurements.
Each pass works on *groups*: the linears of one kind (activation-quantized for ``smooth_quant`` and
``os_shift``, weight-only for ``awq``) that read one input (the same node, possibly through ops
that move whole rows: views, token slices). It migrates a per-channel scale ``s`` (or shift ``z``)
out of that input and into the group's weights, and folds the inverse into whatever produces the
input, in this order of preference:

1. ``norm``: the input is a norm all of whose consumers are linears of the group: the norm's affine
   weight (and bias) absorb ``1/s`` (a norm without affine parameters gets a weight ``1/s``);
   the shift goes into a LayerNorm's bias (RMSNorm has none).
2. ``linear``: the input comes from one linear ``P`` through a chain of single-consumer ops that are
   linear per channel: row/layout moves (views, transposes, GQA's ``repeat_kv`` expand), attention's
   ``softmax(QKᵀ)·V`` (as the value), ``SiLU(gate) · up`` (any product with an independent operand),
   and ReLU for positive scales. ``P``'s output rows (weight rows and bias) absorb ``1/s`` (``z``
   for the shift: only through moves and attention, whose probabilities sum to 1). The channel
   correspondence (which ``P`` channel feeds which consumer channel, e.g. one V channel feeding a
   channel of each query head of its group) is read by running the graph once on the example
   inputs with a channel-index tensor in place of ``P``'s output; scales are tied accordingly.
   ``P`` must be quantized itself (a layer kept float is left alone).
3. ``channel_scale`` (scales only): ``qcompile::channel_scale(x, 1/s)`` is inserted before the
   group's linears (post-norm residual streams in BERT/MiniLM, GELU MLPs, GPT-2's fused QKV); the
   fusion work folds it into the kernel that reads ``x``. The shift has no such fallback: such
   groups are left alone.

Each pass processes the groups in reverse graph order, so a group whose linear is also a producer
``P`` of a later group is searched with its rows already rescaled. Statistics come from
``ctx.activation_stats`` on calibration batches; per linear the pass records what it did in
``decision.extras[<pass name>]`` (alpha, fold, scale range, the group's output errors before and
after on calibration rows, the names of the tensors it wrote), which the report shows and the
artifact saves. New tensors get new attribute names (never written in place; tied weights and the
user's model are untouched).

Load: the float weights the passes rewrote are not saved (only quantized results), but the new
norm weights and biases, producer biases and channel scales are (they stay in the lowered graph's
state dict). So ``smooth_quant``, ``awq`` and ``os_shift`` declare ``on_load = RESTORE``: their
``restore`` re-creates the same structure (norm affine arguments, producer and consumer biases,
``channel_scale`` nodes) from the names recorded in the extras, binding the artifact's tensors; a
recorded tensor the artifact does not hold was superseded by a later pass (it rebinds the same
argument) and is skipped. ``awq_clip`` only changes weights that are then quantized, so its effect
is in the saved quantized tensors: ``SKIP``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from qcompile.ir.annotations import LayerDecision, decision_of
from qcompile.ir.graph import (
    add_get_attr,
    get_attr,
    linear_nodes,
    linear_weight,
    module_path,
    new_attr_name,
)
from qcompile.ir.ops import LAYER_NORM, NORM_OPS
from qcompile.passes import scale_math
from qcompile.passes.base import OnLoad, Pass, PassContext, PassResult, register_pass
from qcompile.passes.scale_regions import (
    _base,
    _bias_of,
    _bind_attr,
    _f,
    _Group,
    _groups,
    _insert_channel_scale,
    _linear_bias_node,
    _position,
    _record,
    _set_arg,
    _set_bias,
    _set_weight,
    _source,
    _weight_shape,
)

aten = torch.ops.aten

SMOOTH_ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
AWQ_GRID = 20
CLIP_RATIOS = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))  # 1.0 .. 0.5
SHIFT_SAMPLE_ROWS = 2048
"""Rows sampled for the shift's per-channel min/max (the statistics carry only max |x|)."""

_QUANTIZERS = ("quantize_weights", "gptq")
_AFTER = ("assign_quant_specs", "fold_norm_scales")
"""After the decisions (read), and after norm folding: folding a smoothed norm's weight into its
consumers would undo the migration."""


class _ScaleMigration(Pass):
    """SmoothQuant and AWQ: per group, search a per-channel scale, then fold it (module docstring)."""

    exact = True
    uses_calibration = True
    requires = ("quant_decisions",)
    runs_after = _AFTER
    runs_before = _QUANTIZERS
    on_load = OnLoad.RESTORE
    tag = ""

    def select(self, decision: LayerDecision) -> bool:
        """Whether this pass migrates scales for a layer with this decision."""
        raise NotImplementedError

    def candidates(self) -> list[float]:
        """The α grid (no scaling, the baseline, is always measured too)."""
        raise NotImplementedError

    def scale(self, alpha: float, x_max: torch.Tensor, x_mean: torch.Tensor, w_max: torch.Tensor) -> torch.Tensor:
        """The per-input-channel scale for strength ``alpha`` from the activations' max and mean
        magnitudes and the weights' max magnitude."""
        raise NotImplementedError

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        groups = _groups(gm, ctx, self.select, "scale")
        if not groups:
            return PassResult(False, {"groups": 0})
        stats = ctx.activation_stats(gm, [lin for g in groups for lin in g.linears])
        folds: dict[str, int] = {}
        kept, alphas, gains = 0, [], []
        pos = _position(gm)
        for g in sorted(groups, key=lambda g: -pos(g.linears[0])):
            info = self._smooth(gm, g, stats)
            if info["fold"] == "none":
                kept += 1
            else:
                folds[info["fold"]] = folds.get(info["fold"], 0) + 1
                alphas.append(info["alpha"])
            gains.append(info["error_rtn"] - info["error"])
            for lin in g.linears:
                _record(lin, self.name, dict(info))
        changed = bool(folds)
        if changed:
            ctx.graph_version += 1  # the rewritten weights and inputs invalidate cached statistics
        out: dict[str, Any] = {"groups": len(groups), "migrated": sum(folds.values()), "left_alone": kept,
                               "folds": folds}
        if alphas:
            out["mean_alpha"] = _f(sum(alphas) / len(alphas))
        out["mean_error_reduction"] = _f(sum(gains) / len(gains))
        return PassResult(changed, out)

    def _smooth(self, gm: fx.GraphModule, g: _Group, stats: dict) -> dict[str, Any]:
        members = []
        for lin in g.linears:
            d = decision_of(lin)
            members.append((stats[lin.name].sample, linear_weight(gm, lin), d.weight, d.activation))
        x_max = torch.stack([stats[lin.name].max_abs for lin in g.linears]).amax(0)
        x_mean = torch.stack([stats[lin.name].mean_abs for lin in g.linears]).mean(0)
        w_max = torch.stack([w.detach().float().abs().amax(0) for _, w, _, _ in members]).amax(0)
        index = g.index
        if index is not None:
            size = _weight_shape(g.producer)[0]
            mapped = torch.unique(index)
            stat = [scale_math.tied_reduce(v, index, size, r)[mapped]
                    for v, r in ((x_max, "amax"), (x_mean, "mean"), (w_max, "amax"))]
        else:
            size, mapped, stat = x_max.shape[0], None, [x_max.double(), x_mean.double(), w_max.double()]

        def full(alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
            """(scale per producer / fold channel, scale per input channel), float32-exact."""
            sub = self.scale(alpha, *stat).float().double()
            if mapped is None:
                return sub, sub
            s = torch.ones(size, dtype=torch.float64, device=sub.device)
            s[mapped.to(sub.device)] = sub
            return s, s[index.to(sub.device)]

        alphas = self.candidates()
        scales = [full(a) for a in alphas]
        base, *errors = scale_math.quantized_output_errors(members, [None] + [s_in for _, s_in in scales])
        best, best_alpha, best_err = -1, None, base
        if errors:
            i = min(range(len(errors)), key=errors.__getitem__)
            if errors[i] < base or not self.allow_identity:
                best, best_alpha, best_err = i, alphas[i], errors[i]
        info: dict[str, Any] = {"alpha": None if best_alpha is None else _f(best_alpha), "fold": "none",
                                "error_rtn": _f(base), "error": _f(best_err)}
        if best_alpha is None:
            if g.why:
                info["why_no_fold"] = g.why
            return info
        s_fold, s_in = scales[best]
        info.update(fold=g.fold, scale_min=_f(s_in.min()), scale_max=_f(s_in.max()), attrs=self._fold(gm, g, s_fold, s_in))
        if g.fold == "linear":
            info["producer"] = module_path(g.producer)
        elif g.why:
            info["why_no_fold"] = g.why
        return info

    def _fold(self, gm: fx.GraphModule, g: _Group, s_fold: torch.Tensor, s_in: torch.Tensor) -> dict[str, str]:
        """Rewrite the graph: consumers' weights × diag(s), the producer / a channel_scale × 1/s."""
        attrs: dict[str, str] = {}
        for lin in g.linears:
            w = linear_weight(gm, lin)
            _set_weight(gm, lin, scale_math.scaled_weight(w, s_in), self.tag)
        dtype = linear_weight(gm, g.linears[0]).dtype
        if g.fold == "norm":
            norm = g.norm
            w_node = norm.args[1]
            gamma = get_attr(gm, w_node.target).double() if w_node is not None else torch.ones_like(s_fold)
            new_w = add_get_attr(gm, _base(norm, f"weight_{self.tag}"), (gamma / s_fold).to(dtype), before=norm)
            _set_arg(gm, norm, 1, new_w)
            attrs["norm_weight"] = new_w.target
            b_node = norm.args[2] if norm.target == LAYER_NORM else None
            if b_node is not None:
                beta = get_attr(gm, b_node.target)
                new_b = add_get_attr(gm, _base(norm, f"bias_{self.tag}"), (beta.double() / s_fold).to(beta.dtype),
                                     before=norm)
                _set_arg(gm, norm, 2, new_b)
                attrs["norm_bias"] = new_b.target
        elif g.fold == "linear":
            p = g.producer
            w = linear_weight(gm, p)
            attrs["producer_weight"] = _set_weight(gm, p, (w.double() / s_fold[:, None]).to(w.dtype), self.tag)
            if _linear_bias_node(p) is not None:
                b = _bias_of(gm, p, w.shape[0])
                attrs["producer_bias"] = _set_bias(gm, p, (b / s_fold).to(w.dtype), self.tag)
        else:
            name = new_attr_name(gm, _base(g.linears[0], f"{self.tag}_scale"))
            _insert_channel_scale(gm, g.linears, name, (1.0 / s_in).to(dtype))
            attrs["scale"] = name
        return attrs

    def restore(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return _restore(gm, ctx, self.name)


@register_pass("smooth_quant")
class SmoothQuant(_ScaleMigration):
    """SmoothQuant (Xiao et al., 2023) for activation-quantized linears.

    Rules: layers with a weight spec and an activation spec (weight-only and float layers are left
    alone); per group sharing an input, ``s_j = max|X_j|^α / max_k max|W_kj|^(1−α)`` (normalised,
    clamped away from 0), α over ``alphas`` chosen to minimise the group's output error with the
    decisions' weight and activation specs on calibration rows (the op's reference kernel); with
    ``allow_identity`` a group no α improves is left alone. Folds as in the module docstring
    (norm, producer linear, else ``channel_scale``). Exact (verified in float64); restored at load.
    """

    tag = "smoothed"

    def __init__(self, alphas: Sequence[float] = SMOOTH_ALPHAS, allow_identity: bool = True):
        self.alphas = tuple(float(a) for a in alphas)
        self.allow_identity = bool(allow_identity)

    def options(self) -> dict[str, Any]:
        return {"alphas": list(self.alphas), "allow_identity": self.allow_identity}

    def select(self, decision: LayerDecision) -> bool:
        return decision.activation is not None

    def candidates(self) -> list[float]:
        return list(self.alphas)

    def scale(self, alpha: float, x_max: torch.Tensor, x_mean: torch.Tensor, w_max: torch.Tensor) -> torch.Tensor:
        return scale_math.smooth_scale(x_max, w_max, alpha)


@register_pass("awq")
class AWQ(_ScaleMigration):
    """AWQ's activation-aware scale search (Lin et al., 2024) for weight-only linears.

    Rules: layers with a weight spec and no activation spec; per group sharing an input,
    ``s = mean|X|^α`` (normalised), α over ``grid`` points in [0, 1] (α = 0 is no scaling),
    minimising ``‖X·(Q(W·diag(s))·diag(1/s))ᵀ − X·Wᵀ‖`` summed over the group on calibration rows,
    ``Q`` the decision's weight spec. Folds as SmoothQuant does. Exact (the scale fold is verified in
    float64); the lossy clipping search is the separate pass ``awq_clip``. Restored at load.
    """

    tag = "awq"
    allow_identity = True

    def __init__(self, grid: int = AWQ_GRID):
        self.grid = int(grid)

    def options(self) -> dict[str, Any]:
        return {"grid": self.grid}

    def select(self, decision: LayerDecision) -> bool:
        return decision.activation is None

    def candidates(self) -> list[float]:
        return [i / (self.grid - 1) for i in range(1, self.grid)] if self.grid > 1 else []

    def scale(self, alpha: float, x_max: torch.Tensor, x_mean: torch.Tensor, w_max: torch.Tensor) -> torch.Tensor:
        return scale_math.awq_scale(x_mean, alpha)


@register_pass("awq_clip")
class AWQClip(Pass):
    """AWQ's weight clipping for weight-only linears (after ``awq``, before the quantizer).

    Rules: layers with a weight spec and no activation spec; per output row and quantization group
    (the whole row for per-channel specs), the clipping ratio in ``ratios`` (1.0 … 0.5 of the
    group's range) minimising that group's output error ``‖X_g (Q(clip(W))_g − W_g)ᵀ‖²`` on
    calibration rows (after ``awq``'s scaling: fresh statistics). The clipped weight is a new
    attribute; the extras say the mean / min ratio, the fraction of groups clipped and the layer's
    output error before and after. Lossy (``exact = False``). At load its effect is in the saved
    quantized weights: skipped.
    """

    exact = False
    uses_calibration = True
    requires = ("quant_decisions",)
    runs_after = (*_AFTER, "awq")
    runs_before = _QUANTIZERS
    on_load = OnLoad.SKIP

    def __init__(self, ratios: Sequence[float] = CLIP_RATIOS):
        self.ratios = tuple(float(r) for r in ratios)

    def options(self) -> dict[str, Any]:
        return {"ratios": list(self.ratios)}

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        todo = [n for n in linear_nodes(gm) if (d := decision_of(n)) is not None and d.quantized and d.activation is None
                and len(_weight_shape(n)) == 2]
        if not todo:
            return PassResult(False, {"layers": 0})
        stats = ctx.activation_stats(gm, todo)
        before, after, clipped = [], [], 0
        for lin in todo:
            d = decision_of(lin)
            w = linear_weight(gm, lin)
            new, ratio, e0, e1 = scale_math.clip_search(w, stats[lin.name].sample, d.weight, self.ratios)
            frac = float((ratio < 1.0).double().mean())
            if frac > 0:
                _set_weight(gm, lin, new, "clipped")
                clipped += 1
            before.append(e0)
            after.append(e1 if frac > 0 else e0)
            _record(lin, self.name, {"mean_ratio": _f(ratio.mean()), "min_ratio": _f(ratio.min()),
                                     "clipped_fraction": _f(frac), "error_before": _f(e0),
                                     "error": _f(after[-1])})
        if clipped:
            ctx.graph_version += 1
        return PassResult(bool(clipped), {"layers": len(todo), "clipped_layers": clipped,
                                          "mean_error_before": _f(sum(before) / len(before)),
                                          "mean_error_after": _f(sum(after) / len(after))})


# ----------------------------------------------------------------------------- shift
@register_pass("os_shift")
class OSShift(Pass):
    """Outlier Suppression+'s channel shift (Wei et al., 2023) for activation-quantized linears.

    Rules: layers with a weight spec and an activation spec; per group sharing an input, the
    per-channel shift ``z_j = (max_j + min_j) / 2`` of the input (min and max from up to
    ``SHIFT_SAMPLE_ROWS`` calibration rows, or from exact statistics when the calibration service
    provides ``min``/``max``), so each channel's range is centred on 0. ``x − z`` goes into the
    producer: a LayerNorm's bias (every consumer of the norm in the group) or a producer linear's
    bias through row moves and attention (a linear without a bias gets one); each consumer's bias
    becomes ``b + W·z`` (a consumer without a bias gets one). Groups no producer can absorb a
    shift for (RMSNorm, residual streams, nonlinearities) are left alone, and with
    ``only_if_better`` (default) so is a group whose quantized output error on calibration rows the
    shift does not lower (per-token dynamic activation scales gain less from centring than the
    per-tensor static ones OS+ was designed for; a channel with rare spikes can even lose). Runs
    before ``smooth_quant`` (OS+ shifts, then scales). Exact (verified in float64); restored at load.
    """

    exact = True
    uses_calibration = True
    requires = ("quant_decisions",)
    runs_after = _AFTER
    runs_before = ("smooth_quant", *_QUANTIZERS)
    on_load = OnLoad.RESTORE
    tag = "shifted"

    def __init__(self, only_if_better: bool = True):
        self.only_if_better = bool(only_if_better)

    def options(self) -> dict[str, Any]:
        return {"only_if_better": self.only_if_better}

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        groups = _groups(gm, ctx, lambda d: d.activation is not None, "shift")
        skipped: dict[str, int] = {}
        todo = []
        for g in groups:
            if g.fold == "norm" and g.norm.target != LAYER_NORM:
                why = "RMSNorm has no bias"
            elif g.fold == "channel_scale":
                why = g.why or "no producer absorbs a shift"
            else:
                todo.append(g)
                continue
            skipped[why] = skipped.get(why, 0) + 1
            for lin in g.linears:
                _record(lin, self.name, {"fold": "none", "why_no_fold": why})
        if not todo:
            return PassResult(False, {"groups": len(groups), "shifted": 0, "skipped": skipped})
        stats = ctx.activation_stats(gm, [lin for g in todo for lin in g.linears], sample_rows=SHIFT_SAMPLE_ROWS)
        shifted = kept = 0
        for g in todo:
            lo = torch.stack([_channel_min(stats[lin.name]) for lin in g.linears]).amin(0)
            hi = torch.stack([_channel_max(stats[lin.name]) for lin in g.linears]).amax(0)
            if g.index is not None:
                size = _weight_shape(g.producer)[0]
                z_fold = scale_math.shift_midpoint(scale_math.tied_reduce(lo, g.index, size, "amin"),
                                                   scale_math.tied_reduce(hi, g.index, size, "amax"))
                z_fold = z_fold.float().double()
                z_in = z_fold[g.index]
            else:
                z_fold = z_in = scale_math.shift_midpoint(lo, hi).float().double()
            if not bool((z_in != 0).any()):
                continue
            members = [(stats[lin.name].sample, linear_weight(gm, lin), decision_of(lin).weight,
                        decision_of(lin).activation) for lin in g.linears]
            e_keep, e_shift = scale_math.shifted_output_errors(members, [None, z_in])
            info: dict[str, Any] = {"fold": "none", "shift_abs_max": _f(z_in.abs().max()),
                                    "absmax_before": _f(torch.maximum(lo.abs(), hi.abs()).max()),
                                    "absmax_after": _f(((hi.double() - lo.double()) / 2).max()),
                                    "error_rtn": _f(e_keep), "error": _f(e_keep), "error_shifted": _f(e_shift)}
            if self.only_if_better and e_shift >= e_keep:
                kept += 1
                for lin in g.linears:
                    _record(lin, self.name, dict(info))
                continue
            attrs = self._fold(gm, g, z_fold, z_in)
            shifted += 1
            info.update(fold=g.fold, error=_f(e_shift))
            if g.fold == "linear":
                info["producer"] = module_path(g.producer)
            for lin in g.linears:
                _record(lin, self.name, {**info, "attrs": {**{k: v for k, v in attrs.items() if k != "bias"},
                                                           "bias": attrs["bias"][lin.name]}})
        if shifted:
            ctx.graph_version += 1
        return PassResult(bool(shifted), {"groups": len(groups), "shifted": shifted, "left_alone": kept,
                                          "skipped": skipped})

    def _fold(self, gm: fx.GraphModule, g: _Group, z_fold: torch.Tensor, z_in: torch.Tensor) -> dict[str, Any]:
        attrs: dict[str, Any] = {"bias": {}}
        for lin in g.linears:
            w = linear_weight(gm, lin)
            b = _bias_of(gm, lin, w.shape[0])
            attrs["bias"][lin.name] = _set_bias(gm, lin, (b + w.double() @ z_in).to(w.dtype), self.tag)
        dtype = linear_weight(gm, g.linears[0]).dtype
        if g.fold == "norm":
            norm = g.norm
            b_node = norm.args[2]
            beta = get_attr(gm, b_node.target).double() if b_node is not None else torch.zeros_like(z_fold)
            new_b = add_get_attr(gm, _base(norm, f"bias_{self.tag}"), (beta - z_fold).to(dtype), before=norm)
            _set_arg(gm, norm, 2, new_b)
            attrs["norm_bias"] = new_b.target
        else:
            p = g.producer
            w = linear_weight(gm, p)
            b = _bias_of(gm, p, w.shape[0])
            attrs["producer_bias"] = _set_bias(gm, p, (b - z_fold).to(w.dtype), self.tag)
        return attrs

    def restore(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return _restore(gm, ctx, self.name)


def _channel_min(stats: Any) -> torch.Tensor:
    return stats.min if stats.min is not None else stats.sample.amin(0)


def _channel_max(stats: Any) -> torch.Tensor:
    return stats.max if stats.max is not None else stats.sample.amax(0)


# ----------------------------------------------------------------------------- load
def _restore(gm: fx.GraphModule, ctx: PassContext, name: str) -> PassResult:
    """Re-create a scale-migration pass's structure from the names in the extras, binding the
    artifact's tensors (values are loaded strictly afterwards as well)."""
    state = ctx.artifact.state
    lins = linear_nodes(gm)
    by_path = {module_path(n): n for n in lins}
    plan = []
    for lin in lins:
        d = decision_of(lin)
        rec = d.extras.get(name) if d is not None else None
        if isinstance(rec, dict) and rec.get("fold", "none") != "none":
            plan.append((lin, rec, _source(lin)))
    done: set[tuple[str, int, str]] = set()

    def bind(node: fx.Node, idx: int, attr: str | None, kwarg: str | None = None) -> bool:
        if attr is None or attr not in state or (node.name, idx, attr) in done:
            return False
        done.add((node.name, idx, attr))
        _set_arg(gm, node, idx, _bind_attr(gm, attr, state[attr].clone(), before=node), kwarg=kwarg)
        return True

    bound = 0
    scales: dict[str, list[fx.Node]] = {}
    for lin, rec, src in plan:
        attrs = rec.get("attrs", {})
        fold = rec["fold"]
        if fold == "norm":
            if not (src.op == "call_function" and src.target in NORM_OPS):
                raise ValueError(f"{name}: the artifact folded into the norm feeding {module_path(lin)!r}, "
                                 f"but the rebuilt model has {src.target} there")
            bound += bind(src, 1, attrs.get("norm_weight")) + bind(src, 2, attrs.get("norm_bias"))
        elif fold == "linear":
            producer = by_path.get(rec.get("producer", ""))
            if producer is None:
                raise ValueError(f"{name}: the artifact folded {module_path(lin)!r} into a linear "
                                 f"{rec.get('producer')!r} the rebuilt model lacks")
            bound += bind(producer, 2, attrs.get("producer_bias"), kwarg="bias")
        elif fold == "channel_scale":
            scale = attrs.get("scale")
            if scale not in state:
                raise ValueError(f"{name}: the artifact has no channel scale {scale!r} for {module_path(lin)!r}")
            scales.setdefault(scale, []).append(lin)
        bound += bind(lin, 2, attrs.get("bias"), kwarg="bias")
    for scale, group in scales.items():
        _insert_channel_scale(gm, group, scale, state[scale].clone())
        bound += 1
    return PassResult(bool(bound), {"restored_layers": len(plan), "bound": bound})


__all__ = ["AWQ", "AWQClip", "OSShift", "SmoothQuant"]
