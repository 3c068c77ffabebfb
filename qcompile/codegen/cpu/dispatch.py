"""Which CPU kernel runs a ``quantized_linear`` call, and running it.

Per (weight spec, activation spec, x dtype, tokens M), measured on a 2-core Xeon, torch 2.13
(docs/benchmarks/cpu.md):

- W8A8 (int8 symmetric per-channel weights, int8 symmetric per-token activations): ``torch._int_mm``
  at every M (faster than float32 at 1, 16 and 256 tokens).
- Weight-only int8 symmetric per-channel: ``_weight_int8pack_mm`` (bfloat16) up to ``INT8PACK_MAX_M``
  tokens, where it is fastest; above (and for float16 x), for K >= ``INT8_SPLIT_MIN_K`` up to
  ``INT8_SPLIT_MAX_M`` tokens, ``torch._int_mm`` on a two-term int8 expansion of x
  (``kernels.int8_split_linear``: float32 precision, 1.3-2x int8pack and float32 from 6 tokens);
  otherwise as int4 below.
- Weight-only int4 (groups multiple of 32 or per channel), x float32 or bfloat16,
  ``M <= PACKED_MAX_M``: torch's packed kernel, in bfloat16.
- Everything else on float32/bfloat16/float16 x, and every M above ``PACKED_MAX_M``: float32 GEMM on
  the weight dequantized once and cached (as fast as float; 4 bytes per weight, up to a budget,
  ``weight_cache``). Activation formats without a kernel are fake-quantized first (simulated).
- float64 x (the pass manager's verification) and a full cache: the reference, dequantizing per call.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from qcompile.codegen.cpu import kernels, weight_cache
from qcompile.formats import QuantizedTensor, QuantSpec
from qcompile.formats.spec import PER_CHANNEL, PER_TENSOR

INT8PACK_MAX_M = 4
"""Up to this many tokens per call int8 weight-only layers run ``_weight_int8pack_mm`` (bf16; 2.1-3× the
speed of the split ``_int_mm`` kernel at 1 token), above it the split kernel (float32 precision, faster
from 6 tokens: 1.3-1.5× at 6-12, 2× at 16). Measured on the 2-core Xeon, docs/benchmarks/cpu.md."""

INT8_SPLIT_MIN_K = 2048
INT8_SPLIT_MAX_M = 256
"""Where the split kernel pays: its per-token expansion costs about what a float32 GEMM of a narrow
weight does, so below K = 2048 (MiniLM's 384 and 1536: 1.0-3× float32's time) and above 256 tokens
(1924 tokens: 1.1-9×) the weight-only rules below apply instead. Measured with the whole-model rows in
docs/benchmarks/cpu.md ("One linear" and the MiniLM rows)."""

PACKED_MAX_M = 16
"""Above this many tokens per call torch's packed CPU kernels lose to a float32 GEMM (docs/benchmarks/cpu.md,
"One linear", the three Llama shapes: at 16 tokens int8pack/int4pack are 1.2-1.4x faster than float32,
at 24 level or slower, at 32 they take 1.1-1.3x its time)."""

INT8PACK = "cpu:int8pack_mm"
INT8_SPLIT = "cpu:int8-split-int_mm"
INT4PACK = "cpu:int4pack_mm"
INT_MM = "cpu:int_mm"
DEQUANT_CACHED = "cpu:dequant-cached"
REFERENCE = "reference"

_warned: set[str] = set()

PACKED_DTYPES = (torch.float32, torch.bfloat16)
"""x dtypes the packed kernels take (run in bfloat16); float16 x takes the exact float32 path."""


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _per_channel(spec: QuantSpec, in_features: int) -> bool:
    return spec.group_size == PER_CHANNEL or spec.group_size >= in_features


def packed_kernel(w_spec: QuantSpec, x_dtype: torch.dtype, in_features: int,
                  m: int = 1) -> tuple[str | None, str]:
    """The packed weight-only kernel for this weight at ``m`` tokens, or None and why not."""
    if w_spec.format == "int8":
        if not w_spec.symmetric or not _per_channel(w_spec, in_features):
            return None, f"torch's int8 CPU kernels take symmetric per-channel int8 only, not {w_spec.short()}"
        tiny = m <= INT8PACK_MAX_M and x_dtype in PACKED_DTYPES and kernels.has_op("_weight_int8pack_mm")
        if hasattr(torch, "_int_mm") and not tiny and in_features >= INT8_SPLIT_MIN_K and m <= INT8_SPLIT_MAX_M:
            return INT8_SPLIT, ""
        if x_dtype not in PACKED_DTYPES:
            return None, f"{str(x_dtype).removeprefix('torch.')} inputs run the exact float32 path"
        return (INT8PACK, "") if kernels.has_op("_weight_int8pack_mm") else (None, "torch lacks _weight_int8pack_mm")
    if x_dtype not in PACKED_DTYPES:
        return None, f"{str(x_dtype).removeprefix('torch.')} inputs run the exact float32 path"
    if w_spec.format == "int4":
        if kernels.int4pack_group(w_spec, in_features) is None:
            return None, f"_weight_int4pack_mm_for_cpu needs int4 groups that are multiples of 32, not {w_spec.short()}"
        if not kernels.has_op("_weight_int4pack_mm_for_cpu"):
            return None, "torch lacks _weight_int4pack_mm_for_cpu"
        return INT4PACK, ""
    return None, f"no packed CPU kernel for {w_spec.format} weights"


def int_mm_reason(w_spec: QuantSpec, a_spec: QuantSpec, in_features: int) -> str | None:
    """None if ``torch._int_mm`` computes this W8A8 pair exactly, else why not."""
    per_token = a_spec.symmetric and a_spec.group_size == PER_CHANNEL
    per_tensor = not a_spec.symmetric and a_spec.group_size == PER_TENSOR
    if a_spec.format != "int8" or not (per_token or per_tensor):
        return (f"no CPU kernel for {a_spec.short()} activations (torch._int_mm takes symmetric per-token or "
                "asymmetric per-tensor int8)")
    if w_spec.format != "int8" or not w_spec.symmetric or not _per_channel(w_spec, in_features):
        return f"torch._int_mm W8A8 needs symmetric per-channel int8 weights, not {w_spec.short()}"
    if not hasattr(torch, "_int_mm"):
        return "torch lacks _int_mm"
    return None


@dataclass(frozen=True)
class Choice:
    kernel: str
    why: str = ""
    """Why not a faster kernel (empty when this is the fast path)."""
    simulated: bool = False
    """Activations fake-quantized (no kernel computes in their format)."""


M_BUCKETS = (INT8PACK_MAX_M, PACKED_MAX_M, INT8_SPLIT_MAX_M)
"""Token counts at which a kernel choice can change."""


def choose(w_spec: QuantSpec, a_spec: QuantSpec | None, x_dtype: torch.dtype, in_features: int, m: int) -> Choice:
    """The kernel for a call of ``m`` tokens (before the cache budget is consulted); memoized, as it runs
    on every call and depends on ``m`` only through its bucket (:data:`M_BUCKETS`)."""
    bucket = next((b for b in M_BUCKETS if m <= b), M_BUCKETS[-1] + 1)
    return _choose(w_spec, a_spec, x_dtype, in_features, bucket)


@functools.lru_cache(maxsize=1024)
def _choose(w_spec: QuantSpec, a_spec: QuantSpec | None, x_dtype: torch.dtype, in_features: int,
            bucket: int) -> Choice:
    small = bucket <= PACKED_MAX_M
    if x_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return Choice(REFERENCE, f"{str(x_dtype).removeprefix('torch.')} inputs run the reference",
                      simulated=a_spec is not None)
    if a_spec is not None:
        reason = int_mm_reason(w_spec, a_spec, in_features)
        if reason is None:
            return Choice(INT_MM)
        return Choice(DEQUANT_CACHED, reason, simulated=True)
    packed, reason = packed_kernel(w_spec, x_dtype, in_features, bucket)
    if packed is None:
        return Choice(DEQUANT_CACHED, reason)
    if small or packed == INT8_SPLIT:
        return Choice(packed)
    return Choice(DEQUANT_CACHED, f"above {PACKED_MAX_M} tokens {packed} is slower than a float32 GEMM")


def cpu_quantized_linear(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None,
                         act_spec: QuantSpec | None, reference: Callable[..., torch.Tensor]) -> torch.Tensor:
    """``qcompile::quantized_linear`` on CPU tensors: the kernel :func:`choose` picks. ``reference`` is
    the op's reference kernel (passed in, so that kernels do not import the op)."""
    k = qt.shape[1]
    x2 = x.reshape(-1, k)
    choice = choose(qt.spec, act_spec, x.dtype, k, x2.shape[0])
    if choice.kernel == REFERENCE or x2.shape[0] == 0:
        return reference(x, qt, bias, act_spec)
    if choice.kernel == DEQUANT_CACHED:
        w32 = weight_cache.cached_dequantized(qt, kernels.dequantize_float32)
        if w32 is not None:
            return kernels.dequant_linear(x2, w32, bias, act_spec).to(x.dtype).reshape(*x.shape[:-1], -1)
        packed, _ = packed_kernel(qt.spec, x.dtype, k, x2.shape[0]) if act_spec is None else (None, "")
        budget = weight_cache.dequant_budget_bytes() // 2**20
        _warn_once(
            "budget", f"qcompile: the CPU dequantized-weight cache is full ({budget} MiB, "
            f"QCOMPILE_CPU_DEQUANT_CACHE_MB): layers beyond it run "
            f"{packed or 'the reference (dequantizing on every call, slow)'} where they would run {DEQUANT_CACHED}")
        if packed is None:
            return reference(x, qt, bias, act_spec)
        choice = Choice(packed)
    if choice.kernel == INT_MM:
        y = kernels.int_mm_linear(x2, qt, act_spec)
    elif choice.kernel == INT8_SPLIT:
        y = kernels.int8_split_linear(x2, qt)
    elif choice.kernel == INT8PACK:
        y = kernels.int8pack_linear(x2, qt.data, weight_cache.cached(qt, "int8pack", kernels.pack_int8))
    else:
        y = kernels.int4pack_linear(x2, weight_cache.cached(qt, "int4pack", kernels.pack_int4))
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], -1)


