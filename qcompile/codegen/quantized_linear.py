"""``torch.ops.qcompile.quantized_linear``: the op lowered graphs call.

Its arguments are plain tensors and scalars (so graphs holding it export,
save and load), ordered by ``op_schema.QuantizedLinearCall``; the reference kernel dequantizes with the formats library and
runs a float matmul anywhere. On CUDA it dispatches to the Triton kernels in
``qcompile.codegen.gemm``; when no kernel covers a combination it says so once,
with the reason, and runs the reference — never silently.
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
    if reason is not None:
        key = f"{w_spec.short()}/{a_spec.short() if a_spec else 'a16'}"
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
        return kernel(call.x, qt, call.bias, call.act_spec)
    return reference_quantized_linear(call.x, qt, call.bias, call.act_spec)


@torch.library.register_fake(_QUALNAME)
def _(*args: Any) -> torch.Tensor:
    call = QuantizedLinearCall.from_op_args(args)
    return call.x.new_empty((*call.x.shape[:-1], call.out_features))


def reference_quantized_linear(
    x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None, act_spec: QuantSpec | None
) -> torch.Tensor:
    """Dequantize, fake-quantize the activation if asked, float matmul. Correct everywhere."""
    compute = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    w = dequantize(qt, dtype=compute)
    xq = fake_quantize(x, act_spec) if act_spec is not None else x
    y = torch.nn.functional.linear(xq.to(compute), w, bias.to(compute) if bias is not None else None)
    return y.to(x.dtype)


QUANTIZED_LINEAR = torch.ops.qcompile.quantized_linear.default
