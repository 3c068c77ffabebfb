"""``torch.ops.qcompile.quantized_linear``: the op lowered graphs call.

Its arguments are plain tensors and scalars (so graphs holding it export,
save and load), ordered by ``op_schema.QuantizedLinearCall``; the reference kernel dequantizes with the formats library and
runs a float matmul anywhere. On CUDA it dispatches to the Triton kernels in
``qcompile.codegen.gemm``; when no kernel covers a combination it says so once,
with the reason, and runs the reference — never silently. On CPU it dispatches to
``qcompile.codegen.cpu`` (torch's packed CPU kernels, ``torch._int_mm``, or a float32 GEMM on a
cached dequantized weight). :func:`describe_kernel` says which, per layer, for the report.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from qcompile.codegen.op_schema import OP_NAME, OP_NAMESPACE, QuantizedLinearCall
from qcompile.formats import QuantizedTensor, QuantSpec, dequantize, fake_quantize

_warned: set[str] = set()
_QUALNAME = f"{OP_NAMESPACE}::{OP_NAME}"


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _triton_path(x: torch.Tensor, w_spec: QuantSpec, a_spec: QuantSpec | None):
    """The Triton entry point if it handles this call, else None (after saying why)."""
    try:
        from qcompile.codegen import gemm
    except ImportError as e:
        if x.is_cuda:
            _warn_once("import", f"qcompile: Triton GEMM kernels unavailable ({e}); using the reference kernel")
        return None
    if not gemm.use_triton(x):
        return None
    reason = gemm.unsupported_reason(w_spec, a_spec, x.device)
    if reason is None and x.dtype not in (torch.bfloat16, torch.float16):
        reason = f"activations are {x.dtype} (the kernels take bfloat16 or float16: cast the model before compiling)"
    if reason is not None:
        key = f"{w_spec.short()}/{a_spec.short() if a_spec else 'a16'}/{x.dtype}"
        _warn_once(key, f"qcompile: no Triton kernel for {key} on {x.device}: {reason}; using the reference kernel")
        return None
    return gemm.triton_quantized_linear


torch.library.define(_QUALNAME, QuantizedLinearCall.schema())


@torch.library.impl(_QUALNAME, "CompositeExplicitAutograd")
def quantized_linear(*args: Any) -> torch.Tensor:
    """The op: arguments as :class:`~qcompile.codegen.op_schema.QuantizedLinearCall` orders them."""
    call = QuantizedLinearCall.from_op_args(args)
    qt = call.quantized_weight()
    kernel = _triton_path(call.x, qt.spec, call.act_spec)
    if kernel is not None:
        fused = {"residual": call.residual} if call.residual is not None else {}
        if call.epilogue != "none":
            fused["epilogue"] = call.epilogue
        return kernel(call.x, qt, call.bias, call.act_spec, **fused)
    if call.x.device.type == "cpu":
        from qcompile.codegen.cpu import cpu_quantized_linear

        y = cpu_quantized_linear(call.x, qt, call.bias, call.act_spec, reference_quantized_linear)
    else:
        y = reference_quantized_linear(call.x, qt, call.bias, call.act_spec)
    return apply_epilogue(y, call.epilogue, call.residual)


def apply_epilogue(y: torch.Tensor, epilogue: str, residual: torch.Tensor | None) -> torch.Tensor:
    """What the Triton kernels fuse after the GEMM, in torch: ``silu(gate) · up`` on the halves of
    ``y``'s last dimension (``silu_mul``), then ``+ residual``."""
    if epilogue == "silu_mul":
        gate, up = y.chunk(2, dim=-1)
        y = torch.nn.functional.silu(gate) * up
    return y + residual if residual is not None else y


@torch.library.register_fake(_QUALNAME)
def _(*args: Any) -> torch.Tensor:
    call = QuantizedLinearCall.from_op_args(args)
    return call.x.new_empty((*call.x.shape[:-1], call.output_features))


def reference_quantized_linear(
    x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None, act_spec: QuantSpec | None
) -> torch.Tensor:
    """Dequantize, fake-quantize the activation if asked, float matmul. Correct everywhere."""
    compute = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    w = dequantize(qt, dtype=compute)
    xq = fake_quantize(x, act_spec) if act_spec is not None else x
    y = torch.nn.functional.linear(xq.to(compute), w, bias.to(compute) if bias is not None else None)
    return y.to(x.dtype)


def describe_kernel(target_kernels: str, is_native: bool, w_spec: QuantSpec, a_spec: QuantSpec | None,
                    x_dtype: torch.dtype, in_features: int) -> tuple[str, list[str]]:
    """The kernel(s) a layer runs on a target's device, and notes where it is simulated, emulated or on
    the reference. ``target_kernels`` is ``Target.kernels``: ``"cpu"``, ``"triton"`` (CUDA) or ``"reference"``."""
    if target_kernels == "cpu":
        from qcompile.codegen.cpu import describe

        return describe(w_spec, a_spec, x_dtype, in_features)
    acts = "" if a_spec is None else ", activations fake-quantized"
    if target_kernels != "triton":
        return "reference", [f"reference kernel (dequantizes on every call{acts})"]
    try:
        from qcompile.codegen import gemm
    except ImportError as e:
        return "reference", [f"reference kernel (dequantizes on every call{acts}): Triton unavailable ({e})"]
    reason = gemm.unsupported_reason(w_spec, a_spec)
    if reason is not None:
        return "reference", [f"reference kernel (dequantizes on every call{acts}): {reason}"]
    decode, prefill = (gemm.kernel_name(w_spec, a_spec, m, in_features) for m in (1, 4096))
    kernel = f"triton:{decode}" if decode == prefill else f"triton:{decode} (decode), triton:{prefill} (prefill)"
    formats = w_spec.format if a_spec is None else f"{w_spec.format} x {a_spec.format}"
    if not is_native:
        return kernel, [f"{formats} not native on the target: emulated by the Triton kernel"]
    if a_spec is not None and a_spec.format == "nvfp4":  # docs/kernels-gemm.md: w4a4.py
        return kernel, ["NVFP4 x NVFP4 decoded to bf16 for the MMA on every GPU (no native FP4 MMA in the kernel yet): emulated"]
    return kernel, []


QUANTIZED_LINEAR = torch.ops.qcompile.quantized_linear.default
