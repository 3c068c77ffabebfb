"""What an option costs a layer: stored bytes (formats library) and estimated time (target cost model).

Bytes are exact: ``formats.bits_per_weight`` counts packed codes with their padding, scales and
zero points (and NVFP4's global scale), the same count as ``quantize(w, spec).nbytes()``; a
16-bit layer costs 2 bytes a weight. Extras registered with
``mixed_precision_options.register_extras`` add theirs.

Time is the target's roofline (``Target.matmul_seconds``: the larger of math time and memory
time) with each side divided by the *measured* efficiency of the kernel that runs the option
there (:data:`EFFICIENCY`), not the peak: ``memory`` is the bandwidth floor of the option's bytes
over the measured time of a decode call (M = 1), ``math`` the achieved over the peak matmul rate
at prefill sizes. Where a number was not measured the table says it is an assumption.
"""

from __future__ import annotations

from dataclasses import dataclass

from qcompile.formats import bits_per_weight
from qcompile.passes.mixed_precision_options import PrecisionOption, handlers_for
from qcompile.targets import Target

FLOAT_BYTES = 2
"""Bytes per weight of a layer kept 16-bit (bf16/fp16 deployment), whatever the traced dtype."""

DECODE_TOKENS = 1
"""Tokens per call of the ``latency_ms`` budget (one decode step)."""
PREFILL_TOKENS = 512
"""Tokens per call of the ``prefill_latency_ms`` budget (override with the pass's ``prefill_tokens``)."""

CPU_PACKED_MAX_M = 16
"""Above this many tokens the CPU runs int4 weight-only layers as a float32 GEMM on the cached
dequantized weight (``qcompile.codegen.cpu.PACKED_MAX_M``, docs/kernels-cpu.md)."""


@dataclass(frozen=True)
class Efficiency:
    """Measured fraction of the target's bandwidth (``memory``) and matmul rate (``math``) that the
    kernel running an option reaches, and where the numbers come from. ``as_float``: the kernel is
    a float GEMM on a cached dequantized weight, so the option takes the 16-bit option's time."""

    memory: float
    math: float
    source: str
    as_float: bool = False


_H100 = "docs/benchmarks/gemm-h100-80gb-hbm3.md (CUDA-graph table, shapes 14336×4096, 4096×14336, 28672×8192)"
_CPU = "docs/benchmarks/cpu.md ('One linear' table, shapes 5632×2048, 2048×5632, 2048×2048; 50 GB/s, 1 TFLOP/s target)"

EFFICIENCY: dict[tuple[str, str], Efficiency] = {
    ("triton", "16-bit"): Efficiency(0.88, 0.74, f"cuBLAS bf16: 2-byte floor / time at M=1, rate / 989 TFLOP/s at "
                                                 f"M=2048; {_H100}"),
    ("triton", "int4"): Efficiency(0.53, 0.66, f"qcompile int_mma W4A16 g128: 1 / (time / int4 floor) at M=1 "
                                               f"(2.01, 1.90, 1.73), rate / 989 at M=2048; {_H100}"),
    ("triton", "int8"): Efficiency(0.70, 0.64, f"qcompile W8A16: 1 / (time / int8 floor) at M=1 (1.32, 1.47, 1.53), "
                                               f"rate / 989 at M=2048; {_H100}"),
    ("triton", "w8a8"): Efficiency(0.53, 0.62, f"qcompile FP8 W8A8 (activation quantization included): 1-byte floor "
                                               f"/ time at M=1, rate / 1979 TFLOP/s at M=2048; {_H100}"),
    ("triton", "weight-only"): Efficiency(0.53, 0.66, "assumption (not measured): int3/int2/fp8/FP4 weight-only "
                                                      "taken as the int4 kernel's numbers"),
    ("triton", "activation"): Efficiency(0.53, 0.62, "assumption (not measured): every other activation-quantized "
                                                     "format taken as the FP8 W8A8 kernel's numbers"),
    ("cpu", "16-bit"): Efficiency(0.36, 0.21, f"float32 GEMM against the 2-byte floor at 1 token, rate at 64 tokens; "
                                              f"{_CPU}"),
    ("cpu", "int8"): Efficiency(0.44, 0.32, f"int8pack_mm at 1 token, int8 split on int_mm at 64 tokens; {_CPU}"),
    ("cpu", "int4"): Efficiency(0.27, 0.21, f"int4pack_mm g128 at 1 token; above {CPU_PACKED_MAX_M} tokens the "
                                            f"float32 GEMM on the dequantized weight; {_CPU}"),
    ("cpu", "w8a8"): Efficiency(0.58, 0.49, f"torch._int_mm (W8A8) at 1 and 64 tokens; {_CPU}"),
    ("cpu", "weight-only"): Efficiency(0.36, 0.21, "float32 GEMM on the cached dequantized weight "
                                                   "(dequant-cached: no packed kernel for the format); " + _CPU,
                                       as_float=True),
    ("cpu", "activation"): Efficiency(0.36, 0.21, "reference kernel: float32 GEMM after fake-quantizing the "
                                                  "activations (assumption: the float32 GEMM's time)", as_float=True),
}
"""(target kernels, kernel kind) → measured efficiency. Ampere and Blackwell targets use the
H100 numbers (assumption: same kernels, not measured there); the H200 run
(docs/benchmarks/gemm-h200.md) predates the int_mma int4/int8 decode kernels, so its
decode numbers (int4 3.2–5.5× its floor) describe kernels that no longer run."""

