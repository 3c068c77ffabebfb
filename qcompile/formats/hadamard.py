"""Normalized Hadamard matrices (Sylvester construction) for rotating keys and queries: math that
kernels (the decode kernel multiplies by ``hadamard_signs``), the KV cache and references share.

An orthogonal rotation applied to both q and k leaves every logit q·k unchanged, while it spreads
a few large key channels over all channels, so that per-token quantization loses less
(QuaRot / TurboQuant style). Only power-of-two sizes; the rotation-folding pass brings its own
general construction.
"""

from __future__ import annotations

import functools

import torch


def is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


@functools.lru_cache(maxsize=32)
def _hadamard_cpu(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / (n ** 0.5)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """The symmetric orthogonal ``n × n`` Hadamard matrix ``H`` (``H @ H == I``).

    Cached per (size, dtype, device), so that calls inside a CUDA graph capture copy nothing.
    Treat the result as read-only.
    """
    if not is_power_of_two(n):
        raise ValueError(f"Hadamard rotation needs a power-of-two size, got head_dim={n}")
    return _hadamard_on(n, dtype, str(torch.device(device)))


@functools.lru_cache(maxsize=64)
def _hadamard_on(n: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    return _hadamard_cpu(n).to(device=device, dtype=dtype)


def hadamard_signs(n: int, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """The unnormalized ``±1`` Hadamard matrix (``sqrt(n) * hadamard_matrix(n)``), exact in any
    float dtype: kernels multiply by it in bf16/fp16 and apply ``1/sqrt(n)`` in float32."""
    if not is_power_of_two(n):
        raise ValueError(f"Hadamard rotation needs a power-of-two size, got head_dim={n}")
    return _signs_on(n, dtype, str(torch.device(device)))


@functools.lru_cache(maxsize=64)
def _signs_on(n: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    return (_hadamard_cpu(n) * (n ** 0.5)).round().to(device=device, dtype=dtype)


def rotate(x: torch.Tensor) -> torch.Tensor:
    """``x @ H`` along the last dimension, computed in float32 (float64 stays float64)."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = hadamard_matrix(x.shape[-1], work, x.device)
    return (x.to(work) @ h).to(x.dtype)
