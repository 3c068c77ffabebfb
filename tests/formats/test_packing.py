"""pack_bits / unpack_bits: exact inverse, documented bit order, clear errors."""

import pytest
import torch

from qcompile.formats import pack_bits, unpack_bits


def packed_width(k: int, bits: int) -> int:
    """Expected bytes per row: whole bytes, and whole 3-byte units for 3-bit."""
    if bits == 3:
        return -(-k // 8) * 3
    return -(-k * bits // 8)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k", [1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 33, 100, 301])
def test_round_trip(bits: int, k: int) -> None:
    g = torch.Generator().manual_seed(bits * 1000 + k)
    codes = torch.randint(0, 2**bits, (5, k), generator=g, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (5, packed_width(k, bits))
    assert torch.equal(unpack_bits(packed, bits, k), codes)


def test_4bit_low_nibble_first() -> None:
    packed = pack_bits(torch.tensor([[1, 2, 3]], dtype=torch.uint8), 4)
    assert packed.tolist() == [[0x21, 0x03]]


def test_2bit_low_bits_first() -> None:
    packed = pack_bits(torch.tensor([[1, 2, 3, 0, 1]], dtype=torch.uint8), 2)
    assert packed.tolist() == [[1 | 2 << 2 | 3 << 4, 1]]


def test_3bit_little_endian() -> None:
    codes = torch.arange(8, dtype=torch.uint8).reshape(1, 8)
    word = sum(i << (3 * i) for i in range(8))
    assert pack_bits(codes, 3).tolist() == [[word & 0xFF, (word >> 8) & 0xFF, word >> 16]]


def test_errors() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        pack_bits(torch.tensor([[16]], dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="5"):
        pack_bits(torch.zeros(1, 8, dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="D"):
        pack_bits(torch.tensor(3, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="uint8"):
        pack_bits(torch.zeros(1, 8, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_bits(torch.zeros(1, 2, dtype=torch.uint8), 4, 5)
