"""Number formats: quantize, dequantize, pack (see docs/formats.md).

Reference implementations, bit-exact and property-tested; kernels, ONNX
export and passes all build on them.
"""

from .api import (
    bits_per_weight,
    dequantize,
    fake_quantize,
    quantization_error,
    quantize,
    scale_nbytes,
)
from .codec import Codec, Parts
from .floating import (
    E2M1_BOUNDS,
    E2M1_MAX,
    E2M1_TABLE,
    E2M1_VALUES,
    FP8_DTYPES,
    FP8_MAX,
    fp4_e2m1_decode,
    fp4_e2m1_encode,
    fp4_e2m1_round,
    fp8_cast,
)
from .microscaling import e8m0_decode, mx_scale_exponent, nvfp4_global_scale
from .packing import pack_bits, packed_nbytes, unpack_bits
from .registry import CODECS, get_codec
from .spec import (
    BITS,
    BLOCK_FORMATS,
    FIXED_BLOCK,
    FLOAT_FORMATS,
    FORMATS,
    INT_FORMATS,
    PER_CHANNEL,
    PER_TENSOR,
    QuantizedTensor,
    QuantSpec,
)

__all__ = [
    "BITS", "BLOCK_FORMATS", "CODECS", "E2M1_BOUNDS", "E2M1_MAX", "E2M1_TABLE", "E2M1_VALUES",
    "FIXED_BLOCK", "FLOAT_FORMATS", "FORMATS", "FP8_DTYPES", "FP8_MAX", "INT_FORMATS",
    "PER_CHANNEL", "PER_TENSOR", "Codec", "Parts", "QuantSpec", "QuantizedTensor", "bits_per_weight",
    "dequantize", "e8m0_decode", "fake_quantize", "fp4_e2m1_decode", "fp4_e2m1_encode",
    "fp4_e2m1_round", "fp8_cast", "get_codec", "mx_scale_exponent", "nvfp4_global_scale",
    "pack_bits", "packed_nbytes", "quantization_error", "quantize", "scale_nbytes", "unpack_bits",
]