def describe(w_spec: QuantSpec, a_spec: QuantSpec | None, x_dtype: torch.dtype,
             in_features: int) -> tuple[str, list[str]]:
    """For the report: the kernel(s) a layer runs on CPU by tokens per call (M), and notes where it is
    simulated, on the reference, rounded to bfloat16, or holds a float32 copy of its weight."""
    small = choose(w_spec, a_spec, x_dtype, in_features, 1)
    ranges: list[tuple[str, int, int | None]] = []  # (kernel, first M, last M or None)
    for low, high in zip((1, *(b + 1 for b in M_BUCKETS)), (*M_BUCKETS, None)):
        k = choose(w_spec, a_spec, x_dtype, in_features, low).kernel
        if ranges and ranges[-1][0] == k:
            ranges[-1] = (k, ranges[-1][1], high)
        else:
            ranges.append((k, low, high))
    if len(ranges) == 1:
        kernel = small.kernel
    else:
        kernel = ", ".join(f"{k} (M<={hi})" if lo == 1 else f"{k} (M>{lo - 1})" if hi is None else f"{k} ({lo}<=M<={hi})"
                           for k, lo, hi in ranges)
    notes = []
    if small.simulated:
        notes.append(f"{a_spec.short()} activations simulated (fake-quantized, then float32 GEMM on dequantized "
                     f"weights): {small.why}")
    elif small.kernel == DEQUANT_CACHED:
        notes.append(f"weights dequantized once to float32 and cached (speed and memory as float32): {small.why}")
    elif small.kernel == REFERENCE:
        notes.append(f"reference kernel (dequantizes on every call): {small.why}")
    if small.kernel in (INT8PACK, INT4PACK) and x_dtype == torch.float32:
        upto = INT8PACK_MAX_M if small.kernel == INT8PACK else PACKED_MAX_M
        notes.append("float32 activations and outputs rounded to bfloat16 in torch's packed CPU kernels "
                     f"(their only vectorized variant), up to {upto} tokens per call")
    cached_from = next((lo for k, lo, _ in ranges if k == DEQUANT_CACHED), None)
    if cached_from is not None and small.kernel != DEQUANT_CACHED:
        notes.append(f"above {cached_from - 1} tokens per call: float32 GEMM on a dequantized copy cached at first "
                     "use (4 bytes per weight, up to QCOMPILE_CPU_DEQUANT_CACHE_MB), as the packed kernels are "
                     "slower than float32 there")
    return kernel, notes
