"""Hardware targets as data: native formats, a simple cost model, a default recipe.

A target answers three questions for the rest of the compiler: which formats
run natively (everything else is emulated or simulated, and the report says
so), what a byte and a FLOP cost there (for the mixed-precision solver), and
which recipe to use when the user names none.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    """A hardware target as data: the formats it runs natively, its kernels, a roofline cost model
    (bandwidth, matmul rates) and the recipe used when none is named."""
    name: str
    description: str
    native_weight_formats: tuple[str, ...]
    native_activation_formats: tuple[str, ...]
    default_recipe: str
    memory_bandwidth_gbs: float
    """Sustained device-memory bandwidth, GB/s (cost model: bytes moved)."""
    matmul_tflops: dict[str, float]
    """Dense matmul rate by operand format (cost model: math)."""
    kernels: str = "reference"
    """What runs the quantized linears there: ``triton`` (Triton kernels on CUDA), ``cpu`` (torch's packed
    CPU kernels, ``qcompile.codegen.cpu``) or ``reference`` (dequantize, float matmul)."""

    def is_native(self, weight_format: str, activation_format: str | None) -> bool:
        """Whether weights of ``weight_format`` (with ``activation_format`` activations, or none) run
        natively here rather than emulated or simulated."""
        ok_w = weight_format in self.native_weight_formats
        ok_a = activation_format is None or activation_format in self.native_activation_formats
        return ok_w and ok_a

    def matmul_seconds(self, flops: float, bytes_moved: float, operand_format: str = "bf16") -> float:
        """Roofline estimate: the larger of math time and memory time."""
        rate = self.matmul_tflops.get(operand_format, self.matmul_tflops["bf16"]) * 1e12
        return max(flops / rate, bytes_moved / (self.memory_bandwidth_gbs * 1e9))


_INT_W = ("int8", "int4", "int3", "int2")

TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            "cpu", "Any CPU: int8/int4 weight-only on torch's packed kernels (bf16), W8A8 on torch._int_mm.",
            native_weight_formats=("int8", "int4"), native_activation_formats=("int8",),
            default_recipe="w4a16", memory_bandwidth_gbs=50.0, matmul_tflops={"bf16": 1.0, "fp32": 1.0},
            kernels="cpu",
        ),
        Target(
            "ampere", "NVIDIA A100-class: int8/int4 weight-only Triton kernels (int8 tensor cores; W8A8 int8 simulated until its kernel exists).",
            native_weight_formats=_INT_W, native_activation_formats=("int8",),
            default_recipe="w4a16", memory_bandwidth_gbs=1935.0,
            matmul_tflops={"bf16": 312.0, "int8": 624.0}, kernels="triton",
        ),
        Target(
            "hopper", "NVIDIA H100/H200: FP8 tensor cores; W8A8 FP8 and int4 W4A16. FP4 runs emulated.",
            native_weight_formats=(*_INT_W, "fp8_e4m3", "fp8_e5m2"),
            native_activation_formats=("int8", "fp8_e4m3", "fp8_e5m2"),
            default_recipe="fp8", memory_bandwidth_gbs=3350.0,
            matmul_tflops={"bf16": 989.0, "fp8_e4m3": 1979.0, "int8": 1979.0}, kernels="triton",
        ),
        Target(
            "blackwell", "NVIDIA B200-class: native FP4 (NVFP4/MXFP4) and FP8 tensor cores.",
            native_weight_formats=(*_INT_W, "fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "nvfp4", "mxfp4", "mxfp8"),
            native_activation_formats=("int8", "fp8_e4m3", "fp8_e5m2", "nvfp4", "mxfp4", "mxfp8"),
            default_recipe="nvfp4", memory_bandwidth_gbs=8000.0,
            matmul_tflops={"bf16": 2250.0, "fp8_e4m3": 4500.0, "nvfp4": 9000.0, "mxfp4": 9000.0},
            kernels="triton",
        ),
        Target(
            "ort-cpu", "ONNX Runtime on CPU (qcompile.export_onnx): int8/int4/int2 weight-only as MatMulNBits, W8A8 "
            "int8 per-token through MatMulInteger; fp8 weights through DequantizeLinear (docs/onnx-export.md).",
            native_weight_formats=("int8", "int4", "int2"), native_activation_formats=("int8",),
            default_recipe="w4a16", memory_bandwidth_gbs=50.0, matmul_tflops={"bf16": 1.0, "fp32": 1.0},
            kernels="cpu",
        ),
        Target(
            "ort-cuda", "ONNX Runtime with the CUDA execution provider: exported like ort-cpu (data only: not "
            "measured on a GPU yet).",
            native_weight_formats=("int8", "int4", "int2"), native_activation_formats=("int8",),
            default_recipe="w4a16", memory_bandwidth_gbs=1935.0, matmul_tflops={"bf16": 312.0, "int8": 624.0},
            kernels="triton",
        ),
    )
}


def get_target(name: str | Target) -> Target:
    """The target named ``name`` (a :class:`Target` passes through); ``ValueError`` lists the valid
    names for an unknown one."""
    if isinstance(name, Target):
        return name
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; valid targets: {', '.join(TARGETS)}")
    return TARGETS[name]
