"""The pure math of outlier splitting: which channels or weights to split off, the split tensors,
and what they cost in bytes.

A layer's split is ``LayerDecision.extras["outlier_split"]`` (:data:`SPLIT_KEY`), one of

- ``{"method": "llm_int8", "channels": c}``: the ``c`` input channels with the largest calibration
  ``max |x|`` are computed in 16 bits: ``y = Q(x_d) · Q(W_d)ᵀ + x[:, I] · W[:, I]ᵀ``, where ``x_d``
  and ``W_d`` have the columns ``I`` zeroed (so they inflate neither the activation's nor the
  weight's scales) and ``W[:, I]`` is stored in float16 (LLM.int8, Dettmers et al. 2022);
- ``{"method": "sparse", "fraction": f}``: the ``round(f · N · K)`` weights whose round-to-nearest
  error, times their input channel's mean ``|x|``, is largest are taken out of the dense weight
  and kept as a float16 CSR residual: ``y = Q(x) · Q(W − S)ᵀ + x · Sᵀ`` (dense-and-sparse,
  SqueezeLLM / KVQuant);
- ``{"method": "residual_channels", "channels": c}`` (ARCQuant, Meng et al. 2026): the ``c``
  input channels with the largest calibration ``max |x|`` are moved last (``x_p = x[..., P]``,
  ``W_p = W[:, P]``: exact, and the outliers now share blocks with each other), ``c`` is rounded up
  to whole weight groups (``c'``), and the last ``c'`` channels get ``c'`` extra K channels that
  carry a quantization error, so one block-scaled GEMM over ``K + c'`` computes the correction:
  activation-quantized layers (the paper's form): ``y = Q([x_p, (x_p − Q(x_p))_T]) · [Q(W_p),
  Q(W_p)_T]ᵀ`` (``T`` the last ``c'`` channels; the activation's residual against duplicated
  weight columns); weight-only layers (no activation error to carry): ``y = [x_p, (x_p)_T] ·
  [Q(W_p), Q(W_p − Q(W_p))_T]ᵀ`` (the weight's residual against duplicated activation columns).

The passes (``outlier_splitting.py``) record what they selected beside these keys (``index``,
``nnz``, ``padded_channels``, ``attrs``, ``extra_bytes``), so an artifact restores it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from qcompile.formats import QuantizedTensor, QuantSpec, dequantize, quantize

SPLIT_KEY = "outlier_split"
"""``LayerDecision.extras`` key of a layer's outlier split."""
METHODS = ("llm_int8", "sparse", "residual_channels")
"""The split methods, by the ``method`` value they are chosen with."""
INDEX_DTYPE = torch.int32
"""Channel indices and the sparse residual's row pointers and columns are stored as int32 (4 bytes each)."""
VALUE_DTYPE = torch.float16
"""LLM.int8's kept columns and the sparse residual's values are stored as float16."""
DEFAULT_SPARSE_FRACTION = 0.005
"""SqueezeLLM's 0.5 % of the weights kept sparse."""
_INDEX_BYTES = torch.empty((), dtype=INDEX_DTYPE).element_size()
_VALUE_BYTES = torch.empty((), dtype=VALUE_DTYPE).element_size()


class OutlierSplitError(ValueError):
    """A split that cannot apply to a layer; the message names the layer and the value."""


def split_of(extras: Mapping[str, Any]) -> dict[str, Any] | None:
    """The split in ``extras``: a decision's whole extras (``{"outlier_split": {...}}``) or the
    split itself (``{"method": ...}``); ``None`` when there is none."""
    if SPLIT_KEY in extras:
        return dict(extras[SPLIT_KEY]) if extras[SPLIT_KEY] is not None else None
    return dict(extras) if "method" in extras else None


