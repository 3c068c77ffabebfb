"""Formats-library packed tensors → ONNX Runtime's layouts. Pure functions; nothing is re-quantized.

Every function takes a :class:`~qcompile.formats.QuantizedTensor` in the canonical layout
(``docs/formats.md``) and returns the same numbers laid out as an ONNX Runtime op reads them,
so that the op's dequantization gives exactly ``qcompile.formats.dequantize(qt)``:

- :func:`to_matmul_nbits`: int8/int4/int3/int2 → ``com.microsoft.MatMulNBits`` (``B`` uint8
  ``[N, n_blocks, blob]``, float32 ``scales [N, n_blocks]``, packed uint8 ``zero_points``).
  Our codes are already packed low bits first along K per row, which is MatMulNBits' bit order, so
  ``B`` is a reshape; symmetric codes are ``q + 2^(b-1)``, MatMulNBits' default zero point, so
  symmetric weights carry no zero points (int8's signed codes get the ``+128`` offset). int3 has
  no 3-bit kernel: its codes go into a 4-bit container (same values, 4 bits per weight). A
  per-channel scale is repeated over blocks of :func:`per_channel_block` (MatMulNBits has no
  per-channel mode).
- :func:`to_matmul_integer`: symmetric per-channel int8 → ``MatMulInteger``'s ``B`` (int8
  ``[K, N]``) and a float32 per-column scale.
- :func:`to_dequantize_linear`: fp8 (e4m3fn / e5m2) and MXFP8 → ``DequantizeLinear`` on ``[K, N]``
  (float8 data, float32 scales per block along K, or per column). MXFP8's E8M0 exponents become
  the float32 powers of two they encode.

Scales are stored float32 (ORT's float ops take the activation's type): float16 and bfloat16
scales convert exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qcompile.formats import QuantizedTensor, e8m0_decode, pack_bits, unpack_bits

NBITS_FORMATS = ("int8", "int4", "int3", "int2")
"""Weight formats MatMulNBits runs (int3 in a 4-bit container)."""
DEQUANTIZE_LINEAR_FORMATS = ("fp8_e4m3", "fp8_e5m2", "mxfp8")
"""Weight formats exported as ``DequantizeLinear`` + ``MatMul`` (float8 data)."""
NBITS_MIN_BLOCK = 16
NBITS_MAX_BLOCK = {2: 256}
"""MatMulNBits block sizes: powers of two from 16 (ORT's schema); ORT 1.32's CPU kernel caps 2-bit
blocks at 256 ("2-bit MatMulNBits block_size must not exceed 256")."""
PER_CHANNEL_BLOCK = 128
"""Block a per-channel scale is repeated over when K is a multiple of it (else the largest power of
two from 16 dividing K, else this with K padded): 4 bytes of scale per 128 weights."""


class RepackError(ValueError):
    """A packed tensor has no ONNX Runtime layout (the message names the format and the supported set)."""


@dataclass(frozen=True)
class NBitsWeight:
    """The inputs and attributes of one ``com.microsoft.MatMulNBits``."""

    b: torch.Tensor
    """uint8 ``[N, n_blocks, block_size * bits / 8]``."""
    scales: torch.Tensor
    """float32 ``[N, n_blocks]``."""
    zero_points: torch.Tensor | None
    """uint8 ``[N, ceil(n_blocks * bits / 8)]``, codes packed low bits first per row; ``None``: the
    default ``2^(bits-1)``."""
    k: int
    n: int
    bits: int
    block_size: int

    def nbytes(self) -> int:
        """Bytes of the tensors (what the ONNX file stores for the layer's weight)."""
        return sum(t.numel() * t.element_size() for t in (self.b, self.scales, self.zero_points) if t is not None)


@dataclass(frozen=True)
class IntegerWeight:
    """``MatMulInteger``'s constant ``B`` and the per-column scale applied after it."""

    b: torch.Tensor
    """int8 ``[K, N]``."""
    scale: torch.Tensor
    """float32 ``[N]``."""

    def nbytes(self) -> int:
        """Bytes of the tensors."""
        return self.b.numel() + 4 * self.scale.numel()


@dataclass(frozen=True)
class DequantizeWeight:
    """``DequantizeLinear``'s constant inputs for a weight laid out ``[K, N]`` (so that ``MatMul(x, W)``
    needs no transpose)."""

    data: torch.Tensor
    """float8 ``[K, N]``."""
    scale: torch.Tensor
    """float32 ``[ceil(K / block_size), N]`` (blocked along K), or ``[N]`` with ``block_size`` 0 (per column)."""
    block_size: int

    def nbytes(self) -> int:
        """Bytes of the tensors."""
        return self.data.numel() * self.data.element_size() + 4 * self.scale.numel()


def per_channel_block(k: int) -> int:
    """The MatMulNBits block a per-channel scale is repeated over (see :data:`PER_CHANNEL_BLOCK`)."""
    if k % PER_CHANNEL_BLOCK == 0:
        return PER_CHANNEL_BLOCK
    block = PER_CHANNEL_BLOCK
    while block > NBITS_MIN_BLOCK and k % block:
        block //= 2
    return block if k % block == 0 else PER_CHANNEL_BLOCK


def nbits_block_reason(qt: QuantizedTensor) -> str | None:
    """Why ``qt``'s groups cannot be MatMulNBits blocks (``None``: they can)."""
    if qt.spec.format not in NBITS_FORMATS:
        return f"MatMulNBits takes {', '.join(NBITS_FORMATS)} weights, not {qt.spec.format}"
    if qt.spec.group_size == 0:
        return None
    group = qt.spec.group_size
    bits = _container_bits(qt.spec.bits)
    top = NBITS_MAX_BLOCK.get(bits)
    if group < NBITS_MIN_BLOCK or group & (group - 1) or (top is not None and group > top):
        sizes = f"powers of two from {NBITS_MIN_BLOCK}" + (f" to {top}" if top is not None else "")
        return f"MatMulNBits block sizes are {sizes} ({bits}-bit), not group {group}"
    return None


def _container_bits(bits: int) -> int:
    return 4 if bits == 3 else bits


def _codes(qt: QuantizedTensor) -> torch.Tensor:
    """uint8 codes ``[N, padded K]`` in MatMulNBits' convention (``value = (code - zero) * scale``)."""
    padded = qt.padded_k
    if qt.spec.bits == 8:
        data = qt.data[:, :padded]
        if data.dtype == torch.int8:  # symmetric: signed q, MatMulNBits' default zero point 128
            return (data.to(torch.int16) + 128).to(torch.uint8)
        return data
    return unpack_bits(qt.data, qt.spec.bits, padded)


def to_matmul_nbits(qt: QuantizedTensor) -> NBitsWeight:
    """``qt`` (int8/int4/int3/int2, grouped or per channel) as MatMulNBits inputs; ``RepackError``
    when its groups are not MatMulNBits blocks (:func:`nbits_block_reason`)."""
    reason = nbits_block_reason(qt)
    if reason is not None:
        raise RepackError(reason)
    n, k = qt.shape
    bits = _container_bits(qt.spec.bits)
    codes = _codes(qt)
    scales = qt.scale.float()
    zero = qt.zero
    if qt.spec.bits == 3 and zero is None:  # into 4-bit codes: the same values around the default zero 8
        codes = codes + 4
    if qt.spec.group_size == 0:
        block = per_channel_block(k)
        blocks = -(-k // block)
        codes = codes[:, :k]
        if blocks * block != k:  # pad K with the code of 0.0
            fill = torch.full((n, 1), 2 ** (bits - 1), dtype=torch.uint8) if zero is None else zero
            codes = torch.cat([codes, fill.expand(n, blocks * block - k)], dim=1)
        scales = scales.expand(n, blocks)
        zero = None if zero is None else zero.expand(n, blocks)
    else:
        block = qt.spec.group_size
        blocks = qt.scale.shape[1]
    b = pack_bits(codes.contiguous(), bits).reshape(n, blocks, block * bits // 8)
    zero_points = None
    if zero is not None:
        per_byte = 8 // bits
        width = -(-blocks // per_byte) * per_byte
        padded = torch.cat([zero, zero.new_zeros(n, width - blocks)], dim=1) if width != blocks else zero
        zero_points = pack_bits(padded.contiguous(), bits)
    return NBitsWeight(b.contiguous(), scales.contiguous(), zero_points, k, n, bits, block)


def to_matmul_integer(qt: QuantizedTensor) -> IntegerWeight:
    """Symmetric per-channel int8 ``qt`` as ``MatMulInteger``'s ``B [K, N]`` and its column scales."""
    spec = qt.spec
    if spec.format != "int8" or not spec.symmetric or not (spec.group_size == 0 or spec.group_size >= qt.shape[1]):
        raise RepackError(f"MatMulInteger (W8A8) takes symmetric per-channel int8 weights, not {spec.short()}")
    k = qt.shape[1]
    return IntegerWeight(qt.data[:, :k].t().contiguous(), qt.scale[:, 0].float().contiguous())


def to_dequantize_linear(qt: QuantizedTensor) -> DequantizeWeight:
    """fp8 / MXFP8 ``qt`` as ``DequantizeLinear`` inputs on ``[K, N]``."""
    spec = qt.spec
    if spec.format not in DEQUANTIZE_LINEAR_FORMATS:
        raise RepackError(f"DequantizeLinear export takes {', '.join(DEQUANTIZE_LINEAR_FORMATS)} weights, "
                          f"not {spec.format}")
    n, k = qt.shape
    data = qt.data[:, :k].t().contiguous()
    scale = e8m0_decode(qt.scale) if spec.format == "mxfp8" else qt.scale.float()
    if spec.group_size == 0 or qt.scale.shape[1] == 1 and qt.group_size >= k:
        return DequantizeWeight(data, scale[:, 0].contiguous(), 0)
    return DequantizeWeight(data, scale.t().contiguous(), qt.group_size)
