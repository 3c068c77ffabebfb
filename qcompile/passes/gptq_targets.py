"""Float targets for GPTQ: the inputs of a layer in the float model and in the quantized one, paired.

GPTQ fits each layer to its own inputs as the layers before it (already quantized) produce them,
``X̃``: it minimises ``‖X̃Wᵀ − X̃Qᵀ‖``. The model's outputs, though, should match the *float*
model's, ``XWᵀ`` with ``X`` the float model's inputs to the same layer. The least-squares problem
``min_Q ‖XWᵀ − X̃Qᵀ‖²`` equals ``tr((Q − W̃) H̃ (Q − W̃)ᵀ)`` plus a constant, with
``H̃ = X̃ᵀX̃`` and the target ``W̃ = W + W·Δ·H̃⁻¹``, ``Δ = (X − X̃)ᵀX̃``: GPTQ run on ``W̃`` (and
``H̃``) also corrects the error that the earlier layers left in this layer's input (the
"asymmetric calibration" of GPTAQ, Li et al., 2025). ``gptq_math.float_target`` is that formula
(damped like GPTQ's Hessian); this module captures ``H̃`` and ``Δ``: every calibration batch runs
through the working graph (earlier layers quantized) and through the same graph with the float
weights bound instead, and the rows of the two runs, which come from the same tokens, are paired.
Each run stops as soon as the layer inputs asked for have been recorded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from qcompile.ir.interpret import flat_inputs
from qcompile.passes.calibration import Calibration


@dataclass
class PairedStats:
    """One layer input's statistics over the calibration set, both runs.

    ``hessian``: ``Σ x̃ᵀx̃`` (the quantized model's inputs); ``cross``: ``Σ (x − x̃)ᵀ x̃``
    (``x``: the float model's inputs on the same rows); ``mean`` / ``mean_quantized``: the mean
    row of ``x`` / ``x̃``; ``sample``: up to ``sample_rows`` evenly spaced rows of ``x̃`` (for the
    layer's output error in the report); ``input_error``: ``‖X − X̃‖ / ‖X‖`` over every row.
    """

    rows: int
    hessian: torch.Tensor
    cross: torch.Tensor
    mean: torch.Tensor
    mean_quantized: torch.Tensor
    sample: torch.Tensor
    input_error: float


def _evenly_spaced(n: int, k: int) -> torch.Tensor:
    return torch.arange(n) if n <= k else torch.linspace(0, n - 1, k).long()


class _Stop(Exception):
    """Every input asked for has been recorded for this batch."""


class _Run(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, sources: set[str], weights: Mapping[str, torch.Tensor] | None):
        super().__init__(gm)
        self.sources, self.weights = sources, weights
        self.seen: dict[str, torch.Tensor] = {}

    def fetch_attr(self, target: str) -> Any:
        if self.weights is not None and target in self.weights:
            return self.weights[target]
        return super().fetch_attr(target)

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.sources:
            if not (isinstance(out, torch.Tensor) and out.is_floating_point()):
                raise RuntimeError(f"node {n.name!r} (a linear's input) is not a floating-point tensor")
            self.seen[n.name] = out.detach().reshape(-1, out.shape[-1]).float()
            if len(self.seen) == len(self.sources):
                raise _Stop
        return out


def _inputs_of(gm: fx.GraphModule, args: tuple, kwargs: dict, sources: set[str],
               weights: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    run = _Run(gm, sources, weights)
    with contextlib.suppress(_Stop):
        run.run(*flat_inputs(gm, args, kwargs))
    missing = sources - set(run.seen)
    if missing:
        raise RuntimeError(f"calibration recorded no values for node(s) {', '.join(sorted(missing))}")
    return run.seen


def paired_stats(gm: fx.GraphModule, nodes: list[fx.Node], float_weights: Mapping[str, torch.Tensor],
                 calibration: Calibration, sample_rows: int = 256) -> dict[str, PairedStats]:
    """:class:`PairedStats` of each linear in ``nodes`` (keyed by node name; linears reading one
    input share it): ``gm`` as it is (earlier layers quantized) against ``gm`` with
    ``float_weights`` (attribute target → float tensor) bound in their place."""
    source_of = {n.name: n.args[0].name for n in nodes if isinstance(n.args[0], fx.Node)}
    sources = set(source_of.values())
    acc: dict[str, dict[str, Any]] = {s: {"rows": 0, "h": None, "c": None, "sx": 0.0, "sxq": 0.0, "samples": [],
                                          "err": 0.0, "ref": 0.0} for s in sources}
    with torch.no_grad():
        for i, (args, kwargs) in enumerate(calibration.batches):
            try:
                quant = _inputs_of(gm, args, kwargs, sources, None)
                ref = _inputs_of(gm, args, kwargs, sources, float_weights)
            except Exception as e:
                raise ValueError(f"calibration batch {i} does not run through the graph: {type(e).__name__}: {e}") from e
            for src in sources:
                xq, x = quant[src], ref[src]
                a = acc[src]
                h = xq.t().double() @ xq.double()
                c = (x - xq).t().double() @ xq.double()
                a["h"] = h if a["h"] is None else a["h"] + h
                a["c"] = c if a["c"] is None else a["c"] + c
                a["sx"] = a["sx"] + x.double().sum(0)
                a["sxq"] = a["sxq"] + xq.double().sum(0)
                a["rows"] += xq.shape[0]
                a["err"] += float((x - xq).double().pow(2).sum())
                a["ref"] += float(x.double().pow(2).sum())
                a["samples"].append(xq[_evenly_spaced(xq.shape[0], sample_rows)])
    out = {}
    for src, a in acc.items():
        sample = torch.cat(a["samples"])
        rows = max(a["rows"], 1)
        out[src] = PairedStats(a["rows"], a["h"].float(), a["c"].float(), (a["sx"] / rows).float(),
                               (a["sxq"] / rows).float(), sample[_evenly_spaced(sample.shape[0], sample_rows)],
                               (a["err"] / max(a["ref"], 1e-30)) ** 0.5)
    return {name: out[src] for name, src in source_of.items()}
