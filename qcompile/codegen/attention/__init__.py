"""Decode attention over a compressed KV cache (Triton), its reference, and prefill.

    from qcompile.runtime.kv_cache import QuantizedKVCache
    from qcompile.runtime.kv_formats import KVCacheSpec
    from qcompile.codegen.attention import decode_attention, prefill_attention
"""

from qcompile.codegen.attention.decode import MAX_QUERY_TOKENS, decode_attention
from qcompile.codegen.attention.prefill import prefill_attention
from qcompile.codegen.attention.reference import reference_decode_attention

__all__ = ["MAX_QUERY_TOKENS", "decode_attention", "prefill_attention", "reference_decode_attention"]
