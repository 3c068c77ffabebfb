"""Shared helpers for the formats tests."""

from __future__ import annotations

import torch

from qcompile.formats import QuantizedTensor


def raw(t: torch.Tensor | None) -> torch.Tensor | None:
    """View 1-byte float tensors as uint8 so torch.equal compares bits (and NaN == NaN)."""
    if t is not None and t.dtype.is_floating_point and t.element_size() == 1:
        return t.view(torch.uint8)
    return t


def same_bits(a: QuantizedTensor, b: QuantizedTensor) -> dict[str, bool]:
    """Per stored tensor: are the two quantized tensors bit-identical?"""
    ta, tb = a.tensors(), b.tensors()
    assert ta.keys() == tb.keys()
    return {k: ta[k].dtype == tb[k].dtype and torch.equal(raw(ta[k]), raw(tb[k])) for k in ta}


def gaussian(rows: int, k: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, k, generator=g).to(dtype)
