"""The run-time ops of outlier splitting (``passes/outlier_splitting.py`` inserts them).

- ``qcompile::zero_columns(x, index)``: ``x`` with the columns ``index`` of its last dimension
  zeroed: what the quantized GEMM of an LLM.int8 split reads, so the outlier channels inflate no
  activation scale;
- ``qcompile::outlier_columns(x, index, weight)``: ``x[..., index] · weightᵀ`` with ``weight`` the
  ``[N, c]`` float16 columns: LLM.int8's 16-bit GEMM;
- ``qcompile::sparse_residual(x, crow, cols, values, out_features)``: ``x · Sᵀ`` for the CSR matrix
  ``S`` of shape ``[out_features, K]`` (row pointers ``crow``, column indices ``cols``, ``values``):
  the dense-and-sparse residual, through torch's sparse × dense product.

- ``qcompile::activation_residual(x, start, act_spec)``: ``(x − Q(x))[..., start:]`` with ``Q`` the
  layer's activation quantizer (``QuantSpec`` text): the residual channels of ARCQuant's form.

Residual channels otherwise use standard ops: an ``index_select`` reorders the activation, a
``cat`` appends the extra channels, and the layer's ``qcompile::quantized_linear`` runs over the
widened weight (one GEMM).

These are the reference kernels on every device (torch ops in the activation's dtype, float32 for
16-bit activations on CPU): there is no Triton kernel or fused epilogue for them yet, which the
report says per layer (:func:`kernel_note`).
"""

from __future__ import annotations

import warnings

import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if (x.dtype in _LOW_PRECISION and x.device.type == "cpu") else x.dtype


@torch.library.custom_op("qcompile::zero_columns", mutates_args=())
def zero_columns(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` with columns ``index`` (last dimension) set to zero."""
    return x.index_fill(-1, index.long(), 0)


@zero_columns.register_fake
def _(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("qcompile::outlier_columns", mutates_args=())
def outlier_columns(x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x[..., index] · weightᵀ``: the 16-bit product of the kept outlier columns."""
    dtype = _compute_dtype(x)
    cols = x.index_select(-1, index.long()).to(dtype)
    return torch.nn.functional.linear(cols, weight.to(dtype)).to(x.dtype)


@outlier_columns.register_fake
def _(x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("qcompile::sparse_residual", mutates_args=())
def sparse_residual(x: torch.Tensor, crow: torch.Tensor, cols: torch.Tensor, values: torch.Tensor,
                    out_features: int) -> torch.Tensor:
    """``x · Sᵀ`` for the CSR ``S`` (``[out_features, K]``): torch's sparse × dense product, in
    float32 (float64 kept) whatever the activation's dtype (sparse kernels lack 16-bit types)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    k = x.shape[-1]
    with warnings.catch_warnings():  # torch's once-per-process "CSR support is in beta" note
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        # the passes check the CSR arrays (passes/outlier_splitting_math.check_csr) when they build or restore them
        s = torch.sparse_csr_tensor(crow, cols, values.to(dtype), (out_features, k), check_invariants=False)
    out = (s @ x.reshape(-1, k).to(dtype).t()).t()
    return out.reshape(*x.shape[:-1], out_features).to(x.dtype)


@sparse_residual.register_fake
def _(x: torch.Tensor, crow: torch.Tensor, cols: torch.Tensor, values: torch.Tensor,
      out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("qcompile::activation_residual", mutates_args=())
def activation_residual(x: torch.Tensor, start: int, act_spec: str) -> torch.Tensor:
    """``(x − fake_quantize(x, act_spec))[..., start:]``: what quantizing ``x`` loses on its last channels."""
    from qcompile.formats import QuantSpec, fake_quantize

    return (x - fake_quantize(x, QuantSpec.parse(act_spec)))[..., start:].contiguous()


@activation_residual.register_fake
def _(x: torch.Tensor, start: int, act_spec: str) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], x.shape[-1] - start))


ZERO_COLUMNS = torch.ops.qcompile.zero_columns.default
OUTLIER_COLUMNS = torch.ops.qcompile.outlier_columns.default
SPARSE_RESIDUAL = torch.ops.qcompile.sparse_residual.default
ACTIVATION_RESIDUAL = torch.ops.qcompile.activation_residual.default
OUTLIER_OPS = (ZERO_COLUMNS, OUTLIER_COLUMNS, SPARSE_RESIDUAL, ACTIVATION_RESIDUAL)

KERNEL_NOTES = {
    "llm_int8": "LLM.int8 16-bit columns: torch index_select + float GEMM beside the quantized kernel (no fused kernel)",
    "sparse": "sparse residual: torch's CSR x dense product (float32) beside the quantized kernel (no fused "
              "sparse kernel)",
    "residual_channels": "residual channels: torch gather (channel order) + cat widen the activation (the "
                         "activation form's residual is a reference fake-quantization); the quantized kernel runs over "
                         "K + extra channels",
}


def kernel_note(method: str) -> str:
    """What runs a split's extra work, for the report."""
    return KERNEL_NOTES[method]


__all__ = ["ACTIVATION_RESIDUAL", "OUTLIER_COLUMNS", "OUTLIER_OPS", "SPARSE_RESIDUAL", "ZERO_COLUMNS", "activation_residual", "kernel_note", "outlier_columns",
           "sparse_residual", "zero_columns"]
