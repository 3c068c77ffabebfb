"""The Triton fast Walsh–Hadamard transform (codegen/hadamard) against the float64 reference, on
the test device (natively on CUDA, else under the interpreter on CPU): outputs poisoned (NaN) first, Hadamard and random blocks, odd row
counts, 3-D and strided inputs, 16-bit dtypes."""

import pytest
import torch

pytest.importorskip("triton")

from qcompile.codegen import hadamard  # noqa: E402
from qcompile.codegen.hadamard import launch_config, triton_hadamard_transform, unsupported_reason  # noqa: E402
from qcompile.formats.orthogonal import rotation_factors  # noqa: E402
from qcompile.ir.ops import HADAMARD_TRANSFORM  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.bfloat16: 1.5e-2, torch.float16: 2e-3}
"""Worst error relative to the largest output: float32 arithmetic with the block matmul in split
16-bit operands (~1e-5), then the output dtype's rounding."""


def _check(x, r, dtype):
    x = x.to(dtype)
    out = torch.full(x.shape, float("nan"), dtype=dtype, device=DEV)
    y = triton_hadamard_transform(x.to(DEV), r.signs, r.block, r.scale, out=out)
    assert y is out and not torch.isnan(y).any()
    ref = r.apply(x.double().cpu())
    err = float((y.double().cpu() - ref).abs().max() / ref.abs().max())
    assert err <= TOL[dtype], (tuple(x.shape), dtype, err)


@pytest.mark.parametrize("n", [64, 384, 1536])
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_matches_float64_reference(n, rows):
    r = rotation_factors(n, seed=rows)
    _check(torch.randn(rows, n), r, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit(dtype):
    for n in (64, 384):
        _check(torch.randn(5, n), rotation_factors(n, seed=1), dtype)


@pytest.mark.parametrize("n", [172, 576, 296])
def test_random_and_large_blocks(n):
    """172 = 4·43: Sylvester 4 ⊗ a random orthogonal 43 (split operands on both sides); 576 = 16·36;
    296 = 2·148: a block beyond MAX_FUSED_BLOCK, multiplied on the host after the kernel."""
    r = rotation_factors(n, seed=2)
    assert r.block is not None and r.block_is_hadamard == (n != 172)
    _check(torch.randn(6, n), r, torch.float32)


def test_shapes_strides_and_no_signs():
    r = rotation_factors(384, seed=3)
    _check(torch.randn(2, 5, 384), r, torch.float32)  # 3-D
    wide = torch.randn(7, 2 * 384).to(DEV)
    _check(wide[:, ::2], r, torch.float32)  # strided last dimension: copied contiguous
    plain = rotation_factors(64, seed=0)
    x = torch.randn(4, 64)
    y = triton_hadamard_transform(x.to(DEV), None, None, 0.125)
    torch.testing.assert_close(y.double().cpu(), x.double() @ (plain.matrix() / plain.signs[:, None]),
                               rtol=0, atol=1e-5)


def test_checks_and_configs():
    x = torch.randn(2, 384, device=DEV)
    r = rotation_factors(384, 0)
    assert unsupported_reason(x.double(), r.signs, r.block).startswith("dtype")
    assert "not square" in unsupported_reason(x, r.signs, r.block[:, :6])
    assert "power of two" in unsupported_reason(torch.randn(2, 380, device=DEV), None, r.block)
    assert "signs" in unsupported_reason(x, r.signs[:10], r.block)
    with pytest.raises(ValueError, match="out must be"):
        triton_hadamard_transform(x, r.signs, r.block, r.scale, out=torch.empty(3, 384, device=DEV))
    for n, mb in ((4096, 1), (11008, 344), (14336, 28), (18944, 148), (384, 12)):
        cfg = launch_config(n, mb)
        assert cfg["P"] * cfg["MB"] == n and cfg["P"] * cfg["MB_PAD"] <= hadamard.MAX_TILE
        assert cfg["HAS_BLOCK"] == (1 < mb <= hadamard.MAX_FUSED_BLOCK)
        if cfg["HAS_BLOCK"]:
            assert cfg["BLOCK_M"] * cfg["P"] >= 16 and cfg["MB_PAD"] >= 16 and cfg["MB_PAD"] % cfg["BN"] == 0


def test_op_on_cpu_is_the_reference_and_cuda_fallback():
    """The CUDA registration leaves CPU dispatch on the reference; calls the kernel does not
    take (float64) fall back to the reference."""
    r = rotation_factors(384, 4)
    x = torch.randn(3, 384, dtype=torch.float64)
    torch.testing.assert_close(HADAMARD_TRANSFORM(x, r.signs, r.block, r.scale), r.apply(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(hadamard.cuda_hadamard_transform(x, r.signs, r.block, r.scale), r.apply(x), rtol=0, atol=1e-12)
    hadamard.register_cuda_kernel()  # idempotent


@pytest.mark.parametrize(("n", "group"), [(384, 128), (1536, 128), (768, 64)])
def test_grouped_transform_runs_the_kernel_per_group(n, group):
    """``groups > 1`` (``I ⊗ Q_g``): the kernel on each group as a row, against float64
    (through the op's CUDA entry, which the interpreter runs on CPU)."""
    from qcompile.formats.orthogonal import grouped_rotation_factors

    r = grouped_rotation_factors(n, group, seed=3)
    x = torch.randn(2, 5, n, device=DEV)
    y = hadamard.cuda_hadamard_transform(x, r.signs, r.block, r.scale, r.groups)
    ref = r.apply(x.double().cpu())
    assert y.shape == x.shape and not torch.isnan(y).any()
    assert float((y.double().cpu() - ref).abs().max() / ref.abs().max()) <= TOL[torch.float32]
    with pytest.raises(ValueError, match="do not divide"):
        hadamard.cuda_hadamard_transform(x, r.signs, r.block, r.scale, 7)