def validate_split(split: Mapping[str, Any], layer: str, out_features: int, in_features: int) -> dict[str, Any]:
    """``split`` checked for a layer of ``[out_features, in_features]``, or an
    :class:`OutlierSplitError` naming ``layer`` and the bad value: a known ``method``;
    ``channels`` an int in ``[1, K]``; ``fraction`` a float in ``(0, 1)`` keeping at least one weight."""
    if not isinstance(split, Mapping):
        raise OutlierSplitError(f"layer {layer!r}: {SPLIT_KEY} must be a dict, got {split!r}")
    method = split.get("method")
    if method not in METHODS:
        raise OutlierSplitError(f"layer {layer!r}: {SPLIT_KEY} method {method!r} is not one of {', '.join(METHODS)}")
    if method in ("llm_int8", "residual_channels"):
        c = split.get("channels")
        if isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= in_features:
            raise OutlierSplitError(f"layer {layer!r}: {method} channels={c!r} must be an int in [1, {in_features}] "
                                    f"(the layer's input size K)")
    else:
        f = split.get("fraction", DEFAULT_SPARSE_FRACTION)
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f < 1.0 or not math.isfinite(f):
            raise OutlierSplitError(f"layer {layer!r}: sparse fraction={f!r} must be a number in (0, 1)")
        if sparse_count(f, out_features, in_features) < 1:
            raise OutlierSplitError(f"layer {layer!r}: sparse fraction={f!r} keeps no weight of {out_features}x"
                                    f"{in_features}")
    return dict(split)


# ----------------------------------------------------------------------------- LLM.int8
def top_channels(score: torch.Tensor, channels: int) -> torch.Tensor:
    """The ``channels`` indices of the largest ``score``, ascending, as int32 (ties: lower index)."""
    order = torch.sort(score.double(), descending=True, stable=True).indices[:channels]
    return torch.sort(order).values.to(INDEX_DTYPE)


