"""KV-cache formats: the cache's spec, its layouts and its reference (torch) quantizers.

These are the formats of ``qcompile.runtime.QuantizedKVCache``; the Triton append and decode
kernels (``qcompile/codegen/attention/``) write and read exactly these layouts, and their integer
codes are ``formats.kernel_codes.KV_*``. Layouts, per layer, batch row and KV head
(``S`` = max_seq_len, ``D`` = head_dim):

- ``bf16``: no compression, stored in the cache's dtype (bf16 or fp16).
- ``fp8_e4m3`` / ``int8``: per token and head. Codes ``[S, D]`` (fp8 stored as its uint8 bits),
  one float32 scale per token ``[S]``. Symmetric: ``x ≈ code * scale``.
- ``int4`` / ``int2`` (KIVI / KVQuant style, asymmetric): codes bit-packed along D, low bits
  first (channel ``PER*j + i`` in bits ``i*bits`` of byte ``j``; ``formats.pack_bits``).
  Keys are quantized per channel over groups of ``group_size`` tokens: scale and minimum
  ``[S / group_size, D]`` float16, each group's row stored *slice-major*: channel ``PER*x + i``
  at ``i * D/PER + x`` (``PER`` = codes per byte), so that the ``D/PER`` scales of the channels
  that share a position in the byte are contiguous (the kernel reads them as one vector per
  position; see ``slice_major``). The newest tokens stay in a bf16 residual ring of
  ``residual_length`` slots (keys and values) until it fills; then it is quantized as a whole.
  Values are quantized per token over groups of ``value_group_size`` channels (default: the
  whole head): scale and minimum ``[S, D / value_group_size]`` float16. ``x ≈ code * scale + minimum``.

Compressed *value* codes (every format but ``bf16``) are stored token-blocked: the ``[S, NB]`` code
bytes of a head (``NB`` bytes per token, packed as above) are kept as ``[S / TB, NB, TB]`` with
``TB = VALUE_TOKEN_BLOCK`` tokens contiguous per byte column (``S`` rounded up to a multiple of
``TB``). The attention kernel multiplies probabilities by values, a product that runs over tokens;
with tokens contiguous, every byte it loads already sits where the tensor cores want it
(``ldmatrix.trans``), so a value tile needs no shuffling or byte-wise shared-memory reads.
``block_tokens`` / ``unblock_tokens`` convert between the two views.

**KV ``int4`` is not weight ``int4``** (``QuantSpec("int4", symmetric=False)``, ``integer.py``),
although both are asymmetric 4-bit codes packed low nibble first:

- *what shares a scale*: weights group along K (``[rows, K / group]`` scales); KV keys group one
  channel over ``group_size`` consecutive tokens (``[S / group, D]``, slice-major), KV values
  group channels of one token (``[S, D / value_group]``).
- *offset*: weights store an integer zero point (``uint8``, ``x ≈ (code - zero) * scale``) and
  widen the range to include 0, so 0.0 is exact; KV stores a float16 minimum (``x ≈ code * scale
  + minimum``) over the true range [min, max], so 0.0 is in general not exact.
- *scale*: weights round the scale *down* to ``scale_dtype`` (min and max land on codes 0 and
  15); KV rounds ``(max - min) / 15`` to the nearest float16, and the codes are computed against
  the stored float16 scale and minimum.
- *rounding*: weights round half to even (``torch.round``); KV rounds half up
  (``floor(y + 0.5)``), which the Triton append reproduces bit for bit.

Likewise KV ``int8`` is symmetric over [-127, 127] with round half up and a float32 per-token
scale ``amax / 127``; weight ``int8`` rounds half to even over [-128, 127] with ``scale_dtype``
scales per channel or group along K. KV ``fp8_e4m3`` is weight ``fp8_e4m3``'s element cast
(``amax / 448``, clamp, round to nearest even) with one float32 scale per token.

``apply_rope`` is here because ``KVCacheSpec.pre_rope`` makes it part of what a stored key means:
a pre-RoPE cache dequantizes to keys that are then rotated by it (rotate-half, base ``rope_theta``,
position = slot).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .floating import E4M3_MAX
from .kernel_codes import KV_CODES, kv_grouped, kv_per_token
from .packing import pack_bits as _pack_bits
from .packing import unpack_bits as _unpack_bits

KV_FORMATS = tuple(KV_CODES)
"""``bf16``, ``fp8_e4m3``, ``int8``, ``int4``, ``int2``."""
PER_TOKEN_FORMATS = tuple(f for f, c in KV_CODES.items() if kv_per_token(c))
GROUPED_FORMATS = tuple(f for f, c in KV_CODES.items() if kv_grouped(c))
KV_BITS = {"bf16": 16, "fp8_e4m3": 8, "int8": 8, "int4": 4, "int2": 2}
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
VALUE_TOKEN_BLOCK = 16
"""Tokens per block of the token-blocked value-code layout (see the module docstring)."""


@dataclass(frozen=True)
class KVCacheSpec:
    """How a KV cache is compressed.

    ``group_size``: int4/int2 keys: tokens per key group (scale and minimum per channel).
    ``value_group_size``: int4/int2 values: channels per value group; ``None`` (default) means
    the whole head, one scale and minimum per token, which the kernel folds into the
    probabilities (fast); smaller groups are more accurate and slower.
    ``residual_length``: int4/int2 keys only: how many newest tokens stay in bf16 before they
    are quantized together (a multiple of ``group_size``; defaults to ``group_size``).
    ``rotate_keys``: Hadamard-rotate keys before quantization (queries are rotated alike).
    ``pre_rope``: the cache receives keys *before* RoPE and applies RoPE (rotate-half / NeoX
    style, base ``rope_theta``, position = slot index) after dequantization.
    """

    key_format: str = "int4"
    value_format: str | None = None
    group_size: int = 64
    residual_length: int | None = None
    rotate_keys: bool = False
    pre_rope: bool = False
    rope_theta: float = 10000.0
    value_group_size: int | None = None

    def __post_init__(self) -> None:
        if self.value_format is None:
            object.__setattr__(self, "value_format", self.key_format)
        for role, fmt in (("key_format", self.key_format), ("value_format", self.value_format)):
            if fmt not in KV_FORMATS:
                raise ValueError(f"unknown KV {role} {fmt!r}; valid formats: {', '.join(KV_FORMATS)}")
        g = self.group_size
        if g < 4 or (g & (g - 1)) != 0:
            raise ValueError(f"group_size must be a power of two >= 4, got {g}")
        vg = self.value_group_size
        if vg is not None and (vg < 4 or (vg & (vg - 1)) != 0):
            raise ValueError(f"value_group_size must be a power of two >= 4 or None, got {vg}")
        if self.residual_length is None:
            object.__setattr__(self, "residual_length", g)
        r = self.residual_length
        if r < g or r % g != 0:
            raise ValueError(f"residual_length must be a positive multiple of group_size={g}, got {r}")
        if self.rotate_keys and self.pre_rope:
            raise ValueError("rotate_keys and pre_rope cannot be combined: a Hadamard rotation "
                             "does not commute with RoPE")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")

    @property
    def grouped_keys(self) -> bool:
        """Keys quantized per channel over token groups (and a bf16 residual kept)."""
        return self.key_format in GROUPED_FORMATS

    def check_head_dim(self, head_dim: int) -> None:
        """Raise ``ValueError`` naming the supported sizes if the kernels cannot hold ``head_dim`` in
        this format."""
        if head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"head_dim={head_dim} is not supported; supported head dims: "
                             f"{', '.join(map(str, SUPPORTED_HEAD_DIMS))}")
        if self.value_format in GROUPED_FORMATS and head_dim % self.vgroup(head_dim) != 0:
            raise ValueError(f"value_group_size={self.value_group_size} must divide "
                             f"head_dim={head_dim}")

    def vgroup(self, head_dim: int) -> int:
        """Channels per value group (int4/int2 values)."""
        return self.value_group_size or head_dim

    def bytes_per_token(self, head_dim: int, itemsize: int = 2) -> float:
        """Bytes one token of one KV head costs (keys + values, codes and scales), amortized."""
        total = 0.0
        for fmt, group in ((self.key_format, self.group_size),
                           (self.value_format, self.vgroup(head_dim))):
            if fmt == "bf16":
                total += head_dim * itemsize
            elif fmt in PER_TOKEN_FORMATS:
                total += head_dim + 4
            else:
                total += head_dim * KV_BITS[fmt] / 8 + 4 * head_dim / group
        return total

    def short(self) -> str:
        """A compact name, e.g. ``int4-g32`` or ``kfp8-vint4-g32``."""
        name = self.key_format if self.key_format == self.value_format else \
            f"k{self.key_format}-v{self.value_format}"
        if self.key_format in GROUPED_FORMATS:
            name += f"-g{self.group_size}"
        if self.value_format in GROUPED_FORMATS and self.value_group_size:
            name += f"-vg{self.value_group_size}"
        if self.rotate_keys:
            name += "-rot"
        if self.pre_rope:
            name += "-prerope"
        return name

    def to_dict(self) -> dict:
        """The fields as a plain dict."""
        return asdict(self)


def slice_major(x: torch.Tensor, per: int) -> torch.Tensor:
    """Channel order ``PER*x + i`` -> slice-major ``i * D/PER + x`` along the last dim."""
    d = x.shape[-1]
    return x.reshape(*x.shape[:-1], d // per, per).transpose(-1, -2).reshape(x.shape)


def channel_major(x: torch.Tensor, per: int) -> torch.Tensor:
    """Inverse of ``slice_major``."""
    d = x.shape[-1]
    return x.reshape(*x.shape[:-1], per, d // per).transpose(-1, -2).reshape(x.shape)


def padded_tokens(max_seq_len: int) -> int:
    """Token slots of a token-blocked value-code tensor: ``max_seq_len`` rounded up to a block."""
    tb = VALUE_TOKEN_BLOCK
    return (max_seq_len + tb - 1) // tb * tb


def block_tokens(codes: torch.Tensor) -> torch.Tensor:
    """``[..., S, NB]`` per-token code bytes -> token-blocked ``[..., S_pad / TB, NB, TB]``."""
    S, nb = codes.shape[-2:]
    tb = VALUE_TOKEN_BLOCK
    pad = padded_tokens(S) - S
    if pad:
        codes = torch.cat([codes, codes.new_zeros(*codes.shape[:-2], pad, nb)], -2)
    return codes.reshape(*codes.shape[:-2], -1, tb, nb).transpose(-1, -2).contiguous()


def unblock_tokens(blocked: torch.Tensor, S: int) -> torch.Tensor:
    """Token-blocked ``[..., S_pad / TB, NB, TB]`` -> ``[..., S, NB]`` (inverse of ``block_tokens``)."""
    nb = blocked.shape[-2]
    return blocked.transpose(-1, -2).reshape(*blocked.shape[:-3], -1, nb)[..., :S, :]


# ----------------------------------------------------------------------------- reference quantizers
def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` along the last dim, low bits first
    (the formats library's canonical packing, so kernels share one layout)."""
    return _pack_bits(codes.to(torch.uint8), bits)


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    return _unpack_bits(packed, bits, packed.shape[-1] * (8 // bits)).to(torch.int32)


def quantize_per_token(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization along the last dim: (codes, float32 scale)."""
    x = x.float()
    amax = x.abs().amax(-1)
    qmax = E4M3_MAX if fmt == "fp8_e4m3" else 127.0
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    y = x * (1.0 / scale)[..., None]
    if fmt == "fp8_e4m3":
        codes = y.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    else:
        codes = torch.floor(y + 0.5).clamp(-127, 127).to(torch.int8)
    return codes, scale


def dequantize_per_token(codes: torch.Tensor, scale: torch.Tensor, fmt: str,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    vals = codes.view(torch.float8_e4m3fn).to(dtype) if fmt == "fp8_e4m3" else codes.to(dtype)
    return vals * scale.to(dtype)[..., None]


def quantize_asym(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantization reducing over ``dim``: (codes int32, scale fp16, min fp16).

    Codes are computed against the float16-rounded scale and minimum that are stored.
    """
    x = x.float()
    qmax = (1 << bits) - 1
    mn = x.amin(dim, keepdim=True)
    mx = x.amax(dim, keepdim=True)
    scale16 = ((mx - mn) / qmax).to(torch.float16)
    mn16 = mn.to(torch.float16)
    s = scale16.float()
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    codes = torch.floor((x - mn16.float()) * inv + 0.5).clamp(0, qmax).to(torch.int32)
    return codes, scale16.squeeze(dim), mn16.squeeze(dim)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half (NeoX / Llama) RoPE along the last dim at the given positions (``[..., S]``)."""
    d = x.shape[-1]
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    inv_freq = theta ** (-torch.arange(0, d // 2, dtype=work, device=x.device) * 2.0 / d)
    ang = positions.to(work)[..., None] * inv_freq
    cos, sin = ang.cos(), ang.sin()
    lo, hi = x[..., : d // 2].to(work), x[..., d // 2:].to(work)
    return torch.cat([lo * cos - hi * sin, hi * cos + lo * sin], -1).to(x.dtype)
