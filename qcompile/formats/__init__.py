"""Number formats: reference quantize, dequantize and bit packing, bit-exact.

Integer (int8/4/3/2), fp8 (e4m3/e5m2), fp4 e2m1, NVFP4 and MXFP4/MXFP8. See
docs/formats.md for layouts and rounding rules.
"""

from .api import (
    PACKED_FORMATS,
    bits_per_weight,
    dequantize,
    fake_quantize,
    quantization_error,
    quantize,
)
from .floating import E2M1_VALUES, fp4_e2m1_decode, fp4_e2m1_encode
from .packing import pack_bits, packed_width, unpack_bits
from .spec import FORMATS, PER_CHANNEL, QuantizedTensor, QuantSpec

__all__ = [
    "E2M1_VALUES",
    "FORMATS",
    "PACKED_FORMATS",
    "PER_CHANNEL",
    "QuantSpec",
    "QuantizedTensor",
    "bits_per_weight",
    "dequantize",
    "fake_quantize",
    "fp4_e2m1_decode",
    "fp4_e2m1_encode",
    "pack_bits",
    "packed_width",
    "quantization_error",
    "quantize",
    "unpack_bits",
]
