"""Format name → Codec. The one place to register a new format (see docs/formats.md)."""

from __future__ import annotations

from . import integer, microscaling, scaled_float
from .codec import Codec

CODECS: dict[str, Codec] = {
    "int8": integer.codec(8),
    "int4": integer.codec(4),
    "int3": integer.codec(3),
    "int2": integer.codec(2),
    "fp8_e4m3": scaled_float.FP8_CODEC,
    "fp8_e5m2": scaled_float.FP8_CODEC,
    "fp4_e2m1": scaled_float.FP4_CODEC,
    "nvfp4": microscaling.NVFP4_CODEC,
    "mxfp4": microscaling.MXFP4_CODEC,
    "mxfp8": microscaling.MXFP8_CODEC,
}


def get_codec(fmt: str) -> Codec:
    """The codec of format ``fmt``; ``ValueError`` for one with none registered."""
    try:
        return CODECS[fmt]
    except KeyError:
        raise ValueError(f"no codec registered for format {fmt!r}") from None
