"""``clip_search``: round-to-nearest on an error-minimising grid (the math is ``clip_search_math``).

A :class:`~qcompile.passes.weight_quantization.WeightQuantizer`: for every quantized linear, the
per-row, per-group clipping of the weight range whose quantized group has the least error
(``objective``: ``"mse"`` the weight error, needs no calibration; ``"hessian_diag"`` /
``"hessian"`` the error weighted by the layer input's Hessian, from the calibration set), then
the weight rounded to that grid. The result is an ordinary ``QuantizedTensor`` whose scales and
zero points are the chosen grid, so lowering, the kernels, ONNX export and artifacts see nothing
new; ``decision.extras["clip_search"]`` records the objective, the error against the min/max grid
and the mean clipping ratios. At load the results come from the artifact (inherited): the search
does not rerun. GPTQ takes the same search as its ``grid`` option (``passes/gptq.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from qcompile.formats import QuantizedTensor
from qcompile.ir.annotations import LayerDecision, decision_of, result_of, set_decision
from qcompile.ir.graph import linear_nodes
from qcompile.passes.base import PassContext, PassResult, register_pass
from qcompile.passes.calibration import ActivationStats
from qcompile.passes.clip_search_math import DEFAULT_RATIOS, OBJECTIVES, GridSearchInfo, search_grid
from qcompile.passes.weight_quantization import WeightQuantizer


@register_pass("clip_search")
class ClipSearch(WeightQuantizer):
    """Round-to-nearest on the per-group grid that minimises ``objective`` over ``ratios``.

    Options (recorded in the manifest): ``objective`` (``"mse"``, ``"hessian_diag"``,
    ``"hessian"``; default ``"mse"``), ``ratios`` (clipping ratios of the group's range, 1.0 …
    0.5), ``asym_pairs`` (asymmetric integers: search the low and high ends independently,
    ``len(ratios)²`` candidates, instead of one ratio for both; False).
    """

    method = "rtn-clip"
    label = "clip search"
    runs_after = ("assign_quant_specs", "fold_norm_scales", "rotate_residual", "rotate_heads", "rotate_online",
                  "os_shift", "smooth_quant", "awq", "awq_clip")
    """The exact rewrites and clipping that change the weights it rounds come first."""

    def __init__(self, objective: str = "mse", ratios: Sequence[float] = DEFAULT_RATIOS, asym_pairs: bool = False):
        if objective not in OBJECTIVES:
            raise ValueError(f"clip_search: objective must be one of {', '.join(map(repr, OBJECTIVES))}, "
                             f"got {objective!r}")
        values = tuple(float(r) for r in ratios)
        if not values or any(not 0.0 < r <= 1.0 for r in values):
            raise ValueError(f"clip_search: ratios must be numbers in (0, 1], got {tuple(ratios)!r}")
        if not isinstance(asym_pairs, bool):
            raise ValueError(f"clip_search: asym_pairs must be True or False, got {asym_pairs!r}")
        self.objective, self.ratios, self.asym_pairs = objective, values, asym_pairs
        self.needs_hessian = objective != "mse"
        self.uses_calibration = objective != "mse"
        self._infos: dict[int, GridSearchInfo] = {}

    def options(self) -> dict[str, Any]:
        return {"objective": self.objective, "ratios": list(self.ratios), "asym_pairs": self.asym_pairs}

    def search(self, weight: torch.Tensor, decision: LayerDecision,
               stats: ActivationStats | None) -> tuple[QuantizedTensor, GridSearchInfo]:
        """One layer: :func:`search_grid` with this pass's options."""
        hessian = None
        if self.needs_hessian:
            if stats is None or stats.hessian is None:
                raise ValueError(f"objective {self.objective!r} needs the layer's input Hessian (no calibration "
                                 "statistics)")
            hessian = stats.hessian.to(weight.device)
        return search_grid(weight, decision.weight, objective=self.objective, hessian=hessian, ratios=self.ratios,
                           asym_pairs=self.asym_pairs)

    def quantize_weight(self, weight: torch.Tensor, decision: LayerDecision,
                        stats: ActivationStats | None) -> QuantizedTensor:
        qt, info = self.search(weight, decision, stats)
        self._infos[id(qt)] = info
        return qt

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        self._infos = {}
        result = super().run(gm, ctx)
        ratios = []
        for node in linear_nodes(gm):
            decision, res = decision_of(node), result_of(node)
            if decision is None or res is None or id(res.weight) not in self._infos:
                continue
            info = self._infos[id(res.weight)]
            ratios.append(info.error_ratio)
            set_decision(node, decision.replace(extras={**decision.extras, self.name: {
                "objective": info.objective, "error_ratio": info.error_ratio, "mean_ratio_lo": info.mean_ratio_lo,
                "mean_ratio_hi": info.mean_ratio_hi, "clipped_fraction": info.clipped_fraction}}))
        self._infos = {}
        if ratios:
            result.stats["objective"] = self.objective
            result.stats["mean_error_ratio"] = float(torch.tensor(ratios).mean())
        return result
