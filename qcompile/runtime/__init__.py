"""State the graph does not own: the quantized KV cache, decode scratch memory, prefill (and,
next, the generate loop).

    from qcompile.runtime import KVCacheSpec, QuantizedKVCache, prefill_attention
    from qcompile.codegen.attention import decode_attention

KV-cache formats and their reference quantizers are part of the formats library
(``qcompile.formats.kv``); ``KVCacheSpec`` and ``KV_FORMATS`` are re-exported here.
"""

from qcompile.formats.hadamard import hadamard_matrix
from qcompile.formats.kv import KV_FORMATS, KVCacheSpec
from qcompile.runtime.decode_workspace import DecodeWorkspace
from qcompile.runtime.kv_cache import QuantizedKVCache
from qcompile.runtime.prefill import prefill_attention

__all__ = ["KV_FORMATS", "DecodeWorkspace", "KVCacheSpec", "QuantizedKVCache", "hadamard_matrix",
           "prefill_attention"]
