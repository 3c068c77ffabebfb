"""Error-minimising quantization grids, with no FX and no pass machinery: ``search_grid``.

Round-to-nearest takes each group's grid from its extremes (``max|w|`` for symmetric formats,
``[min, max]`` for asymmetric integers). One large weight then stretches the grid of its whole
group, and the other weights of the group are rounded coarsely. Clipping the range trades a larger
error on the few extreme weights for a smaller one on all the others. This module searches, per
output row and quantization group, the clipping of the range whose quantized group has the least
error (as in the GPTQ reference code's ``mse`` option, llama.cpp's quantizers and AWQ's clip
search):

- candidates: the group's range scaled by ``r`` for every ``r`` in ``ratios`` (symmetric:
  ``±r·max|w|``; asymmetric integers: ``[r·min, r·max]``, or ``[r_lo·min, r_hi·max]`` for every
  pair of ratios with ``asym_pairs=True``). Each candidate grid is the one the formats
  library's own ``quantize`` derives from the clipped group (so the scale is rounded to its stored
  dtype and an asymmetric zero point is an integer: every candidate is a grid the format stores);
- objectives, per row ``n`` and group ``g`` with ``d = w − Q(w)`` on the group's columns:
  ``"mse"`` ``Σ d²`` (the weight error); ``"hessian_diag"`` ``Σ_j H_jj d_j²`` (llama.cpp's
  importance-weighted error); ``"hessian"`` ``d H_gg dᵀ`` with ``H_gg`` the group's diagonal block
  of the input Hessian ``H = Σ xᵀx`` (the group's share of the layer's squared output error on the
  calibration rows, ignoring the cross-group terms of ``H``).

The result is an ordinary ``QuantizedTensor`` (round-to-nearest on the chosen grid, the canonical
layout); its scales and zero points are the chosen grid, which GPTQ can then use as its static
groups (``gptq_quantize(..., grid=qt)``). Only grid-based formats are searched: int and plain fp
formats with per-group or per-channel scales (NVFP4's and MX's block scales are not: ``ValueError``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from qcompile.formats import QuantizedTensor, QuantSpec, dequantize, fake_quantize, quantize
from qcompile.formats.fixed_grid import FixedGrid
from qcompile.formats.spec import FLOAT_FORMATS, INT_FORMATS

OBJECTIVES = ("mse", "hessian_diag", "hessian")
"""What :func:`search_grid` minimises per row and group (module docstring)."""

DEFAULT_RATIOS = tuple(round(1.0 - 0.025 * i, 3) for i in range(21))
"""1.0, 0.975, … 0.5: clipping up to half of the group's range."""

CANDIDATE_ELEMENTS = 1 << 23
"""Candidates are evaluated together up to this many weight elements at a time."""


@dataclass(frozen=True)
class GridSearchInfo:
    """What one :func:`search_grid` call chose.

    ``objective``; ``error_minmax`` / ``error``: the objective summed over the whole weight for the
    min/max grid (``quantize``'s own) and for the chosen one (same units, compare them with each
    other); ``mean_ratio_lo`` / ``mean_ratio_hi``: mean clipping ratio of the low and high ends
    (symmetric formats: equal); ``clipped_fraction``: groups whose grid is not the min/max one.
    """

    objective: str
    error_minmax: float
    error: float
    mean_ratio_lo: float
    mean_ratio_hi: float
    clipped_fraction: float

    @property
    def error_ratio(self) -> float:
        """``error / error_minmax`` (1.0 when the min/max grid is exact)."""
        return self.error / self.error_minmax if self.error_minmax > 0 else 1.0

    def to_dict(self) -> dict:
        """The fields as a plain dict (JSON values)."""
        return asdict(self)


