"""Quantize with given group parameters: the grid one ``QuantizedTensor``'s scales define.

``quantize`` derives each group's parameters (scale, zero point, NVFP4's global scale) from the
group's own values. Algorithms that fix the parameters first and then round values that keep
changing (GPTQ: one column at a time, each column's error pushed onto the columns not yet
rounded) need the other half: *given* the parameters, round these values to the grid, and in the
end pack the codes into an ordinary ``QuantizedTensor`` with exactly those parameters.

:class:`FixedGrid` holds the parameters of a ``QuantizedTensor`` (usually ``quantize(w, spec)``;
its codes are not used):

- ``columns(cols)``: the parameters of logical columns ``cols`` (any order), ``[rows, m]``;
- ``encode(x, params)`` → codes, ``decode(codes, params)`` → float32 values: ``x`` is
  ``[rows, m]``, rounded the way the format's codec rounds (``decode`` *is* the codec's decode,
  elementwise, so the values equal what ``dequantize`` of the packed tensor gives, bit for bit);
- ``pack(codes)``: ``[rows, K]`` codes → ``QuantizedTensor`` in the canonical layout (padding
  like ``quantize``: zeros encoded with the last group's parameters, then whole bytes);
- ``quantize(x)``: ``pack(encode(x, all columns))``.

Encoding ``w`` with ``quantize(w)``'s own parameters reproduces ``quantize(w)`` bit for bit for
every format (tested), so a fixed-grid rounding never disagrees with the codecs.

Codes are in the dtype the format stores (``int8`` for symmetric int8, ``float8_*`` for fp8 and
MXFP8, ``uint8`` otherwise); :func:`code_bytes` / :func:`from_code_bytes` view them as ``uint8``
for indexing and permuting (float8 tensors support few ops).

Imported directly (``qcompile.formats.fixed_grid``), not re-exported by ``qcompile.formats``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .codec import Parts
from .floating import FP8_DTYPES, fp4_e2m1_encode, fp8_cast
from .microscaling import e8m0_decode
from .packing import pack_bits, padded_codes
from .registry import get_codec
from .spec import BLOCK_FORMATS, FLOAT_FORMATS, INT_FORMATS, QuantizedTensor, QuantSpec


class ColumnParams(NamedTuple):
    """The group parameters of some logical columns, one per ``[row, column]``."""

    scale: torch.Tensor
    """``[rows, m]`` in the stored scale dtype."""
    zero: torch.Tensor | None
    """``[rows, m]`` ``uint8`` zero points (asymmetric int), else ``None``."""

    def slice(self, start: int, stop: int) -> ColumnParams:
        """Columns ``start:stop`` of these."""
        return ColumnParams(self.scale[:, start:stop], None if self.zero is None else self.zero[:, start:stop])


def code_dtype(spec: QuantSpec) -> torch.dtype:
    """The dtype codes of ``spec`` are stored in (before bit packing)."""
    if spec.format in FP8_DTYPES:
        return FP8_DTYPES[spec.format]
    if spec.format == "mxfp8":
        return torch.float8_e4m3fn
    if spec.format == "int8" and spec.symmetric:
        return torch.int8
    return torch.uint8


def code_bytes(codes: torch.Tensor) -> torch.Tensor:
    """``codes`` viewed as ``uint8`` (same shape; every code dtype here is one byte)."""
    return codes if codes.dtype == torch.uint8 else codes.view(torch.uint8)


def from_code_bytes(raw: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Inverse of :func:`code_bytes` for ``spec``'s code dtype."""
    dtype = code_dtype(spec)
    return raw if dtype == torch.uint8 else raw.view(dtype)


