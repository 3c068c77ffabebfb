"""The LLM runtime: generation over a static KV cache (``generate.py``, ``decoder.py``: the
generation graph; ``cached_attention.py``: its attention op), the caches (``kv_cache.py``
compressed, ``dense_cache.py`` uncompressed), decode scratch memory and prefill.
``CompiledModel.generate`` is the entry point (docs/generate.md).

    from qcompile.runtime import KVCacheSpec, QuantizedKVCache, prefill_attention
    from qcompile.codegen.attention import decode_attention

KV-cache formats and their reference quantizers are part of the formats library
(``qcompile.formats.kv``); ``KVCacheSpec`` and ``KV_FORMATS`` are re-exported here.
"""

from qcompile.formats.hadamard import hadamard_matrix
from qcompile.formats.kv import KV_FORMATS, KVCacheSpec
from qcompile.runtime.decode_workspace import DecodeWorkspace
from qcompile.runtime.dense_cache import DenseKVCache
from qcompile.runtime.kv_cache import QuantizedKVCache
from qcompile.runtime.prefill import prefill_attention

__all__ = ["KV_FORMATS", "DecodeWorkspace", "DenseKVCache", "KVCacheSpec", "QuantizedKVCache", "hadamard_matrix",
           "prefill_attention"]
