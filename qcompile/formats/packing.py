"""Bit packing of small integer codes along the last dimension.

Layout (the kernel-facing contract, see docs/formats.md):

- 4 bits: 2 codes per byte, element ``2i`` in the low nibble of byte ``i``.
- 2 bits: 4 codes per byte, element ``4i + j`` in bits ``2j .. 2j+1``.
- 3 bits: 8 codes per 3 bytes; the 3 bytes form a little-endian 24-bit word and
  element ``8i + j`` occupies bits ``3j .. 3j+2`` of word ``i``.
- 8 bits: stored as is (one code per byte).

The last dimension is padded with zero codes to a whole number of bytes
(``unpack_bits`` takes the logical length ``k`` to drop them again).
"""

from __future__ import annotations

import torch

PACKABLE_BITS = (2, 3, 4, 8)


def _check_bits(bits: int) -> None:
    if bits not in PACKABLE_BITS:
        raise ValueError(f"bits must be one of {PACKABLE_BITS}, got {bits}")


def codes_per_unit(bits: int) -> tuple[int, int]:
    """``(codes, bytes)`` of the smallest whole packing unit: 4 bits → (2, 1), 3 bits → (8, 3)."""
    _check_bits(bits)
    if bits == 3:
        return 8, 3
    return 8 // bits, 1


def padded_codes(k: int, bits: int) -> int:
    """``k`` rounded up to a whole packing unit (the number of codes actually stored)."""
    n, _ = codes_per_unit(bits)
    return -(-k // n) * n


def packed_nbytes(k: int, bits: int) -> int:
    """Bytes one row of ``k`` codes of ``bits`` bits occupies once packed."""
    n, b = codes_per_unit(bits)
    return -(-k // n) * b


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``uint8`` codes ``[..., k]`` (each < 2**bits) into ``uint8 [..., packed_nbytes(k, bits)]``."""
    _check_bits(bits)
    if codes.dtype != torch.uint8:
        raise ValueError(f"pack_bits expects uint8 codes, got {codes.dtype}")
    if codes.dim() == 0:
        raise ValueError("pack_bits expects at least a 1-D tensor of codes")
    if bits == 8:
        return codes.clone()
    if codes.numel() and int(codes.max()) >> bits:
        raise ValueError(f"code {int(codes.max())} does not fit in {bits} bits")
    n, nbytes = codes_per_unit(bits)
    k = codes.shape[-1]
    pad = padded_codes(k, bits) - k
    if pad:
        codes = torch.cat([codes, codes.new_zeros(*codes.shape[:-1], pad)], dim=-1)
    units = codes.reshape(*codes.shape[:-1], -1, n)
    if bits == 3:
        word = torch.zeros(units.shape[:-1], dtype=torch.int32, device=codes.device)
        for j in range(8):
            word |= units[..., j].to(torch.int32) << (3 * j)
        out = torch.stack([(word >> (8 * b)) & 0xFF for b in range(nbytes)], dim=-1)
        return out.to(torch.uint8).reshape(*codes.shape[:-1], -1)
    out = units[..., 0].clone()
    for j in range(1, n):
        out |= units[..., j] << (bits * j)
    return out


def unpack_bits(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``uint8 [..., bytes]`` → ``uint8 [..., k]``."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_bits expects uint8 data, got {packed.dtype}")
    if packed.dim() == 0:
        raise ValueError("unpack_bits expects at least a 1-D tensor")
    n, nbytes = codes_per_unit(bits)
    width = packed.shape[-1]
    if width % nbytes or (width // nbytes) * n < k or k < 0:
        raise ValueError(
            f"{width} packed bytes cannot hold k={k} codes of {bits} bits "
            f"(expected {packed_nbytes(k, bits)} bytes)")
    if bits == 8:
        return packed[..., :k].clone()
    lead = packed.shape[:-1]
    if bits == 3:
        b = packed.reshape(*lead, -1, 3).to(torch.int32)
        word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
        codes = torch.stack([(word >> (3 * j)) & 7 for j in range(8)], dim=-1).to(torch.uint8)
    else:
        mask = (1 << bits) - 1
        codes = torch.stack([(packed >> (bits * j)) & mask for j in range(n)], dim=-1)
    return codes.reshape(*lead, -1)[..., :k].contiguous()
