"""``gptq``: Hessian-based weight quantization, layer after layer (the math is ``gptq_math``).

A :class:`~qcompile.passes.weight_quantization.WeightQuantizer` whose layers are not independent:
each layer's Hessian is captured with the layers before it already quantized, so GPTQ corrects
the error the earlier layers make as well as its own rounding. The quantized linears are grouped
by their input (Q, K and V share one activation, hence one Hessian; gate and up likewise) and
the groups run in graph order:

1. the group's Hessians ``Σ xᵀx`` are captured on the calibration set (``ctx.activation_stats``),
   with the working graph's earlier weights already replaced by their GPTQ weights;
2. every linear of the group is quantized by ``gptq_quantize`` (its result and metrics written
   like any quantizer's; ``decision.extras["gptq"]`` records damping, dead channels and the
   proxy losses of RTN and GPTQ, so the report and the artifact show them);
3. the group's float weights in the working graph (the compiler's copy, never the user's model)
   become the dequantized GPTQ weights, and ``ctx.graph_version`` is bumped, so that the next
   capture sees them.

Nothing is restored afterwards: lowering replaces those weights with the packed results. A
weight that something other than a quantized linear also reads (a tied embedding) is left as it
is. At load the results are restored from the artifact (inherited), GPTQ does not rerun.

Two options change what is fitted (docs/gptq.md): ``grid`` searches each group's scales for the
least error before GPTQ rounds to them (``clip_search_math``), and ``targets="float"`` fits each
layer to the float model's outputs instead of its own: step 1 then captures the inputs of both
models (``gptq_targets.paired_stats``), and GPTQ runs on ``gptq_math.float_target``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from qcompile.formats import QuantizedTensor, dequantize, quantization_error
from qcompile.ir.annotations import (
    LayerDecision,
    LayerResult,
    decision_of,
    set_decision,
    set_result,
)
from qcompile.ir.graph import get_attr, linear_nodes, module_path, set_attr
from qcompile.ir.interpret import ResumableRun
from qcompile.passes.base import PassContext, PassResult, register_pass
from qcompile.passes.calibration import ActivationStats, stats_of
from qcompile.passes.clip_search_math import DEFAULT_RATIOS, GridSearchInfo, search_grid
from qcompile.passes.gptq_math import GPTQInfo, float_target, gptq_quantize
from qcompile.passes.gptq_targets import PairedStats, paired_runs, paired_stats
from qcompile.passes.weight_quantization import OUTPUT_ERROR_ROWS, WeightQuantizer, output_error

TARGETS = ("quantized", "float")
"""``GPTQ(targets=...)``: what each layer's output is fitted to (the class docstring)."""
GRIDS = ("minmax", "mse", "hessian_diag", "hessian")
"""``GPTQ(grid=...)``: the min/max grid, or a searched one with that objective (``clip_search_math``)."""


