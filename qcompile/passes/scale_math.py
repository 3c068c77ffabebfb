"""The pure math of scale migration (``passes/scale_migration.py``): no graphs, only tensors.

Conventions: a linear's weight is ``W [N, K]``, its calibration input rows ``X [R, K]``; a scale
``s [K]`` migrates as ``y = (X / s) · (W · diag(s))ᵀ``, a shift ``z [K]`` as
``y = (X − z) · Wᵀ + (b + W z)``. Scales are tied across channels that one producer channel feeds
(grouped-query attention repeats each V channel for several query heads): ``index [K]`` maps each
consumer channel to the producer channel it comes from, and per-channel statistics are reduced over
the channels sharing a producer channel (:func:`tied_reduce`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from qcompile.formats import QuantSpec, fake_quantize

SCALE_RANGE = (1e-4, 1e4)
"""Scales are clamped into this range after normalisation (keeps 1/s and W·s finite in 16 bits)."""


def tied_reduce(values: torch.Tensor, index: torch.Tensor | None, size: int, reduce: str) -> torch.Tensor:
    """Reduce per-consumer-channel ``values [K]`` to per-producer-channel ``[size]`` in float64
    (``amax``, ``amin`` or ``mean`` over the channels ``index`` maps to the same producer channel);
    producer channels no consumer channel maps to get 0 (callers use only the mapped ones).
    ``index=None``: the identity."""
    values = values.double()
    if index is None:
        return values.clone()
    return torch.zeros(size, dtype=torch.float64, device=values.device).scatter_reduce(
        0, index.to(values.device), values, reduce, include_self=False)


def normalize_scale(s: torch.Tensor) -> torch.Tensor:
    """``s / sqrt(max(s)·min(s))`` (AWQ's normalisation: the scales straddle 1), clamped into
    :data:`SCALE_RANGE`. A global factor does not change per-row / per-token quantization, it only
    keeps magnitudes where 16-bit scales represent them well."""
    s = s.double().clamp_min(1e-12)
    s = s / (s.max() * s.min()).sqrt()
    return s.clamp(*SCALE_RANGE)


def smooth_scale(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float, eps: float = 1e-5) -> torch.Tensor:
    """SmoothQuant: ``s_j = max|X_j|^α / max|W_·j|^(1−α)``, normalised; channels that never fire
    (``max|X_j| = 0``) or have no weight keep ``s_j = 1``."""
    x = x_max.double().clamp_min(eps)
    w = w_max.double().clamp_min(eps)
    s = normalize_scale(x.pow(alpha) / w.pow(1.0 - alpha))
    dead = (x_max <= 0) | (w_max <= 0)
    return torch.where(dead, torch.ones_like(s), s)


def awq_scale(mean_abs: torch.Tensor, alpha: float, eps: float = 1e-4) -> torch.Tensor:
    """AWQ: ``s_j = mean|X_j|^α``, normalised (``α = 0``: all ones)."""
    if alpha == 0:
        return torch.ones_like(mean_abs, dtype=torch.float64)
    return normalize_scale(mean_abs.double().clamp_min(eps).pow(alpha))


def shift_midpoint(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Outlier Suppression+: ``z_j = (max_j + min_j) / 2`` centres each channel's range on 0."""
    return (hi.double() + lo.double()) / 2


def scaled_weight(weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``W · diag(s)`` computed in float64, in ``weight``'s dtype."""
    return (weight.double() * s.double()[None, :]).to(weight.dtype)


ROW_INDEPENDENT_EXCEPT = ("nvfp4",)
"""Formats with a per-tensor component (NVFP4's global scale): their rows cannot be stacked."""


def dequantized_rows(mats: Sequence[torch.Tensor], spec: QuantSpec) -> list[torch.Tensor]:
    """Each weight matrix (same K) quantized to ``spec`` and dequantized: ``fake_quantize``, the
    values ``dequantize(quantize(m, spec))`` gives without packing codes (so a search is cheap),
    stacked into one call when rows quantize independently (searches evaluate many candidates)."""
    if len(mats) == 1 or spec.format in ROW_INDEPENDENT_EXCEPT:
        return [fake_quantize(m, spec) for m in mats]
    out = fake_quantize(torch.cat(list(mats)), spec)
    return list(out.split([m.shape[0] for m in mats]))


def fake_quantized_rows(mats: Sequence[torch.Tensor], spec: QuantSpec | None) -> list[torch.Tensor]:
    """``fake_quantize(x, spec)`` of each activation matrix (``spec=None``: unchanged), stacked
    when rows quantize independently (per-token dynamic scales)."""
    if spec is None:
        return list(mats)
    if len(mats) == 1 or spec.format in ROW_INDEPENDENT_EXCEPT:
        return [fake_quantize(m, spec) for m in mats]
    out = fake_quantize(torch.cat(list(mats)), spec)
    return list(out.split([m.shape[0] for m in mats]))


Member = tuple[torch.Tensor, torch.Tensor, QuantSpec, "QuantSpec | None"]
"""One linear of a group: calibration rows ``X``, weight ``W``, weight spec, activation spec."""


STACK_ELEMENTS = 1 << 24
"""Candidates are evaluated together up to this many stacked weight elements at a time."""


def quantized_output_errors(members: Sequence[Member], scales: Sequence[torch.Tensor | None]) -> list[float]:
    """For each candidate scale ``s`` (``None``: no migration), the group's relative output error
    ``sqrt(Σᵢ ‖Q(Xᵢ/s)·Q(Wᵢ·diag(s))ᵀ − Xᵢ·Wᵢᵀ‖² / Σᵢ ‖Xᵢ·Wᵢᵀ‖²)`` — the op's reference kernel
    (``reference_quantized_linear``: dequantized weight, fake-quantized activation, float matmul)."""
    num = [0.0] * len(scales)
    den = 0.0
    for x, w, w_spec, a_spec in members:
        x, w = x.float(), w.detach().float()
        ref = x @ w.t()
        den += float(ref.pow(2).sum())
        step = max(1, STACK_ELEMENTS // max(w.numel(), 1))
        for start in range(0, len(scales), step):
            chunk = [None if s is None else s.float() for s in scales[start:start + step]]
            xs = [x if s is None else x / s for s in chunk]
            ws = [w if s is None else w * s for s in chunk]
            for i, (xq, wq) in enumerate(zip(fake_quantized_rows(xs, a_spec), dequantized_rows(ws, w_spec))):
                num[start + i] += float((xq @ wq.t() - ref).pow(2).sum())
    return [math.sqrt(n / max(den, 1e-30)) for n in num]


def shifted_output_errors(members: Sequence[Member], shifts: Sequence[torch.Tensor | None]) -> list[float]:
    """For each candidate shift ``z`` (``None``: none), the group's relative output error when the
    activation ``X − z`` is quantized and ``W·z`` is added back in float (the shifted bias)."""
    num = [0.0] * len(shifts)
    den = 0.0
    for x, w, w_spec, a_spec in members:
        x, w = x.float(), w.detach().float()
        ref = x @ w.t()
        den += float(ref.pow(2).sum())
        wq = dequantized_rows([w], w_spec)[0]
        xs = [x if z is None else x - z.float() for z in shifts]
        for i, (xq, z) in enumerate(zip(fake_quantized_rows(xs, a_spec), shifts)):
            out = xq @ wq.t() + (0.0 if z is None else w @ z.float())
            num[i] += float((out - ref).pow(2).sum())
    return [math.sqrt(n / max(den, 1e-30)) for n in num]


def clip_search(weight: torch.Tensor, x: torch.Tensor, spec: QuantSpec, ratios: Sequence[float],
                row_chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """AWQ's weight clipping: per output row and quantization group, the ratio ``r`` of the group's
    range (``[r·min, r·max]`` for asymmetric integer formats, ``±r·max|w|`` otherwise) whose clipped
    and quantized weights minimise that group's share of the output error on the rows ``x``,
    ``‖X_g (Q(clip(W))_g − W_g)ᵀ‖²``.

    Returns ``(clipped weight, ratio [N, groups], relative output error before, after)`` (errors of
    the whole layer, ``‖X (Q(W') − W)ᵀ‖ / ‖X Wᵀ‖``).
    """
    w = weight.detach().float()
    x = x.detach().float()
    n, k = w.shape
    if spec.format in ROW_INDEPENDENT_EXCEPT:
        row_chunk = n  # a per-tensor scale: quantize whole candidates
    else:
        row_chunk = max(1, min(row_chunk, STACK_ELEMENTS // max(k * len(ratios), 1)))
    g = spec.group_size or k
    groups = -(-k // g)
    pad = groups * g - k
    wg = torch.nn.functional.pad(w, (0, pad)).reshape(n, groups, g)
    xg = torch.nn.functional.pad(x, (0, pad)).reshape(x.shape[0], groups, g)
    asym = not spec.symmetric
    hi = wg.amax(-1, keepdim=True) if asym else wg.abs().amax(-1, keepdim=True)
    lo = wg.amin(-1, keepdim=True) if asym else -hi

    def clipped(r: torch.Tensor) -> torch.Tensor:  # r: [n, groups, 1] or scalar
        return torch.minimum(torch.maximum(wg, lo * r), hi * r)

    def group_errors(candidates: list[torch.Tensor]) -> list[torch.Tensor]:  # each [n, groups]
        out = [torch.empty(n, groups, device=w.device) for _ in candidates]
        for start in range(0, n, row_chunk):
            rows = slice(start, start + row_chunk)
            deqs = dequantized_rows([wc[rows].reshape(-1, groups * g)[:, :k] for wc in candidates], spec)
            for o, deq in zip(out, deqs):
                d = torch.nn.functional.pad(deq - w[rows], (0, pad)).reshape(-1, groups, g)
                o[rows] = torch.einsum("rgk,ngk->ngr", xg, d).pow(2).sum(-1)
        return out

    errors = torch.stack(group_errors([clipped(torch.tensor(float(r))) for r in ratios]))  # [ratios, n, groups]
    best = errors.argmin(0)
    ratio = torch.tensor([float(r) for r in ratios], device=w.device)[best]
    result = clipped(ratio[..., None]).reshape(n, -1)[:, :k].contiguous()
    ref = (x @ w.t()).double().pow(2).sum().clamp_min(1e-30)
    deq_before, deq_after = dequantized_rows([w, result], spec)

    def layer_error(deq: torch.Tensor) -> float:
        return math.sqrt(float((x @ (deq - w).t()).double().pow(2).sum() / ref))

    return result.to(weight.dtype), ratio, layer_error(deq_before), layer_error(deq_after)
