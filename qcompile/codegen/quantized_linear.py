"""``torch.ops.qcompile.quantized_linear``: the op lowered graphs call.

Its arguments are plain tensors and scalars (so graphs holding it export,
save and load); the reference kernel dequantizes with the formats library and
runs a float matmul anywhere. On CUDA it dispatches to the Triton kernels in
``qcompile.codegen.gemm``; when no kernel covers a combination it says so once,
with the reason, and runs the reference — never silently.
"""

from __future__ import annotations

import warnings

import torch

from qcompile.formats import QuantizedTensor, QuantSpec, dequantize, fake_quantize

_warned: set[str] = set()


def weight_spec(fmt: str, group_size: int, symmetric: bool) -> QuantSpec:
    return QuantSpec(fmt, group_size=group_size, symmetric=symmetric)


def activation_spec(fmt: str, group_size: int) -> QuantSpec | None:
    return QuantSpec(fmt, group_size=group_size, dynamic=True) if fmt else None


def as_quantized_tensor(
    qdata: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, global_scale: torch.Tensor | None,
    fmt: str, group_size: int, symmetric: bool, in_features: int,
) -> QuantizedTensor:
    return QuantizedTensor(weight_spec(fmt, group_size, symmetric), (scale.shape[0], in_features), qdata, scale, zero, global_scale)


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


@torch.library.custom_op("qcompile::quantized_linear", mutates_args=())
def quantized_linear(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    global_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    weight_format: str,
    group_size: int,
    symmetric: bool,
    in_features: int,
    act_format: str,
    act_group_size: int,
) -> torch.Tensor:
    qt = as_quantized_tensor(qdata, scale, zero, global_scale, weight_format, group_size, symmetric, in_features)
    a_spec = activation_spec(act_format, act_group_size)
    kernel = _triton_path(x, qt.spec, a_spec)
    if kernel is not None:
        return kernel(x, qt, bias, a_spec)
    return reference_quantized_linear(x, qt, bias, a_spec)


@quantized_linear.register_fake
def _(x, qdata, scale, zero, global_scale, bias, weight_format, group_size, symmetric, in_features, act_format, act_group_size):
    return x.new_empty((*x.shape[:-1], scale.shape[0]))


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