def llm_int8_split(weight: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_d, W_o)``: the weight with columns ``index`` zeroed (the quantized part) and those
    columns ``[N, c]`` in float16 (the 16-bit GEMM's weight). Raises where a column overflows float16."""
    idx = index.long()
    kept = weight[:, idx]
    _check_fp16(kept, "kept columns")
    dense = weight.clone()
    dense[:, idx] = 0
    return dense, kept.to(VALUE_DTYPE).contiguous()


# ----------------------------------------------------------------------------- dense-and-sparse
def sparse_count(fraction: float, out_features: int, in_features: int) -> int:
    """Weights a ``fraction`` keeps sparse: ``round(fraction · N · K)``."""
    return int(round(fraction * out_features * in_features))


def sparse_split(weight: torch.Tensor, spec: QuantSpec, channel_scale: torch.Tensor | None,
                 nnz: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(W − S, crow, cols, values)``: the ``nnz`` weights of largest ``|W − deq(RTN(W))| ·
    channel_scale[col]`` (``channel_scale`` ``None``: 1) taken out of ``weight`` into a CSR residual
    (row pointers ``[N + 1]`` and column indices int32, values float16)."""
    w = weight.float()
    err = (w - dequantize(quantize(w, spec))).abs()
    if channel_scale is not None:
        err = err * channel_scale.float().to(err.device).unsqueeze(0)
    flat = torch.sort(err.flatten(), descending=True, stable=True).indices[:nnz]
    flat = torch.sort(flat).values
    k = weight.shape[1]
    rows, cols = flat // k, flat % k
    values = weight[rows, cols]
    _check_fp16(values, "sparse values")
    dense = weight.clone()
    dense[rows, cols] = 0
    crow = torch.searchsorted(rows, torch.arange(weight.shape[0] + 1, device=rows.device))
    return dense, crow.to(INDEX_DTYPE), cols.to(INDEX_DTYPE), values.to(VALUE_DTYPE)


def check_csr(crow: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, out_features: int,
              in_features: int, layer: str) -> None:
    """The CSR arrays of a sparse residual are well formed for ``[out_features, in_features]``
    (an artifact is untrusted; torch's sparse product does not check them), else an
    :class:`OutlierSplitError` naming the layer and what is wrong."""
    def fail(what: str) -> None:
        raise OutlierSplitError(f"layer {layer!r}: sparse residual {what}")

    if crow.dtype != INDEX_DTYPE or cols.dtype != INDEX_DTYPE or values.dtype != VALUE_DTYPE:
        fail(f"dtypes {crow.dtype}, {cols.dtype}, {values.dtype}; expected int32, int32, float16")
    if crow.dim() != 1 or crow.numel() != out_features + 1 or cols.dim() != 1 or values.shape != cols.shape:
        fail(f"shapes {list(crow.shape)}, {list(cols.shape)}, {list(values.shape)}; expected [{out_features + 1}], "
             "[nnz], [nnz]")
    if int(crow[0]) != 0 or int(crow[-1]) != cols.numel() or bool((crow.diff() < 0).any()):
        fail("row pointers do not run from 0 up to nnz")
    if cols.numel() and (int(cols.min()) < 0 or int(cols.max()) >= in_features):
        fail(f"column indices outside [0, {in_features})")


# ----------------------------------------------------------------------------- residual channels
def padded_channels(channels: int, spec: QuantSpec, in_features: int, layer: str = "") -> int:
    """``channels`` rounded up to whole weight groups, so the extra channels form groups of their
    own; an :class:`OutlierSplitError` when ``spec`` has no groups dividing K (per-channel scales
    would change with the extra channels)."""
    group = spec.group_size
    if not group or in_features % group:
        raise OutlierSplitError(f"layer {layer!r}: residual_channels needs a weight format with groups dividing K "
                                f"(NVFP4: 16, MXFP4: 32, int4-g32, ...); {spec.short()} has "
                                f"{'per-channel scales' if not group else f'groups of {group}'} over K={in_features}")
    return -(-channels // group) * group


def channel_order(index: torch.Tensor, in_features: int) -> torch.Tensor:
    """The permutation ``P`` of K that puts the outlier channels ``index`` last (the rest keep their
    order): ``x[..., P]`` and ``W[:, P]`` compute the same product, and the outliers share blocks with
    each other instead of with ordinary channels (ARCQuant's reordering). int32 ``[K]``."""
    last = torch.zeros(in_features, dtype=torch.bool, device=index.device)
    last[index.long()] = True
    return torch.cat([torch.nonzero(~last).flatten(), index.long()]).to(INDEX_DTYPE)


def augment_weight(qt: QuantizedTensor, extra: torch.Tensor) -> QuantizedTensor:
    """``[deq(Q(W)), Q(extra)]``: one ``[N, K + c']`` tensor of ``qt``'s spec. Re-quantizing the
    dequantized ``Q(W)`` reproduces its codes and scales (the formats library's fixed point; NVFP4's
    global scale is the larger part's, ``Q(W)``'s), checked here, so the first K columns are ``qt``'s."""
    base = dequantize(qt)
    aug = quantize(torch.cat([base, extra.to(base)], dim=1), qt.spec)
    if not torch.equal(dequantize(aug)[:, : base.shape[1]], base):
        raise RuntimeError(f"re-quantizing the {qt.spec.short()} weight with residual channels changed its first K "
                           "columns (the format has no fixed point here)")
    return aug


def weight_residual_columns(weight: torch.Tensor, qt: QuantizedTensor, padded: int) -> torch.Tensor:
    """The weight form's extra columns: ``(W − deq(Q(W)))[:, K − c':]``, the error of the last
    ``padded`` (outlier) channels."""
    return (weight.float() - dequantize(qt))[:, -padded:]


def activation_residual_columns(qt: QuantizedTensor, padded: int) -> torch.Tensor:
    """The activation form's extra columns: ``deq(Q(W))[:, K − c':]``, the quantized weight of the
    last ``padded`` channels again (they meet the activation's residual ``x − Q(x)``)."""
    return dequantize(qt)[:, -padded:]


# ----------------------------------------------------------------------------- bytes
def _row_bytes(spec: QuantSpec, k: int) -> int:
    """Bytes per output row of a ``spec`` weight with K = ``k`` (the per-tensor global scale excluded)."""
    row = quantize(torch.zeros(1, k), spec)
    return sum(t.numel() * t.element_size() for name, t in row.tensors().items() if name != "global_scale")


def outlier_split_extra_bytes(extras: dict, out_features: int, in_features: int, *,
                              weight_spec: QuantSpec | str = "nvfp4") -> int:
    """Bytes a split stores beyond the layer's plain quantized weight (the solver's cost).

    ``extras``: a decision's extras or the split dict itself (no split: 0). ``llm_int8``: ``2·N·c``
    (float16 columns) + ``4·c`` (int32 indices); ``sparse``: ``6·nnz + 4·(N + 1)`` (CSR: int32
    column and float16 value per kept weight, int32 row pointers), ``nnz = round(f·N·K)``; ``residual_channels``: the ``weight_spec`` bytes of
    ``c'`` more K columns (``c`` rounded up to whole groups; NVFP4: ``N·c'/2`` codes + ``N·c'/16``
    scales) + ``4·K`` (the int32 channel order). ``weight_spec`` matters only for ``residual_channels``.
    """
    split = split_of(extras)
    if split is None:
        return 0
    split = validate_split(split, split.get("layer", "?"), out_features, in_features)
    method = split["method"]
    if method == "llm_int8":
        return split["channels"] * (out_features * _VALUE_BYTES + _INDEX_BYTES)
    if method == "sparse":
        nnz = sparse_count(split.get("fraction", DEFAULT_SPARSE_FRACTION), out_features, in_features)
        return nnz * (_INDEX_BYTES + _VALUE_BYTES) + (out_features + 1) * _INDEX_BYTES
    spec = QuantSpec.parse(weight_spec) if isinstance(weight_spec, str) else weight_spec
    padded = padded_channels(split["channels"], spec, in_features)
    return (out_features * (_row_bytes(spec, in_features + padded) - _row_bytes(spec, in_features))
            + in_features * _INDEX_BYTES)


def outlier_split_extra_work(extras: dict, out_features: int, in_features: int, tokens: int, *,
                             weight_spec: QuantSpec | str = "nvfp4") -> tuple[int, int, str]:
    """``(flops, bytes moved, operand format)`` a split adds to one call of ``tokens`` rows, for
    ``Target.matmul_seconds`` (the solver's time cost; no split: ``(0, 0, "bf16")``).

    The ideal, fused work: ``llm_int8`` a 16-bit GEMM of ``2·M·N·c`` FLOPs reading its columns and
    gathered activations and adding ``M × N`` 16-bit outputs; ``sparse`` ``2·M·nnz`` FLOPs over
    the CSR arrays plus the ``M × N`` add; ``residual_channels`` ``2·M·N·c'`` more FLOPs in the
    weight's own format and its extra weight bytes. The unfused ops that run today cost more
    (separate gathers, a float32 sparse product)."""
    split = split_of(extras)
    if split is None:
        return 0, 0, "bf16"
    extra = outlier_split_extra_bytes(split, out_features, in_features, weight_spec=weight_spec)
    method, m, n = split["method"], tokens, out_features
    if method == "llm_int8":
        c = split["channels"]
        return 2 * m * n * c, extra + _VALUE_BYTES * m * (c + 2 * n), "bf16"
    if method == "sparse":
        nnz = sparse_count(split.get("fraction", DEFAULT_SPARSE_FRACTION), n, in_features)
        return 2 * m * nnz, extra + _VALUE_BYTES * 2 * m * n, "bf16"
    spec = QuantSpec.parse(weight_spec) if isinstance(weight_spec, str) else weight_spec
    padded = padded_channels(split["channels"], spec, in_features)
    return 2 * m * n * padded, extra + _VALUE_BYTES * m * padded, spec.format


def split_layer_output(x: torch.Tensor, weight: torch.Tensor, weight_spec: QuantSpec, act_spec: QuantSpec | None,
                       split: Mapping[str, Any], max_abs: torch.Tensor, mean_abs: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """The output on ``x`` (``[rows, K]``) of the layer ``weight`` quantized by round-to-nearest
    with ``split`` applied, computed directly, without a graph: the same selection (from the
    calibration ``max_abs`` / ``mean_abs`` per input channel) and math as the passes, so a solver
    can measure an outlier option's error before choosing it. float64 ``x`` computes in float64,
    anything else in float32."""
    from qcompile.formats import fake_quantize

    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, w = x.to(dtype), weight.float()
    n, k = w.shape
    split = validate_split(split, split.get("layer", "?"), n, k)

    def fq(v: torch.Tensor) -> torch.Tensor:
        return fake_quantize(v, act_spec) if act_spec is not None else v

    def deq(t: torch.Tensor) -> torch.Tensor:
        return dequantize(quantize(t, weight_spec), dtype=dtype)

    method = split["method"]
    if method == "llm_int8":
        index = top_channels(max_abs, split["channels"]).long()
        dense, kept = llm_int8_split(w, index)
        y = fq(x.index_fill(-1, index, 0)) @ deq(dense).t() + x[:, index] @ kept.to(dtype).t()
    elif method == "sparse":
        nnz = sparse_count(split.get("fraction", DEFAULT_SPARSE_FRACTION), n, k)
        dense, crow, cols, values = sparse_split(w, weight_spec, mean_abs, nnz)
        rows = torch.repeat_interleave(torch.arange(n), crow.long().diff())
        s = torch.zeros(n, k, dtype=dtype)
        s[rows, cols.long()] = values.to(dtype)
        y = fq(x) @ deq(dense).t() + x @ s.t()
    else:
        padded = padded_channels(split["channels"], weight_spec, k, split.get("layer", "?"))
        order = channel_order(top_channels(max_abs, split["channels"]), k).long()
        xp, wp = x[:, order], w[:, order]
        qt = quantize(wp, weight_spec)
        if act_spec is None:
            aug, tail = augment_weight(qt, weight_residual_columns(wp, qt, padded)), xp[:, k - padded:]
        else:
            aug, tail = augment_weight(qt, activation_residual_columns(qt, padded)), (xp - fq(xp))[:, k - padded:]
        y = fq(torch.cat([xp, tail], 1)) @ dequantize(aug, dtype=dtype).t()
    return y + bias.to(dtype) if bias is not None else y


def stored_weight_shape(extras: Mapping[str, Any], shape: tuple[int, int]) -> tuple[int, int]:
    """The shape of the quantized weight a layer of float ``shape`` stores: K grows by the padded
    residual channels where ``residual_channels`` selected them, else ``shape``."""
    split = split_of(extras)
    if split is None or split.get("method") != "residual_channels" or "form" not in split:
        return tuple(shape)
    return (shape[0], shape[1] + int(split["padded_channels"]))


PASS_OF = {"llm_int8": "split_outliers", "sparse": "split_outliers", "residual_channels": "residual_channels"}
"""The pass that applies each method."""
PASSES_OF = {"llm_int8": ("split_outliers",), "sparse": ("split_outliers",),
             "residual_channels": ("split_outliers", "residual_channels")}
"""Every pass a method needs (residual channels: the reordering before the quantizer, the extra
channels after it)."""
_SELECTED = {"llm_int8": ("index",), "sparse": ("nnz",), "residual_channels": ("index", "form")}


def unapplied_split(decision: Any) -> str | None:
    """Why ``decision``'s split was asked for but never applied (no pass recorded a selection), or
    ``None``: what ``lower`` refuses rather than silently dropping the split."""
    extras = getattr(decision, "extras", None) or {}
    split = extras.get(SPLIT_KEY)
    if not split or not getattr(decision, "quantized", False):
        return None
    method = split.get("method")
    if method not in METHODS:
        return f"{SPLIT_KEY} method {method!r} is not one of {', '.join(METHODS)}"
    if all(key in split for key in _SELECTED[method]):
        return None
    missing = "split_outliers" if "index" not in split else PASS_OF[method]
    return (f"the decision asks for outlier split {_brief(split)}, but no {missing!r} pass applied it; add "
            f"{', '.join(map(repr, PASSES_OF[method]))} to the passes")


def _brief(split: Mapping[str, Any]) -> str:
    return "{" + ", ".join(f"{k!r}: {split[k]!r}" for k in ("method", "channels", "fraction") if k in split) + "}"


def _check_fp16(t: torch.Tensor, what: str) -> None:
    big = float(t.abs().max()) if t.numel() else 0.0
    if big > torch.finfo(VALUE_DTYPE).max:
        raise OutlierSplitError(f"{what} reach |w| = {big:.3g}, beyond float16's range")


__all__ = [
    "DEFAULT_SPARSE_FRACTION", "INDEX_DTYPE", "METHODS", "PASS_OF", "SPLIT_KEY", "VALUE_DTYPE", "OutlierSplitError",
    "PASSES_OF", "activation_residual_columns", "augment_weight", "channel_order", "check_csr", "llm_int8_split",
    "outlier_split_extra_bytes", "outlier_split_extra_work", "padded_channels", "sparse_count", "split_layer_output", "sparse_split", "split_of", "stored_weight_shape", "top_channels",
    "unapplied_split", "validate_split", "weight_residual_columns",
]
