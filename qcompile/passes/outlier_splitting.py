"""Outlier splitting: the few channels or weights that quantize badly are computed another way.

Three methods (the math and formulas: ``outlier_splitting_math.py``, ``docs/outlier-splitting.md``)
in two passes, because everything is decided and selected *before* the weight is quantized and one
method also needs the quantized weight:

- ``split_outliers`` (:class:`OutlierSplit`), after ``assign_quant_specs`` and everything that
  rewrites activations or weights (norm folding, rotations, smoothing, AWQ scales, mixed
  precision), before every weight quantizer. It rewrites the layer ``y = x Wᵀ + b``:

  - ``llm_int8``: ``y = lin(zero_columns(x, I), W_d) + outlier_columns(x, I, W[:, I])`` (``W_d``:
    the columns ``I`` zeroed; ``W[:, I]`` in float16);
  - ``sparse``: ``y = lin(x, W − S) + sparse_residual(x, S)`` (``S`` in float16 CSR);
  - ``residual_channels``: ``y = lin(x[..., P], W[:, P])``, ``P`` moving the outlier channels last;

  so the quantizer (RTN, GPTQ, clip search) quantizes the dense part on the statistics of what it
  really reads. Exact up to the float16 rounding of the kept weights.
- ``residual_channels`` (:class:`ResidualChannels`), after the quantizer, before ``lower``: the
  last ``c'`` channels get ``c'`` extra K channels (``cat([x_p, tail])``; the tail is
  ``qcompile::activation_residual`` for activation-quantized layers, a slice of ``x_p`` for
  weight-only ones) and the result's weight becomes the ``[N, K + c']`` one, so one
  ``qcompile::quantized_linear`` computes the correction. Weight-only layers need the float weight
  the quantizer rounded: a quantizer that wrote its dequantized weight back (GPTQ) is an error.

Rules, per linear with a quantized decision: the split is the decision's
``extras["outlier_split"]`` if it has one (the mixed-precision solver's choice, a user pass),
else the first ``layers`` glob of ``split_outliers``' options matching the module path (``None``:
no split), else its ``method`` option (``None``: only decided layers split). Bad values (channels ≤
0 or > K, a fraction outside (0, 1), residual channels on a format without groups dividing K)
raise an :class:`OutlierSplitError` naming the layer and the value; a ``layers`` glob that matches
no layer warns; ``lower`` refuses a decision whose split no pass applied. What the passes selected
(channel indices, nnz, padded channels, attribute names, the form, extra bytes) goes into the
split's extras; at load both re-create their structure from it, binding the artifact's tensors
(``restore``), never reselecting on the rebuilt model's weights.
"""

from __future__ import annotations

import fnmatch
import warnings
from typing import Any

import torch
from torch import fx

from qcompile.codegen.outlier_ops import (
    ACTIVATION_RESIDUAL,
    OUTLIER_COLUMNS,
    SPARSE_RESIDUAL,
    ZERO_COLUMNS,
)
from qcompile.formats import dequantize, fake_quantize
from qcompile.ir.annotations import decision_of, result_of, set_decision
from qcompile.ir.graph import (
    MODULE_PATH,
    add_get_attr,
    get_attr,
    linear_nodes,
    module_path,
    set_attr,
)
from qcompile.passes.base import OnLoad, Pass, PassContext, PassResult, register_pass
from qcompile.passes.mixed_precision_options import PrecisionOption, register_extras
from qcompile.passes.outlier_splitting_math import (
    DEFAULT_SPARSE_FRACTION,
    SPLIT_KEY,
    OutlierSplitError,
    activation_residual_columns,
    augment_weight,
    channel_order,
    check_csr,
    llm_int8_split,
    outlier_split_extra_bytes,
    outlier_split_extra_work,
    padded_channels,
    sparse_count,
    sparse_split,
    split_layer_output,
    split_of,
    top_channels,
    validate_split,
    weight_residual_columns,
)

_ADD = torch.ops.aten.add.Tensor
_INDEX_SELECT = torch.ops.aten.index_select.default
_CAT = torch.ops.aten.cat.default
_SLICE = torch.ops.aten.slice.Tensor
QUANTIZERS = ("quantize_weights", "gptq", "clip_search")
"""The weight quantizers ``split_outliers`` precedes and ``residual_channels`` follows."""