@register_pass("gptq")
class GPTQ(WeightQuantizer):
    """GPTQ with blocked lazy updates, damping, activation order and static groups.

    Options (recorded in the artifact's manifest): ``block_size`` (columns per lazy-update
    block, 128), ``damp`` (relative damping: ``damp · mean(diag H)`` is added to the diagonal,
    0.01), ``act_order`` (process columns by decreasing ``diag H``, True), ``grid`` (the static
    groups' scales: ``"minmax"``, each group's extremes as round-to-nearest takes them, or an
    error-minimising clipped grid searched per row and group by ``clip_search_math.search_grid``
    with that objective: ``"mse"``, ``"hessian_diag"`` or ``"hessian"``, on the layer's Hessian as
    GPTQ sees it; docs/clip-search.md), ``grid_ratios`` (the clipping ratios searched),
    ``grid_asym_pairs`` (asymmetric formats: search the two ends of the range independently,
    ``len(grid_ratios)²`` candidates instead of one shared ratio; False),
    ``targets`` (``"quantized"``: GPTQ's own objective, each layer fitted to its outputs on the
    inputs the quantized earlier layers give it; ``"float"``: fitted to the float model's outputs,
    ``gptq_math.float_target``, with the inputs of both models captured by ``gptq_targets``),
    ``bias_correction`` (with float targets: each linear's bias becomes the least-squares bias for
    its quantized weight, ``b + W·mean(x) − Q·mean(x̃)``, so that its outputs' mean on the
    calibration rows is the float model's; linears without a bias are left so and counted; False).
    """

    method = "gptq"
    uses_calibration = True
    needs_hessian = True

    def __init__(self, block_size: int = 128, damp: float = 0.01, act_order: bool = True, grid: str = "minmax",
                 grid_ratios: Sequence[float] = DEFAULT_RATIOS, grid_asym_pairs: bool = False,
                 targets: str = "quantized", bias_correction: bool = False):
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"gptq: block_size must be an int >= 1, got {block_size!r}")
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not damp >= 0:
            raise ValueError(f"gptq: damp must be a number >= 0, got {damp!r}")
        if not isinstance(act_order, bool):
            raise ValueError(f"gptq: act_order must be True or False, got {act_order!r}")
        if grid not in GRIDS:
            raise ValueError(f"gptq: grid must be one of {', '.join(map(repr, GRIDS))}, got {grid!r}")
        ratios = tuple(float(r) for r in grid_ratios)
        if not ratios or any(not 0.0 < r <= 1.0 for r in ratios):
            raise ValueError(f"gptq: grid_ratios must be numbers in (0, 1], got {tuple(grid_ratios)!r}")
        self.block_size, self.damp, self.act_order = block_size, float(damp), act_order
        if targets not in TARGETS:
            raise ValueError(f"gptq: targets must be one of {', '.join(map(repr, TARGETS))}, got {targets!r}")
        if not isinstance(grid_asym_pairs, bool):
            raise ValueError(f"gptq: grid_asym_pairs must be True or False, got {grid_asym_pairs!r}")
        if not isinstance(bias_correction, bool):
            raise ValueError(f"gptq: bias_correction must be True or False, got {bias_correction!r}")
        if bias_correction and targets != "float":
            raise ValueError("gptq: bias_correction=True needs targets='float' (it matches the float model's mean "
                             "outputs, which only the paired capture measures)")
        self.grid, self.grid_ratios, self.grid_asym_pairs, self.targets = grid, ratios, grid_asym_pairs, targets
        self.bias_correction = bias_correction

    def options(self) -> dict[str, Any]:
        out: dict[str, Any] = {"block_size": self.block_size, "damp": self.damp, "act_order": self.act_order}
        if self.grid != "minmax":
            out.update(grid=self.grid, grid_ratios=list(self.grid_ratios), grid_asym_pairs=self.grid_asym_pairs)
        if self.targets != "quantized":
            out["targets"] = self.targets
        if self.bias_correction:
            out["bias_correction"] = True
        return out

    def static_grid(self, weight: torch.Tensor, decision: LayerDecision,
                    hessian: torch.Tensor) -> tuple[QuantizedTensor | None, GridSearchInfo | None]:
        """The searched grid of one layer (``None, None`` for ``grid="minmax"``): searched on the
        weight with its dead input channels zeroed, as GPTQ zeroes them."""
        if self.grid == "minmax":
            return None, None
        w = weight.clone()
        w[:, torch.diagonal(hessian) == 0] = 0.0
        return search_grid(w, decision.weight, objective=self.grid, hessian=hessian, ratios=self.grid_ratios,
                           asym_pairs=self.grid_asym_pairs)

    def gptq(self, weight: torch.Tensor, decision: LayerDecision,
             stats: ActivationStats | PairedStats | None) -> tuple[QuantizedTensor, GPTQInfo, GridSearchInfo | None]:
        """One layer: the static grid (:meth:`static_grid`), then ``gptq_quantize`` with this
        pass's options."""
        if stats is None or stats.hessian is None:
            raise ValueError("GPTQ needs the input Hessian of the layer (no calibration statistics)")
        hessian = stats.hessian.to(weight.device)
        grid, grid_info = self.static_grid(weight, decision, hessian)
        qt, info = gptq_quantize(weight, hessian, decision.weight, block_size=self.block_size, damp=self.damp,
                                 act_order=self.act_order, grid=grid)
        return qt, info, grid_info

    def quantize_weight(self, weight: torch.Tensor, decision: LayerDecision,
                        stats: ActivationStats | None) -> QuantizedTensor:
        """The base class's per-layer hook (layers independent, one capture): GPTQ's tensor only.
        :meth:`run` does not use it: it quantizes layer after layer and records :class:`GPTQInfo`."""
        return self.gptq(weight, decision, stats)[0]

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        todo = [(n, decision_of(n)) for n in linear_nodes(gm)]
        todo = [(n, d) for n, d in todo if d is not None and d.quantized]
        groups = _groups_by_input(todo)
        writable = _writable_weights(gm, {n for n, _ in todo})
        if ctx.progress is not None:
            ctx.progress.start_layers(f"{self.label} ({self.method.upper()})", len(todo))
        originals: dict[str, torch.Tensor] = {}  # float weights by target, before GPTQ wrote any
        biases: dict[str, fx.Node] = {}  # linear name → its bias attribute, where bias correction rewrites it
        if self.targets == "float":
            originals = {n.args[1].target: get_attr(gm, n.args[1].target) for n, _ in todo}
            if self.bias_correction:
                biases = _writable_biases(gm, [n for n, _ in todo])
                originals.update({b.target: get_attr(gm, b.target) for b in biases.values()})
        biasless = 0
        errors, ratios, input_errors, dead, captures = [], [], [], 0, 0
        wrote = False
        # one resumable run (two for float targets) carries the calibration batches through the graph
        # group by group: each group's inputs are computed once, with the earlier groups quantized
        if self.targets == "float":
            runs: tuple[ResumableRun, ...] = paired_runs(gm, originals, ctx.calibration)
        else:
            runs = (ResumableRun(gm, ctx.calibration.batches),)
        for group in groups:
            if wrote:
                ctx.graph_version += 1  # earlier weights changed: the statistics cache is stale
                wrote = False
            nodes = [n for n, _ in group]
            if self.targets == "float":
                stats: dict[str, ActivationStats | PairedStats] = dict(
                    paired_stats(gm, nodes, originals, ctx.calibration, OUTPUT_ERROR_ROWS, runs=runs))
            else:
                source_of = {n.name: n.args[0].name for n in nodes}
                by_source = stats_of(runs[0].advance(sorted(set(source_of.values()))), hessian=True,
                                     sample_rows=OUTPUT_ERROR_ROWS)
                stats = {name: by_source[src] for name, src in source_of.items()}
            captures += 1
            late = [n.name for n in nodes if runs[0].executed(n)]
            if late:  # an input came after one of these linears: their new weights must reach the next stage
                runs[0].restart_from_inputs(f"linear(s) {', '.join(late)} ran before their group's inputs were "
                                            "measured: later groups re-run the graph from the inputs")
            for node, decision in group:
                path, target = module_path(node), node.args[1].target
                weight = originals.setdefault(target, get_attr(gm, target))
                if weight.dim() != 2:
                    raise ValueError(f"linear {path}: expected a 2-D weight, got shape {tuple(weight.shape)}")
                w = weight.detach().float()
                s = stats[node.name]
                fit = w
                if isinstance(s, PairedStats):
                    fit = float_target(w, s.hessian, s.cross, self.damp)
                    input_errors.append(s.input_error)
                try:
                    qt, info, grid_info = self.gptq(fit, decision, s)
                except ValueError as e:
                    raise ValueError(f"cannot quantize weight {target!r} ({path}) as {decision.weight.short()} "
                                     f"with GPTQ: {e}") from e
                record = {"damp": info.damp, "dead_channels": info.dead_channels,
                          "proxy_loss_rtn": info.proxy_loss_rtn, "proxy_loss_gptq": info.proxy_loss_gptq}
                if isinstance(s, PairedStats):
                    record["input_error"] = s.input_error
                if self.bias_correction:
                    if node.name in biases:
                        record["bias_shift"] = _correct_bias(gm, biases[node.name], originals, w, qt, s)
                        wrote = True
                    else:
                        biasless += 1
                if grid_info is not None:
                    record["grid"] = {"objective": grid_info.objective, "error_ratio": grid_info.error_ratio,
                                      "mean_ratio_lo": grid_info.mean_ratio_lo,
                                      "mean_ratio_hi": grid_info.mean_ratio_hi,
                                      "clipped_fraction": grid_info.clipped_fraction}
                decision = decision.replace(extras={**decision.extras, self.name: record})
                set_decision(node, decision)
                err = quantization_error(w, qt)
                set_result(node, LayerResult(qt, decision.activation, self.method, float_dtype=str(weight.dtype),
                                             metrics={"weight_rel_error": err,
                                                      "output_rel_error": output_error(s.sample, w, qt,
                                                                                       decision.activation)}))
                if target in writable:
                    set_attr(gm, target, dequantize(qt).to(device=weight.device, dtype=weight.dtype))
                    wrote = True
                errors.append(err)
                ratios.append(info.loss_ratio)
                dead += info.dead_channels
                if ctx.progress is not None:
                    ctx.progress.advance_layer()
        out: dict[str, Any] = {"quantized": len(todo), "groups": len(groups), "captures": captures,
                               "dead_channels": dead}
        notes = [f"gptq calibration: {r.note}" for r in runs if r.note]
        if errors:
            out["mean_weight_rel_error"] = float(torch.tensor(errors).mean())
            out["mean_proxy_loss_ratio"] = float(torch.tensor(ratios).mean())
        if input_errors:
            out["mean_input_error"] = float(torch.tensor(input_errors).mean())
        if self.bias_correction:
            out["bias_corrected"] = len(biases)
            if biasless:
                notes.append(f"gptq bias_correction: {biasless} quantized linear(s) have no bias of their own "
                             "(or share it), left uncorrected")
        if notes:
            out["notes"] = notes
        return PassResult(bool(todo), out)


