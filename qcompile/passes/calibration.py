"""Calibration: a set of example batches, and activation statistics any pass can ask for.

The pass context owns one :class:`Calibration` (batches distinct from the trace inputs, or the
trace inputs themselves) and one :class:`StatsCache`. A pass asks
``ctx.activation_stats(gm, nodes, hessian=...)``; the cache runs the graph once over every batch
for all nodes asked at once, and keeps the result until a pass changes the graph. Statistics are
of each node's *first input* (the activation of a linear), flattened to ``[rows, features]``:

- ``max_abs``: per-channel max |x| (SmoothQuant's and outlier detection's input),
- ``mean_abs``: per-channel mean |x| (AWQ's activation magnitude),
- ``min`` / ``max``: per-channel extremes (the Outlier Suppression+ shift),
- ``hessian``: ``Σ xᵀx`` over every row (GPTQ's ``H = 2XᵀX/n``), on request only (K² floats),
- ``sample``: up to ``sample_rows`` evenly spaced rows, for measuring a layer's output error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree
from torch import fx

from qcompile.ir.interpret import flat_inputs


@dataclass
class Calibration:
    """Batches ``(args, kwargs)`` in the form the traced graph takes."""

    batches: list[tuple[tuple, dict]]
    source: str = "calibration batches"

    def __len__(self) -> int:
        return len(self.batches)


@dataclass
class ActivationStats:
    """Statistics of one activation over the calibration set (see the module docstring)."""

    rows: int
    max_abs: torch.Tensor
    mean_abs: torch.Tensor
    sample: torch.Tensor
    hessian: torch.Tensor | None = None
    min: torch.Tensor | None = None
    max: torch.Tensor | None = None


@dataclass
class _Accumulator:
    sample_rows: int
    hessian: bool
    rows: int = 0
    max_abs: torch.Tensor | None = None
    sum_abs: torch.Tensor | None = None
    xtx: torch.Tensor | None = None
    lo: torch.Tensor | None = None
    hi: torch.Tensor | None = None
    samples: list[torch.Tensor] = field(default_factory=list)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        a = x.abs()
        m, s = a.amax(0), a.sum(0)
        self.max_abs = m if self.max_abs is None else torch.maximum(self.max_abs, m)
        self.sum_abs = s if self.sum_abs is None else self.sum_abs + s
        lo, hi = x.amin(0), x.amax(0)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        if self.hessian:
            xtx = x.t().double() @ x.double()
            self.xtx = xtx if self.xtx is None else self.xtx + xtx
        self.rows += x.shape[0]
        self.samples.append(x[_evenly_spaced(x.shape[0], self.sample_rows)])

    def finish(self) -> ActivationStats:
        sample = torch.cat(self.samples)
        sample = sample[_evenly_spaced(sample.shape[0], self.sample_rows)]
        return ActivationStats(self.rows, self.max_abs, self.sum_abs / max(self.rows, 1), sample,
                               self.xtx.float() if self.xtx is not None else None, self.lo, self.hi)


def stats_of(values: list[dict[str, torch.Tensor]], *, hessian: bool, sample_rows: int) -> dict[str, ActivationStats]:
    """:class:`ActivationStats` of each name from its values, one ``{name: tensor}`` per batch (what
    ``ir.interpret.ResumableRun.advance`` returns)."""
    accs: dict[str, _Accumulator] = {}
    for batch in values:
        for name, x in batch.items():
            if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
                raise RuntimeError(f"node {name!r} (a linear's input) is not a floating-point tensor")
            accs.setdefault(name, _Accumulator(sample_rows, hessian)).add(x)
    return {name: acc.finish() for name, acc in accs.items()}


def _evenly_spaced(n: int, k: int) -> torch.Tensor:
    return torch.arange(n) if n <= k else torch.linspace(0, n - 1, k).long()


class _Capture(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, sources: dict[str, _Accumulator]):
        super().__init__(gm)
        self.sources = sources

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        acc = self.sources.get(n.name)
        if acc is not None and isinstance(out, torch.Tensor) and out.is_floating_point():
            acc.add(out)
        return out


class StatsCache:
    """Statistics by input node, valid for one graph version; see ``PassContext.activation_stats``."""

    def __init__(self) -> None:
        self._version: int | None = None
        self._by_source: dict[tuple[str, bool, int], ActivationStats] = {}
        self.captures = 0
        """How many times the graph ran over the calibration set (tests check reuse)."""

    def get(self, gm: fx.GraphModule, nodes: list[fx.Node], ctx: Any, *, hessian: bool,
            sample_rows: int) -> dict[str, ActivationStats]:
        if self._version != ctx.graph_version:
            self._version, self._by_source = ctx.graph_version, {}
        source_of = {n.name: n.args[0].name for n in nodes if isinstance(n.args[0], fx.Node)}

        def have(src: str) -> bool:
            return any(key in self._by_source for key in ((src, True, sample_rows), (src, hessian, sample_rows)))

        todo = {src for src in source_of.values() if not have(src)}
        if todo:
            self._capture(gm, todo, ctx, hessian=hessian, sample_rows=sample_rows)

        def lookup(src: str) -> ActivationStats:
            return self._by_source.get((src, hessian, sample_rows)) or self._by_source[(src, True, sample_rows)]

        return {name: lookup(src) for name, src in source_of.items()}

    def _capture(self, gm: fx.GraphModule, sources: set[str], ctx: Any, *, hessian: bool, sample_rows: int) -> None:
        accs = {s: _Accumulator(sample_rows, hessian) for s in sources}
        batches = ctx.calibration.batches
        progress = ctx.progress
        if progress is not None:
            progress.start_layers(f"calibration statistics ({len(sources)} activations, {len(batches)} batches)",
                                  len(batches))
        with torch.no_grad():
            for i, (args, kwargs) in enumerate(batches):
                try:
                    _Capture(gm, accs).run(*flat_inputs(gm, args, kwargs))
                except Exception as e:
                    shapes = [tuple(t.shape) for t in flat_inputs(gm, args, kwargs) if isinstance(t, torch.Tensor)]
                    raise ValueError(f"calibration batch {i} (input shapes {shapes}) does not fit the traced model: "
                                     f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
                if progress is not None:
                    progress.advance_layer()
        self.captures += 1
        for src, acc in accs.items():
            if acc.rows == 0:
                raise RuntimeError(f"calibration recorded no floating values for node {src!r}")
            self._by_source[(src, hessian, sample_rows)] = acc.finish()


def make_calibration(calibration: Any, example_args: tuple, example_kwargs: dict, pinned_kwargs: Mapping,
                     tokenizer: Any = None, batch_size: int = 8, max_length: int = 128) -> Calibration:
    """A :class:`Calibration` from what ``compile(calibration=...)`` accepts.

    - ``None``: the trace inputs.
    - a sequence of batches, each like ``example_inputs`` (a tensor, a tuple of arguments or a
      dict of keyword arguments, e.g. a tokenizer's output);
    - a sequence of strings, with ``tokenizer``: tokenized ``batch_size`` at a time (padded,
      truncated to ``max_length``), keeping the keyword arguments the example passed.
    """
    from qcompile.frontend.inputs import split_inputs

    if calibration is None:
        return Calibration([(example_args, example_kwargs)], source="trace inputs")
    if isinstance(calibration, Calibration):
        return calibration
    if isinstance(calibration, (str, torch.Tensor, Mapping)) or not isinstance(calibration, Sequence):
        raise TypeError("calibration must be a list of batches (each like example_inputs) or a list of texts, "
                        f"got {type(calibration).__name__}")
    if not calibration:
        raise ValueError("calibration is empty: pass at least one batch or text")
    if all(isinstance(c, str) for c in calibration):
        return _from_texts(list(calibration), example_args, example_kwargs, pinned_kwargs, tokenizer, batch_size,
                           max_length)
    if any(isinstance(c, str) for c in calibration):
        raise TypeError("calibration mixes texts and batches: pass one kind")
    batches = []
    for i, batch in enumerate(calibration):
        try:
            args, kwargs = split_inputs(batch, None)
        except TypeError as e:
            raise TypeError(f"calibration batch {i}: {e}") from e
        for j, t in enumerate(torch.utils._pytree.tree_leaves((args, kwargs))):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"calibration batch {i}: input tensor {j} contains NaN or Inf values")
        batches.append((args, {**kwargs, **pinned_kwargs}))
    return Calibration(batches, source=f"{len(batches)} calibration batches")


def _from_texts(texts: list[str], example_args: tuple, example_kwargs: dict, pinned: Mapping, tokenizer: Any,
                batch_size: int, max_length: int) -> Calibration:
    if tokenizer is None:
        raise ValueError("calibration is a list of texts: pass tokenizer= (the model's tokenizer) to tokenize them")
    keys = [k for k in example_kwargs if k not in pinned]
    if example_args and not keys:
        keys = ["input_ids"]
    elif not keys:
        raise ValueError("calibration texts need an example that passes input_ids (positionally or by keyword)")
    batches = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        missing = [k for k in keys if k not in enc]
        if missing:
            raise ValueError(f"the tokenizer does not produce {missing}, which the example inputs pass")
        if example_args:
            batches.append(((enc["input_ids"],), {k: enc[k] for k in keys if k != "input_ids"} | dict(pinned)))
        else:
            batches.append(((), {k: enc[k] for k in keys} | dict(pinned)))
    return Calibration(batches, source=f"{len(texts)} texts in {len(batches)} batches")
