"""fp4 e2m1 element encoding: published values, ties-to-even, saturation."""

import pytest
import torch

from qcompile.formats import E2M1_VALUES, fp4_e2m1_decode, fp4_e2m1_encode

PUBLISHED = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def test_every_code_decodes_to_published_value() -> None:
    decoded = fp4_e2m1_decode(torch.arange(16, dtype=torch.uint8))
    assert decoded.dtype == torch.float32
    assert decoded.tolist() == PUBLISHED
    assert E2M1_VALUES.tolist() == PUBLISHED
    assert torch.signbit(decoded[8])  # code 8 is -0


def test_encode_decode_identity_on_grid() -> None:
    codes = torch.arange(16, dtype=torch.uint8)
    again = fp4_e2m1_encode(fp4_e2m1_decode(codes))
    assert torch.equal(again[:8], codes[:8]) and torch.equal(again[9:], codes[9:])
    assert again[8] in (0, 8)  # -0 may keep its sign bit or canonicalize to +0


@pytest.mark.parametrize(
    ("x", "value"),
    [(0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0), (5.0, 4.0),
     (-0.25, 0.0), (-0.75, -1.0), (-1.25, -1.0), (-1.75, -2.0), (-2.5, -2.0), (-3.5, -4.0), (-5.0, -4.0)],
)
def test_ties_to_even(x: float, value: float) -> None:
    assert fp4_e2m1_decode(fp4_e2m1_encode(torch.tensor([x]))).item() == value


def test_saturates() -> None:
    x = torch.tensor([6.0, 7.0, 100.0, 1e30, float("inf"), -6.5, -1e30])
    assert fp4_e2m1_decode(fp4_e2m1_encode(x)).tolist() == [6, 6, 6, 6, 6, -6, -6]


def test_small_values_encode_as_zero() -> None:
    codes = fp4_e2m1_encode(torch.tensor([-0.1, -0.0, 0.0, 1e-30, -0.25]))
    assert codes.dtype == torch.uint8
    assert set(codes.tolist()) <= {0, 8}  # +0 or -0
    assert fp4_e2m1_decode(codes).abs().max() == 0


def test_nearest_value() -> None:
    """Away from ties, encode picks the unique nearest representable value."""
    x = (torch.rand(10000, generator=torch.Generator().manual_seed(0)) - 0.5) * 14
    got = fp4_e2m1_decode(fp4_e2m1_encode(x))
    grid = fp4_e2m1_decode(torch.arange(8, dtype=torch.uint8))
    dist = (x.abs().unsqueeze(-1) - grid).abs()
    nearest = grid[dist.argmin(-1)] * torch.sign(x)
    assert torch.equal(got, nearest)
