"""Canonical ops of the qcompile IR.

Frontends raise decomposed patterns to these so that passes match one node
instead of a dozen. Each is a ``torch.library`` custom op with a fake kernel,
so graphs that hold them still export, trace and run anywhere.
"""

from __future__ import annotations

import torch

from qcompile.formats.orthogonal import hadamard_transform as _hadamard_reference

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def rms_norm_math(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm as Llama-family models compute it: normalize in at least float32,
    cast back to the input dtype, then scale by ``weight``. (The op's body, as a plain function
    that ``torch.compile`` traces through and fuses.)"""
    xf = x.float() if x.dtype in _LOW_PRECISION else x
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y * weight if weight is not None else y.clone()


@torch.library.custom_op("qcompile::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm as Llama-family models compute it (:func:`rms_norm_math`)."""
    return rms_norm_math(x, weight, eps)


@rms_norm.register_fake
def _(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    dtype = torch.promote_types(x.dtype, weight.dtype) if weight is not None else x.dtype
    return x.new_empty(x.shape, dtype=dtype)


def layer_norm_math(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm over the last dimension (the op's body, for ``torch.compile`` to trace through)."""
    return torch.nn.functional.layer_norm(x, x.shape[-1:], weight, bias, eps)


@torch.library.custom_op("qcompile::layer_norm", mutates_args=())
def layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """LayerNorm over the last dimension."""
    return layer_norm_math(x, weight, bias, eps)


@layer_norm.register_fake
def _(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("qcompile::channel_scale", mutates_args=())
def channel_scale(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * scale`` over the last dimension: a per-channel scale that scale migration
    (SmoothQuant, AWQ) inserts where no preceding op can absorb it; fusion folds it into the
    kernel that reads ``x``."""
    return x * scale.to(x.dtype)


@channel_scale.register_fake
def _(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("qcompile::hadamard_transform", mutates_args=())
def hadamard_transform(x: torch.Tensor, signs: torch.Tensor | None, block: torch.Tensor | None,
                       scale: float, groups: int = 1) -> torch.Tensor:
    """The online rotation ``x ← x · Q`` along the last dimension, ``Q = diag(signs) · (H_p ⊗ block)
    · scale`` with ``H_p`` the ``±1`` Sylvester matrix of ``p = n / block.shape[0]`` (a power of
    two) and ``block`` an ``m × m`` matrix (``±1`` Hadamard or random orthogonal; ``None``: m = 1).
    ``groups > 1``: ``I_groups ⊗ Q`` (``Q`` over ``n / groups`` channels, applied to each run of
    them). ``rotate_online`` inserts it before a linear whose weight absorbed ``Q`` (exact). This is the
    reference (``formats.orthogonal.hadamard_transform``: float32, float64 kept); on CUDA,
    ``qcompile.codegen.hadamard`` registers a Triton fast Walsh–Hadamard kernel for it, loaded on
    the first CUDA call (importing qcompile does not import triton)."""
    if x.is_cuda:
        from qcompile.codegen.hadamard import cuda_hadamard_transform

        return cuda_hadamard_transform(x, signs, block, scale, groups)
    return _hadamard_reference(x, signs, block, scale, groups)


@hadamard_transform.register_fake
def _(x: torch.Tensor, signs: torch.Tensor | None, block: torch.Tensor | None, scale: float,
      groups: int = 1) -> torch.Tensor:
    return torch.empty_like(x)


RMS_NORM = torch.ops.qcompile.rms_norm.default
LAYER_NORM = torch.ops.qcompile.layer_norm.default
CHANNEL_SCALE = torch.ops.qcompile.channel_scale.default
HADAMARD_TRANSFORM = torch.ops.qcompile.hadamard_transform.default
NORM_OPS = (RMS_NORM, LAYER_NORM)
LINEAR = torch.ops.aten.linear.default