class FixedGrid:
    """The quantization grid of ``qt``'s parameters (see the module docstring)."""

    def __init__(self, qt: QuantizedTensor):
        spec = qt.spec
        if spec.format not in INT_FORMATS + FLOAT_FORMATS + BLOCK_FORMATS:
            raise ValueError(f"no fixed-grid rounding for format {spec.format!r}")
        self.spec = spec
        self.codec = get_codec(spec.format)
        self.shape = tuple(qt.shape)
        self.group = qt.group_size
        self.n_groups = qt.scale.shape[1]
        self.scale = qt.scale
        self.zero = qt.zero
        self.global_scale = qt.global_scale
        self.device = qt.scale.device

    # ------------------------------------------------------------------ parameters
    def columns(self, cols: torch.Tensor | slice | None = None) -> ColumnParams:
        """Parameters of logical columns ``cols`` (a LongTensor of indices, a slice, or all)."""
        k = self.shape[1]
        if cols is None:
            cols = torch.arange(k, device=self.device)
        elif isinstance(cols, slice):
            cols = torch.arange(k, device=self.device)[cols]
        groups = cols.to(self.device) // self.group
        zero = None if self.zero is None else self.zero[:, groups]
        return ColumnParams(self.scale[:, groups], zero)

    # ------------------------------------------------------------------ rounding
    def encode(self, x: torch.Tensor, params: ColumnParams) -> torch.Tensor:
        """Round ``x`` (``[rows, m]``) to codes on the grid of ``params`` (the codec's rounding)."""
        spec, x = self.spec, x.float()
        fmt = spec.format
        if fmt in INT_FORMATS:
            s = params.scale.float()
            if spec.symmetric:  # integer.encode
                qmax = 2 ** (spec.bits - 1) - 1
                q = torch.round(x / s).clamp_(-qmax - 1, qmax)
                return q.to(torch.int8) if spec.bits == 8 else (q + (qmax + 1)).to(torch.uint8)
            top = 2**spec.bits - 1
            return (torch.round(x / s) + params.zero.float()).clamp_(0, top).to(torch.uint8)
        if fmt in FLOAT_FORMATS:  # scaled_float.encode
            y = x / params.scale.float()
            return fp4_e2m1_encode(y) if fmt == "fp4_e2m1" else fp8_cast(y, fmt)
        if fmt == "nvfp4":  # microscaling._nvfp4_encode
            return fp4_e2m1_encode(x / (params.scale.float() * self.global_scale))
        # MX (microscaling._mx_encode): x * 2**-e, exact either way as a division by 2**e
        y = x / e8m0_decode(params.scale)
        return fp4_e2m1_encode(y) if fmt == "mxfp4" else fp8_cast(y, "fp8_e4m3")

    def decode(self, codes: torch.Tensor, params: ColumnParams) -> torch.Tensor:
        """Float32 values of ``codes`` (``[rows, m]``): the codec's own decode, elementwise."""
        parts = Parts(codes.unsqueeze(-1), params.scale, params.zero, self.global_scale)
        return self.codec.decode(parts, self.spec).squeeze(-1)

    def round(self, x: torch.Tensor, params: ColumnParams) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes, values)`` of ``x`` on the grid."""
        codes = self.encode(x, params)
        return codes, self.decode(codes, params)

    # ------------------------------------------------------------------ packing
    def pack(self, codes: torch.Tensor) -> QuantizedTensor:
        """``[rows, K]`` codes (the code dtype, or its ``uint8`` bytes) → ``QuantizedTensor`` with
        these parameters, laid out exactly like ``quantize``'s output."""
        rows, k = self.shape
        if tuple(codes.shape) != (rows, k):
            raise ValueError(f"codes have shape {tuple(codes.shape)}, the grid is {self.shape}")
        codes = from_code_bytes(code_bytes(codes), self.spec).to(self.device)
        padded = self.n_groups * self.group
        if padded > k:  # zeros in the last group, as quantize pads them
            zeros = torch.zeros(rows, padded - k, device=self.device)
            pad = self.encode(zeros, self.columns(torch.arange(k, padded, device=self.device)))
            codes = from_code_bytes(torch.cat([code_bytes(codes), code_bytes(pad)], dim=1), self.spec)
        data = codes
        bits = self.codec.pack_bits
        if bits is not None:
            extra = padded_codes(padded, bits) - padded
            if extra:
                grouped = Parts(codes.reshape(rows, self.n_groups, self.group), self.scale, self.zero,
                                self.global_scale)
                fill = self.codec.zero_code(grouped).expand(rows, extra)
                data = torch.cat([data, fill.to(data.dtype)], dim=1)
            data = pack_bits(data.contiguous(), bits)
        return QuantizedTensor(self.spec, (rows, k), data.contiguous(), self.scale, self.zero, self.global_scale)

    def quantize(self, x: torch.Tensor) -> QuantizedTensor:
        """``x`` (``[rows, K]``) rounded to this grid and packed."""
        return self.pack(self.encode(x.to(self.device), self.columns()))