def _record(node: fx.Node, split: dict[str, Any]) -> None:
    d = decision_of(node)
    set_decision(node, d.replace(extras={**d.extras, SPLIT_KEY: split}))


def _call(gm: fx.GraphModule, like: fx.Node, target: Any, args: tuple) -> fx.Node:
    """A call inserted before ``like`` that reports as ``like``'s layer (its module path)."""
    with gm.graph.inserting_before(like):
        node = gm.graph.call_function(target, args)
    node.meta[MODULE_PATH] = module_path(like)
    if "nn_module_stack" in like.meta:
        node.meta["nn_module_stack"] = like.meta["nn_module_stack"]
    return node


def _bind(gm: fx.GraphModule, name: str, value: torch.Tensor, before: fx.Node) -> fx.Node:
    """A get_attr of ``value`` under exactly ``name`` (at load: the name the artifact recorded)."""
    set_attr(gm, name, value)
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(name)


def _add_after(gm: fx.GraphModule, lin: fx.Node, residual: fx.Node) -> None:
    """``lin``'s users read ``lin + residual`` instead."""
    with gm.graph.inserting_after(lin):
        total = gm.graph.call_function(_ADD, (lin, residual))
    total.meta[MODULE_PATH] = module_path(lin)
    lin.replace_all_uses_with(total, delete_user_cb=lambda user: user is not total)


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@register_pass("split_outliers")
class OutlierSplit(Pass):
    """Every split's selection and rewrite before the quantizer (module docstring).

    ``method``: ``"llm_int8"``, ``"sparse"``, ``"residual_channels"`` or ``None`` (only layers whose
    decision or ``layers`` glob says so); ``channels``: kept (LLM.int8) or residual channels per
    layer (8); ``fraction``: the sparse share of the weights (0.5 %); ``layers``: ``{glob: split
    dict or None}``, first match wins. Residual channels also need ``residual_channels`` after the
    quantizer.
    """

    runs_after = ("assign_quant_specs", "fold_norm_scales", "rotate_residual", "rotate_heads", "rotate_online",
                  "smooth_quant", "awq", "os_shift", "mixed_precision")
    runs_before = ("awq_clip", *QUANTIZERS, "residual_channels", "lower")
    requires = ("quant_decisions",)
    methods = ("llm_int8", "sparse", "residual_channels")
    """The ``method`` values it selects (all three; residual channels are finished after the quantizer)."""

    exact = False
    uses_calibration = True
    on_load = OnLoad.RESTORE
    def __init__(self, method: str | None = None, channels: int = 8, fraction: float = DEFAULT_SPARSE_FRACTION,
                 layers: dict[str, dict[str, Any] | None] | None = None):
        if method is not None and method not in self.methods:
            raise ValueError(f"pass {self.name!r} applies {', '.join(self.methods)}, not method={method!r}")
        self.method, self.channels, self.fraction = method, channels, fraction
        self.layers = dict(layers or {})
        for pattern, split in self.layers.items():
            if split is not None and split.get("method") not in self.methods:
                raise ValueError(f"pass {self.name!r}: layers[{pattern!r}] has method {split.get('method')!r}; this "
                                 f"pass applies {', '.join(self.methods)}")

    def options(self) -> dict[str, Any]:
        """The constructor options, recorded in the manifest."""
        return {"method": self.method, "channels": self.channels, "fraction": self.fraction, "layers": self.layers}

    def _default(self) -> dict[str, Any] | None:
        if self.method is None:
            return None
        if self.method == "sparse":
            return {"method": "sparse", "fraction": self.fraction}
        return {"method": self.method, "channels": self.channels}

    def plan(self, gm: fx.GraphModule) -> list[tuple[fx.Node, dict[str, Any]]]:
        """``(linear, validated split)`` for every quantized linear this pass splits."""
        todo, matched = [], set()
        for node in linear_nodes(gm):
            d = decision_of(node)
            if d is None or not d.quantized:
                continue
            path = module_path(node)
            split = d.extras.get(SPLIT_KEY)
            if split is None:
                pattern = next((p for p in self.layers if fnmatch.fnmatchcase(path, p)), None)
                if pattern is not None:
                    matched.add(pattern)
                    split = self.layers[pattern]
                else:
                    split = self._default()
            if split is None or split.get("method") not in self.methods:
                continue
            n, k = get_attr(gm, node.args[1].target).shape
            todo.append((node, validate_split(split, path, n, k)))
        for pattern in self.layers:
            if pattern not in matched and not any(fnmatch.fnmatchcase(module_path(n), pattern) for n, _ in todo):
                warnings.warn(f"{self.name}: layers pattern {pattern!r} matches no quantized layer", stacklevel=3)
        return todo

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Select each planned layer's channels or weights from one calibration capture, rewrite the
        graph around it and record the selection in its decision."""
        todo = self.plan(gm)
        stats = ctx.activation_stats(gm, [n for n, _ in todo]) if todo else {}
        counts = {"llm_int8": 0, "sparse": 0, "residual_channels": 0}
        extra = 0
        for node, split in todo:
            path = module_path(node)
            weight = get_attr(gm, node.args[1].target).detach()
            try:
                if split["method"] == "llm_int8":
                    split = self._llm_int8(gm, node, split, weight, stats[node.name].max_abs, path)
                elif split["method"] == "sparse":
                    split = self._sparse(gm, node, split, weight, stats[node.name].mean_abs, path)
                else:
                    split = self._reorder(gm, node, split, weight, stats[node.name].max_abs, path)
            except OutlierSplitError as e:
                if f"layer {path!r}" in str(e):
                    raise
                raise OutlierSplitError(f"layer {path!r}: {e}") from e
            _record(node, split)
            counts[split["method"]] += 1
            extra += split["extra_bytes"]
        return PassResult(bool(todo), {**counts, "extra_bytes": extra})

    def _llm_int8(self, gm: fx.GraphModule, lin: fx.Node, split: dict[str, Any], weight: torch.Tensor,
                  max_abs: torch.Tensor, path: str) -> dict[str, Any]:
        index = top_channels(max_abs, split["channels"])
        dense, kept = llm_int8_split(weight.float(), index)
        x = lin.args[0]
        base = path or "root"
        idx = add_get_attr(gm, f"{base}.outlier_index", index, before=lin)
        cols = add_get_attr(gm, f"{base}.outlier_weight", kept, before=lin)
        w_d = add_get_attr(gm, f"{lin.args[1].target}_dense", dense.to(weight.dtype), before=lin)
        x_d = _call(gm, lin, ZERO_COLUMNS, (x, idx))
        residual = _call(gm, lin, OUTLIER_COLUMNS, (x, idx, cols))
        lin.args = (x_d, w_d, *lin.args[2:])
        _add_after(gm, lin, residual)
        n = weight.shape[0]
        share = float(max_abs[index.long()].pow(2).sum() / max_abs.pow(2).sum().clamp_min(1e-30))
        return {**split, "index": index.tolist(), "attrs": {"index": idx.target, "weight": cols.target},
                "max_abs_kept_min": float(max_abs[index.long()].min()), "max_abs_share": share,
                "side_bytes": _nbytes(index, kept),
                "extra_bytes": outlier_split_extra_bytes(split, n, weight.shape[1])}

    def _sparse(self, gm: fx.GraphModule, lin: fx.Node, split: dict[str, Any], weight: torch.Tensor,
                mean_abs: torch.Tensor, path: str) -> dict[str, Any]:
        n, k = weight.shape
        fraction = split.get("fraction", DEFAULT_SPARSE_FRACTION)
        nnz = sparse_count(fraction, n, k)
        dense, crow, cols, values = sparse_split(weight.float(), decision_of(lin).weight, mean_abs, nnz)
        check_csr(crow, cols, values, n, k, path)
        base = path or "root"
        r = add_get_attr(gm, f"{base}.sparse_crow", crow, before=lin)
        c = add_get_attr(gm, f"{base}.sparse_cols", cols, before=lin)
        v = add_get_attr(gm, f"{base}.sparse_values", values, before=lin)
        w_d = add_get_attr(gm, f"{lin.args[1].target}_dense", dense.to(weight.dtype), before=lin)
        residual = _call(gm, lin, SPARSE_RESIDUAL, (lin.args[0], r, c, v, n))
        lin.args = (lin.args[0], w_d, *lin.args[2:])
        _add_after(gm, lin, residual)
        return {**split, "fraction": fraction, "nnz": nnz, "rows_touched": int((crow.diff() > 0).sum()),
                "attrs": {"crow": r.target, "cols": c.target, "values": v.target},
                "side_bytes": _nbytes(crow, cols, values), "extra_bytes": outlier_split_extra_bytes(split, n, k)}

    def _reorder(self, gm: fx.GraphModule, lin: fx.Node, split: dict[str, Any], weight: torch.Tensor,
                 max_abs: torch.Tensor, path: str) -> dict[str, Any]:
        """Residual channels, first half: the outlier channels moved last (exact)."""
        n, k = weight.shape
        padded = padded_channels(split["channels"], decision_of(lin).weight, k, path)
        index = top_channels(max_abs, split["channels"])
        order = channel_order(index, k)
        base = path or "root"
        o = add_get_attr(gm, f"{base}.channel_order", order, before=lin)
        w_p = add_get_attr(gm, f"{lin.args[1].target}_reordered", weight[:, order.long()].contiguous(), before=lin)
        lin.args = (_call(gm, lin, _INDEX_SELECT, (lin.args[0], -1, o)), w_p, *lin.args[2:])
        return {**split, "index": index.tolist(), "padded_channels": padded, "attrs": {"order": o.target},
                "side_bytes": _nbytes(order), "extra_bytes": outlier_split_extra_bytes(
                    split, n, k, weight_spec=decision_of(lin).weight)}

    def restore(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """At load: the same rewrite from the recorded selection, bound to the artifact's tensors."""
        state = ctx.artifact.state
        restored = 0
        for lin in linear_nodes(gm):
            d = decision_of(lin)
            split = d.extras.get(SPLIT_KEY) if d is not None else None
            if not split or split.get("method") not in self.methods:
                continue
            path = module_path(lin)
            tensors = {}
            for role, name in split.get("attrs", {}).items():
                if name not in state:
                    raise OutlierSplitError(f"layer {path!r}: the artifact has no tensor {name!r} "
                                            f"({split['method']} {role})")
                tensors[role] = _bind(gm, name, state[name].clone(), before=lin)
            restored += 1
            if split["method"] == "residual_channels":
                lin.args = (_call(gm, lin, _INDEX_SELECT, (lin.args[0], -1, tensors["order"])), *lin.args[1:])
                continue
            if split["method"] == "llm_int8":
                x = lin.args[0]
                x_d = _call(gm, lin, ZERO_COLUMNS, (x, tensors["index"]))
                residual = _call(gm, lin, OUTLIER_COLUMNS, (x, tensors["index"], tensors["weight"]))
                lin.args = (x_d, *lin.args[1:])
            else:
                n, k = get_attr(gm, lin.args[1].target).shape
                check_csr(*(state[split["attrs"][role]] for role in ("crow", "cols", "values")), n, k, path)
                residual = _call(gm, lin, SPARSE_RESIDUAL, (lin.args[0], tensors["crow"], tensors["cols"],
                                                            tensors["values"], n))
            _add_after(gm, lin, residual)
        return PassResult(bool(restored), {"restored": restored})


