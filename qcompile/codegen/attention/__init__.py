"""Decode attention over a compressed KV cache (Triton) and its reference.

    from qcompile.runtime import KVCacheSpec, QuantizedKVCache, prefill_attention
    from qcompile.codegen.attention import decode_attention

Files: ``decode.py`` (the kernels and ``decode_attention``), ``tiles.py`` (their device functions),
``bits.py`` (code-to-fp16 bit tricks), ``launch.py`` (launch configuration), ``append.py``
(quantize-on-append kernels), ``reference.py`` (the float64 reference).
"""

from qcompile.codegen.attention.decode import MAX_QUERY_TOKENS, decode_attention
from qcompile.codegen.attention.reference import reference_decode_attention

__all__ = ["MAX_QUERY_TOKENS", "decode_attention", "reference_decode_attention"]