REFERENCE = Efficiency(1.0, 1.0, "assumption: a target without measured kernels is charged at its peak rates")


def kernel_kind(option: PrecisionOption) -> str:
    """Which :data:`EFFICIENCY` row an option's layer runs on: ``16-bit``, ``int4``, ``int8``,
    ``w8a8`` (int8 or fp8 weights with 8-bit activations), ``weight-only`` (other weight-only
    formats) or ``activation`` (other activation-quantized formats)."""
    if option.weight is None:
        return "16-bit"
    w, a = option.weight.format, option.activation.format if option.activation is not None else None
    if a is None:
        return w if w in ("int4", "int8") else "weight-only"
    if w in ("int8", "fp8_e4m3") and a in ("int8", "fp8_e4m3"):
        return "w8a8"
    return "activation"


def efficiency(target: Target, option: PrecisionOption, tokens: int) -> Efficiency:
    """The measured efficiency of the kernel that runs ``option`` on ``target`` at ``tokens`` per call."""
    kind = kernel_kind(option)
    if target.kernels == "cpu" and kind == "int4" and tokens > CPU_PACKED_MAX_M:
        return EFFICIENCY[("cpu", "weight-only")]
    return EFFICIENCY.get((target.kernels, kind), REFERENCE)


def option_bytes(option: PrecisionOption, rows: int, k: int) -> int:
    """Stored bytes of a ``[rows, k]`` weight under ``option``: codes, scales, zero points (formats
    library), 2 a weight for 16-bit, plus what registered extras add."""
    if option.weight is None:
        base = rows * k * FLOAT_BYTES
    else:
        base = round(bits_per_weight(option.weight, k, rows) * rows * k / 8)
    return base + sum(h.nbytes(option, rows, k) for h in handlers_for(option))


def option_seconds(option: PrecisionOption, rows: int, k: int, target: Target, tokens: int) -> float:
    """Estimated seconds of one call of a ``[rows, k]`` linear on ``tokens`` rows under ``option``
    on ``target``: the roofline with measured efficiencies, 16-bit activations in and out (plus
    what registered extras add)."""
    eff = efficiency(target, option, tokens)
    if eff.as_float:
        base = option_seconds(PrecisionOption(None), rows, k, target, tokens)
    else:
        moved = option_bytes(PrecisionOption(option.weight, option.activation, option.method), rows, k) \
            + tokens * (k + rows) * FLOAT_BYTES
        fmt = option.activation.format if option.activation is not None else "bf16"
        base = target.matmul_seconds(2.0 * tokens * rows * k / eff.math, moved / eff.memory, fmt)
    extra = sum(h.seconds(option, rows, k, tokens, target) for h in handlers_for(option) if h.seconds is not None)
    return base + extra
