"""State the graph does not own: the quantized KV cache (and, next, the generate loop).

    from qcompile.runtime import KVCacheSpec, QuantizedKVCache
    from qcompile.codegen.attention import decode_attention, prefill_attention
"""

from qcompile.runtime.hadamard import hadamard_matrix
from qcompile.runtime.kv_cache import QuantizedKVCache
from qcompile.runtime.kv_formats import KV_FORMATS, KVCacheSpec

__all__ = ["KV_FORMATS", "KVCacheSpec", "QuantizedKVCache", "hadamard_matrix"]