def _check(weight: torch.Tensor, spec: QuantSpec, objective: str, hessian: torch.Tensor | None,
           ratios: Sequence[float]) -> None:
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [N, K], got shape {tuple(weight.shape)}")
    if spec.format not in INT_FORMATS + FLOAT_FORMATS:
        raise ValueError(f"grid search needs a format with free per-group scales (int or fp8/fp4 with scales), "
                         f"not {spec.format!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
    k = weight.shape[1]
    if objective != "mse":
        if hessian is None:
            raise ValueError(f"objective {objective!r} needs the input Hessian of the layer")
        if tuple(hessian.shape) != (k, k):
            raise ValueError(f"the Hessian has shape {tuple(hessian.shape)}, a weight with K={k} needs ({k}, {k})")
        if not bool(torch.isfinite(hessian).all()):
            raise ValueError("the Hessian contains NaN or Inf")
    if not ratios or any(not 0.0 < float(r) <= 1.0 for r in ratios):
        raise ValueError(f"ratios must be a non-empty sequence of numbers in (0, 1], got {tuple(ratios)!r}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("the weight contains NaN or Inf")


def _group_errors(d: torch.Tensor, objective: str, hdiag: torch.Tensor | None,
                  hblocks: torch.Tensor | None) -> torch.Tensor:
    """Per-group objective of differences ``d [C, N, G, g]`` → ``[C, N, G]``."""
    if objective == "mse":
        return d.pow(2).sum(-1)
    if objective == "hessian_diag":
        return (d.pow(2) * hdiag).sum(-1)
    return torch.einsum("cngi,gij,cngj->cng", d, hblocks, d)


def search_grid(weight: torch.Tensor, spec: QuantSpec, *, objective: str = "mse",
                hessian: torch.Tensor | None = None, ratios: Sequence[float] = DEFAULT_RATIOS,
                asym_pairs: bool = False) -> tuple[QuantizedTensor, GridSearchInfo]:
    """The grid (per row and group) minimising ``objective`` over the clipping ``ratios``, and
    ``weight`` rounded to it.

    ``weight [N, K]``; ``hessian [K, K]`` (``Σ xᵀx`` of the layer's input) for the ``hessian*``
    objectives. Returns a ``QuantizedTensor`` of ``spec`` whose scales (and zero points) are the
    chosen grid and whose codes are ``weight`` rounded to it, and a :class:`GridSearchInfo`.
    The ratio 1.0 (the min/max grid) is always a candidate, so the objective never gets worse
    than ``quantize``'s. Raises ``ValueError`` for shapes, formats or options that do not fit.
    """
    ratios = tuple(sorted({float(r) for r in ratios} | {1.0}, reverse=True))
    _check(weight, spec, objective, hessian, ratios)
    w = weight.detach().float()
    n, k = w.shape
    g = spec.group_size or k
    groups = -(-k // g)
    pad = groups * g - k
    wg = torch.nn.functional.pad(w, (0, pad)).reshape(n, groups, g)
    hdiag = hblocks = None
    if objective != "mse":
        h = hessian.detach().to(device=w.device, dtype=torch.float32)
        h = torch.nn.functional.pad(h, (0, pad, 0, pad))
        if objective == "hessian_diag":
            hdiag = torch.diagonal(h).reshape(groups, g)
        else:
            hblocks = torch.stack([h[i * g:(i + 1) * g, i * g:(i + 1) * g] for i in range(groups)])
    asym = not spec.symmetric
    hi = wg.amax(-1, keepdim=True).clamp_min(0) if asym else wg.abs().amax(-1, keepdim=True)
    lo = wg.amin(-1, keepdim=True).clamp_max(0) if asym else -hi
    r = torch.tensor(ratios, device=w.device)
    pairs = torch.cartesian_prod(r, r) if asym and asym_pairs else torch.stack([r, r], dim=1)  # (r_lo, r_hi)
    chunk = max(1, CANDIDATE_ELEMENTS // max(w.numel(), 1))
    best_err = torch.full((n, groups), float("inf"), device=w.device)
    best = torch.zeros(n, groups, dtype=torch.long, device=w.device)
    for start in range(0, len(pairs), chunk):
        cand = pairs[start:start + chunk]
        clipped = torch.minimum(torch.maximum(wg, lo * cand[:, 0, None, None, None]), hi * cand[:, 1, None, None, None])
        flat = clipped.reshape(len(cand) * n, groups * g)[:, :k]
        deq = fake_quantize(flat, spec)
        d = torch.nn.functional.pad(deq - w.repeat(len(cand), 1), (0, pad)).reshape(len(cand), n, groups, g)
        err = _group_errors(d, objective, hdiag, hblocks)
        low, arg = err.min(0)
        better = low < best_err
        best_err = torch.where(better, low, best_err)
        best = torch.where(better, arg + start, best)
    chosen = pairs[best]  # [n, groups, 2]
    final = torch.minimum(torch.maximum(wg, lo * chosen[..., :1]), hi * chosen[..., 1:]).reshape(n, -1)[:, :k]
    grid = FixedGrid(quantize(final.contiguous(), spec))
    qt = grid.quantize(w)
    minmax_qt = quantize(w, spec)

    def total(q: QuantizedTensor) -> float:
        d = torch.nn.functional.pad(dequantize(q) - w, (0, pad)).reshape(1, n, groups, g)
        return float(_group_errors(d.double(), objective, None if hdiag is None else hdiag.double(),
                                   None if hblocks is None else hblocks.double()).sum())

    e_minmax, e_chosen = total(minmax_qt), total(qt)
    if e_chosen > e_minmax:  # the stored grid rounds differently from the searched one: keep min/max
        qt, e_chosen, chosen = minmax_qt, e_minmax, torch.ones_like(chosen)
    clipped_frac = float(((chosen[..., 0] < 1) | (chosen[..., 1] < 1)).double().mean())
    info = GridSearchInfo(objective, e_minmax, e_chosen, float(chosen[..., 0].mean()), float(chosen[..., 1].mean()),
                          clipped_frac)
    return qt, info
