"""Hypothesis property tests over shapes, group sizes, symmetry, formats and input dtypes.

Tensors are generated from a seed (fast) with a random magnitude profile,
exact zeros and occasional all-zero groups, rather than element by element.
Set QC_HYPOTHESIS_EXAMPLES (default 120) for a longer search; 1500 passes.
"""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcompile.formats import (
    FORMATS,
    PER_CHANNEL,
    QuantSpec,
    bits_per_weight,
    dequantize,
    fake_quantize,
    quantize,
)

from .helpers import raw, same_bits

SETTINGS = settings(max_examples=int(os.environ.get("QC_HYPOTHESIS_EXAMPLES", "120")), deadline=None, suppress_health_check=[HealthCheck.too_slow])
FIXED = {"nvfp4": 16, "mxfp4": 32, "mxfp8": 32}
INPUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def cases(draw: st.DrawFn) -> tuple[torch.Tensor, QuantSpec]:
    fmt = draw(st.sampled_from(FORMATS))
    rows = draw(st.integers(1, 8))
    k = draw(st.integers(1, 300))
    if fmt in FIXED:
        group = FIXED[fmt]
    else:
        group = draw(st.sampled_from([PER_CHANNEL, 1, 7, 8, 16, 32, 64, 128, 256]))
    symmetric = draw(st.booleans()) if fmt.startswith("int") else True
    scale_dtype = draw(st.sampled_from(["float16", "bfloat16", "float32"]))
    dtype = draw(st.sampled_from(INPUT_DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    magnitude = draw(st.sampled_from([1e-3, 1.0, 30.0, 1000.0]))
    offset = draw(st.sampled_from([0.0, 0.0, 2.0]))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, k, generator=g) * magnitude + offset * magnitude
    w[torch.rand(rows, k, generator=g) < 0.1] = 0.0
    if draw(st.booleans()):
        w[:, : max(1, k // 3)] = 0.0  # all-zero groups
    return w.to(dtype), QuantSpec(fmt, group, symmetric, scale_dtype)


def _check_layout(qt, spec: QuantSpec, rows: int, k: int) -> None:
    g = spec.group_size or k
    n_groups = -(-k // g)
    assert qt.shape == (rows, k)
    assert qt.scale.shape == (rows, n_groups)
    assert qt.padded_k == n_groups * g
    assert qt.data.shape[0] == rows
    assert qt.data.shape[1] * 8 >= n_groups * g * spec.bits
    assert (qt.zero is not None) == (not spec.symmetric)
    assert (qt.global_scale is not None) == (spec.format == "nvfp4")


@SETTINGS
@given(cases())
def test_round_trip_is_bit_exact(case: tuple[torch.Tensor, QuantSpec]) -> None:
    """quantize → dequantize → quantize reproduces codes, scales, zeros, global scale."""
    w, spec = case
    qt = quantize(w, spec)
    _check_layout(qt, spec, *w.shape)
    deq = dequantize(qt)
    assert deq.shape == w.shape and deq.dtype == torch.float32
    assert torch.isfinite(deq).all()
    again = quantize(deq, spec)
    assert all(same_bits(qt, again).values()), same_bits(qt, again)


@SETTINGS
@given(cases())
def test_fake_quantize_agrees_with_quantize(case: tuple[torch.Tensor, QuantSpec]) -> None:
    w, spec = case
    fq = fake_quantize(w, spec)
    assert fq.dtype == w.dtype and fq.shape == w.shape
    qt = quantize(w, spec)
    deq = dequantize(qt, w.dtype)
    # quantize() moves float32 scales / asymmetric zero points to the exact
    # re-quantization fixed point ("polish"); fake_quantize() does one step.
    polished = not spec.symmetric or (spec.scale_dtype == "float32" and spec.format not in FIXED)
    if not polished:
        assert torch.equal(raw(fq), raw(deq))
        # Idempotent: a fake-quantized float32 tensor is its own fake quantization.
        fq32 = fake_quantize(w.float(), spec)
        assert torch.equal(fake_quantize(fq32, spec), fq32)
    else:
        step = qt.scale.float().max() * 1.01
        assert torch.all((fq.float() - deq.float()).abs() <= step + deq.float().abs() * 2**-7)


@SETTINGS
@given(cases())
def test_error_is_bounded_by_half_a_step(case: tuple[torch.Tensor, QuantSpec]) -> None:
    """Symmetric int: every element is within half a quantization step of its value."""
    w, spec = case
    if not (spec.format.startswith("int") and spec.symmetric):
        return
    qt = quantize(w, spec)
    rows, k = w.shape
    g = spec.group_size or k
    step = qt.scale.float().repeat_interleave(g, 1)[:, :k]
    err = (w.float() - dequantize(qt)).abs()
    assert torch.all(err <= step * 0.5 * (1 + 2**-6) + 1e-30)


@SETTINGS
@given(cases())
def test_zeros_stay_zero(case: tuple[torch.Tensor, QuantSpec]) -> None:
    w, spec = case
    deq = dequantize(quantize(w, spec))
    assert torch.all(deq[w == 0] == 0)


@SETTINGS
@given(cases())
def test_nbytes_matches_bits_per_weight(case: tuple[torch.Tensor, QuantSpec]) -> None:
    w, spec = case
    rows, k = w.shape
    qt = quantize(w, spec)
    global_bits = 32 if spec.format == "nvfp4" else 0
    expected = bits_per_weight(spec, k) * rows * k + global_bits
    assert abs(qt.nbytes() * 8 - expected) < 1e-6 * expected
