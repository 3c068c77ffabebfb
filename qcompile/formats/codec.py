"""The interface every format implements: grouped encode/decode (no packing, no padding).

``api.py`` owns validation, padding, packing and the QuantizedTensor; a format
only maps a float32 ``[rows, n_groups, group]`` tensor to codes and scales and
back. Adding a format = one ``Codec`` registered in ``registry.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .spec import QuantSpec


class Parts(NamedTuple):
    """Unpacked quantization result; ``codes`` is ``[rows, n_groups, group]``."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None


@dataclass(frozen=True)
class Codec:
    """One number format.

    - ``encode(wg, spec) -> Parts``: ``wg`` is float32 ``[rows, n_groups, group]``.
    - ``decode(parts, spec) -> Tensor``: float32 ``[rows, n_groups, group]``.
    - ``pack_bits``: bit width the codes are packed with (``None``: stored unpacked).
    - ``zero_code(parts) -> Tensor``: ``uint8 [rows, 1]`` code of the value 0, used to fill
      the byte padding after the last group.
    - ``polish(spec)``: whether the stored scales can miss the exact
      re-quantization fixed point (float32 scales, asymmetric int, NVFP4's
      global scale); ``api.quantize`` then iterates quantize∘dequantize to it.
    """

    encode: Callable[[torch.Tensor, QuantSpec], Parts]
    decode: Callable[[Parts, QuantSpec], torch.Tensor]
    pack_bits: int | None
    zero_code: Callable[[Parts], torch.Tensor] | None = None
    polish: Callable[[QuantSpec], bool] = lambda spec: spec.scale_dtype == "float32"


def zero_code_const(code: int) -> Callable[[Parts], torch.Tensor]:
    """A ``zero_code`` for formats whose code for 0.0 does not depend on the group."""

    def zero_code(parts: Parts) -> torch.Tensor:
        rows = parts.codes.shape[0]
        return torch.full((rows, 1), code, dtype=torch.uint8, device=parts.codes.device)

    return zero_code