@register_pass("residual_channels")
class ResidualChannels(Pass):
    """Residual channels, second half (ARCQuant; module docstring): after the quantizer, the last
    ``c'`` channels ``split_outliers`` moved there get ``c'`` extra K channels. Activation-quantized
    layers carry the activation's residual (``qcompile::activation_residual``) against duplicated
    weight columns, weight-only layers the weight's residual against duplicated activation columns;
    the result's weight becomes the ``[N, K + c']`` one. No options: what to split was decided and
    selected before the quantizer."""

    exact = False
    uses_calibration = True
    on_load = OnLoad.RESTORE
    runs_after = ("assign_quant_specs", "split_outliers", "awq_clip", *QUANTIZERS)
    runs_before = ("lower",)
    requires = ("quant_results",)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Widen every reordered residual-channels layer: extra activation channels in the graph, the
        ``[N, K + c']`` weight in its result, the layer's output error re-measured with them."""
        from qcompile.codegen.quantized_linear import reference_quantized_linear

        todo = []
        for lin in linear_nodes(gm):
            d, result = decision_of(lin), result_of(lin)
            split = d.extras.get(SPLIT_KEY) if d is not None else None
            if not split or split.get("method") != "residual_channels" or result is None or result.weight is None:
                continue
            if "index" not in split:
                raise OutlierSplitError(f"layer {module_path(lin)!r}: residual_channels needs 'split_outliers' before "
                                        "the weight quantizer (it moves the outlier channels last)")
            todo.append((lin, split))
        stats = ctx.activation_stats(gm, [n for n, _ in todo]) if todo else {}
        extra = 0
        for lin, split in todo:
            path = module_path(lin)
            result = result_of(lin)
            qt, act = result.weight, result.activation
            weight = get_attr(gm, lin.args[1].target).detach().float()
            n, k = weight.shape
            padded = split["padded_channels"]
            form = "activation" if act is not None else "weight"
            if form == "weight":
                if torch.equal(dequantize(qt), weight):
                    raise OutlierSplitError(
                        f"layer {path!r}: weight-only residual channels need the float weight the quantizer rounded, "
                        f"but the graph holds the dequantized weight ({result.method} wrote it back): no residual is "
                        "left; use quantize_weights or clip_search with residual_channels")
                columns = weight_residual_columns(weight, qt, padded)
            else:
                columns = activation_residual_columns(qt, padded)
            aug = augment_weight(qt, columns)
            x = lin.args[0]
            tail = self._tail(gm, lin, x, k - padded, k, act)
            wide = add_get_attr(gm, f"{lin.args[1].target}_widened",
                                torch.cat([weight, weight.new_zeros(n, padded)], 1).to(
                                    get_attr(gm, lin.args[1].target).dtype), before=lin)
            lin.args = (_call(gm, lin, _CAT, ([x, tail], -1)), wide, *lin.args[2:])
            sample = stats[lin.name].sample
            ref = sample @ weight.t()
            extra_cols = sample[:, k - padded:] if act is None else (sample - fake_quantize(sample, act))[:, k - padded:]
            out = reference_quantized_linear(torch.cat([sample, extra_cols], 1), aug, None, act)
            before = result.metrics.get("output_rel_error")
            result.metrics["output_rel_error"] = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
            result.weight = aug
            record = {**split, "form": form, "output_rel_error_without": before,
                      "extra_bytes": aug.nbytes() - qt.nbytes() + split["side_bytes"]}
            _record(lin, record)
            extra += record["extra_bytes"]
        return PassResult(bool(todo), {"residual_channels": len(todo), "extra_bytes": extra})

    @staticmethod
    def _tail(gm: fx.GraphModule, lin: fx.Node, x: fx.Node, start: int, stop: int, act: Any) -> fx.Node:
        if act is None:
            return _call(gm, lin, _SLICE, (x, -1, start, stop))
        return _call(gm, lin, ACTIVATION_RESIDUAL, (x, start, act.encode()))

    def restore(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """At load: the extra activation channels again (the widened weight is the restored result)."""
        restored = 0
        for lin in linear_nodes(gm):
            d = decision_of(lin)
            split = d.extras.get(SPLIT_KEY) if d is not None else None
            if not split or split.get("method") != "residual_channels" or "form" not in split:
                continue
            k = get_attr(gm, lin.args[1].target).shape[1]
            x = lin.args[0]
            act = d.activation if split["form"] == "activation" else None
            tail = self._tail(gm, lin, x, k - split["padded_channels"], k, act)
            lin.args = (_call(gm, lin, _CAT, ([x, tail], -1)), *lin.args[1:])
            restored += 1
        return PassResult(bool(restored), {"restored": restored})


def _option_bytes(option: PrecisionOption, rows: int, k: int) -> int:
    return outlier_split_extra_bytes(option.extras, rows, k, weight_spec=option.weight)


def _option_seconds(option: PrecisionOption, rows: int, k: int, tokens: int, target: Any) -> float:
    flops, moved, operand = outlier_split_extra_work(option.extras, rows, k, tokens, weight_spec=option.weight)
    return target.matmul_seconds(flops, moved, operand) if flops or moved else 0.0


def _option_forward(weight: torch.Tensor, stats: Any, option: PrecisionOption):
    if stats is None:
        raise ValueError(f"option {option.name}: outlier splits select channels from calibration statistics, "
                         "and the layer has none")
    split = split_of(option.extras)

    def product(x: torch.Tensor) -> torch.Tensor:
        y = split_layer_output(x.reshape(-1, x.shape[-1]), weight, option.weight, option.activation, split,
                               stats.max_abs, stats.mean_abs)
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)

    return product


register_extras(SPLIT_KEY, _option_bytes, _option_seconds, _option_forward)
"""Mixed precision can choose a split (an option whose ``extras`` carry ``outlier_split``): its bytes,
its time on the target and its product (round-to-nearest, the passes' selection) come from here."""

__all__ = ["QUANTIZERS", "OutlierSplit", "ResidualChannels"]