def _writable_biases(gm: fx.GraphModule, linears: list[fx.Node]) -> dict[str, fx.Node]:
    """Linear name → its bias ``get_attr`` node, for linears whose bias nothing else reads."""
    readers: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            readers[n.target] = readers.get(n.target, 0) + len(n.users)
    out = {}
    for lin in linears:
        bias = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
        if isinstance(bias, fx.Node) and bias.op == "get_attr" and readers.get(bias.target) == 1:
            out[lin.name] = bias
    return out


def _correct_bias(gm: fx.GraphModule, bias: fx.Node, originals: dict[str, torch.Tensor], weight: torch.Tensor,
                  qt: QuantizedTensor, stats: PairedStats) -> float:
    """Write ``b + W·mean(x) − Q·mean(x̃)`` as the bias; returns ``‖Δb‖ / ‖W·mean(x)‖``."""
    b = originals[bias.target]
    shift = weight.double() @ stats.mean.double().to(weight.device) - \
        dequantize(qt).double().to(weight.device) @ stats.mean_quantized.double().to(weight.device)
    set_attr(gm, bias.target, (b.double() + shift.to(b.device)).to(b.dtype))
    ref = float((weight.double() @ stats.mean.double().to(weight.device)).norm())
    return float(shift.norm()) / max(ref, 1e-30)


def _groups_by_input(todo: list[tuple[fx.Node, LayerDecision]]) -> list[list[tuple[fx.Node, LayerDecision]]]:
    """Linears sharing an input node, groups in the graph order of their first linear (a group's
    input never depends on a later group's output)."""
    groups: dict[Any, list[tuple[fx.Node, LayerDecision]]] = {}
    for node, decision in todo:
        src = node.args[0]
        groups.setdefault(src if isinstance(src, fx.Node) else node, []).append((node, decision))
    return list(groups.values())


def _writable_weights(gm: fx.GraphModule, quantized: set[fx.Node]) -> set[str]:
    """Weight targets read only as the weight of linears being quantized (safe to overwrite)."""
    readers: dict[str, list[tuple[fx.Node, fx.Node]]] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            readers.setdefault(n.target, []).extend((n, user) for user in n.users)
    return {t for t, uses in readers.items()
            if uses and all(user in quantized and user.args[1] is attr for attr, user in uses)}
