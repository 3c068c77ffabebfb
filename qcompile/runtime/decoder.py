"""A compiled causal LM as a decoder over a static KV cache: its generation graph, the cache that
graph's attention ops are bound to, and one forward ``(input_ids, position_ids, num_new) → logits``.

The generation graph is the compiled graph traced again with ``position_ids`` as an input (through
``CompiledModel.graph_call``: the compiled layers are shared, not recomputed) and rewritten by
``passes/kv_cache_attention.py``. ``runtime/generate.py`` drives it.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import fx

from qcompile.formats.kv import KV_FORMATS, KVCacheSpec
from qcompile.passes.base import PassContext, PassManager
from qcompile.passes.kv_cache_attention import CacheAttention, CacheGeometry
from qcompile.runtime.cached_attention import CacheBinding
from qcompile.runtime.dense_cache import DenseKVCache
from qcompile.runtime.kv_cache import QuantizedKVCache

KV_CACHE_ALIASES = {"fp8": "fp8_e4m3"}
"""Short names ``compile(kv_cache=...)`` accepts besides ``formats.kv.KV_FORMATS``."""


def kv_cache_spec(kv_cache: str | KVCacheSpec | None) -> KVCacheSpec | None:
    """``compile(kv_cache=...)`` as a spec: ``None`` (uncompressed, the model's dtype), a format name
    (``int4``, ``int8``, ``fp8``, ``int2``, ``bf16``) or a ``KVCacheSpec``. Errors name the value."""
    if kv_cache is None or isinstance(kv_cache, KVCacheSpec):
        spec = kv_cache
    elif isinstance(kv_cache, str):
        name = KV_CACHE_ALIASES.get(kv_cache, kv_cache)
        if name not in KV_FORMATS:
            raise ValueError(f"kv_cache={kv_cache!r} is not a KV-cache format; valid: None, "
                             f"{', '.join([*KV_FORMATS, *KV_CACHE_ALIASES])}, or a qcompile.runtime.KVCacheSpec")
        spec = KVCacheSpec(name)
    else:
        raise TypeError(f"kv_cache must be None, a format name or a KVCacheSpec, got {type(kv_cache).__name__}")
    if spec is not None and spec.pre_rope:
        raise ValueError("kv_cache: KVCacheSpec(pre_rope=True) is not supported by compiled models (the generation "
                         "graph applies RoPE before the cache; use pre_rope=False)")
    return spec


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"the model returned {type(out).__name__}, not logits (generate needs a causal LM)")


def _storage_dtype(gm: fx.GraphModule) -> torch.dtype:
    """The model's float dtype: that of its largest floating tensor (the embedding)."""
    floats = [t for t in gm.state_dict().values() if t.is_floating_point()]
    return max(floats, key=lambda t: t.numel()).dtype if floats else torch.float32


class CachedDecoder:
    """The generation graph of a compiled causal LM and its static cache (allocated per batch size
    and length by :meth:`allocate`, reused while it fits)."""

    def __init__(self, compiled: Any, kv_cache: str | KVCacheSpec | None = None) -> None:
        self.compiled = compiled
        self.spec = kv_cache_spec(kv_cache)
        self.binding = CacheBinding()
        gm = compiled.graph_module
        self.dtype = _storage_dtype(gm)
        devices = {t.device for t in gm.state_dict().values()}
        self.device = next(iter(devices)) if len(devices) == 1 else torch.device("cpu")
        ids = torch.zeros(2, 3, dtype=torch.long, device=self.device)  # not 1: torch.export specializes size-1 dims
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*re-traced in.*")
            traced, _, _ = compiled.graph_call((), {"input_ids": ids, "position_ids": ids})
        self.graph_module = fx.GraphModule(traced, copy.deepcopy(traced.graph))
        attention = CacheAttention(self.binding)
        ctx = PassContext((), {}, compiled.target, compiled.recipe)
        PassManager([attention], verify=False).run(self.graph_module, ctx)
        self.geometry: CacheGeometry = attention.geometry
        if self.spec is not None:
            self.spec.check_head_dim(self.geometry.head_dim)
        self.cache: QuantizedKVCache | DenseKVCache | None = None

    @property
    def num_layers(self) -> int:
        return self.geometry.num_layers

    def allocate(self, batch: int, max_length: int) -> QuantizedKVCache | DenseKVCache:
        """An empty cache for ``batch`` rows of up to ``max_length`` tokens: the current one when it
        has exactly ``batch`` rows and room for ``max_length`` (reset), else a new one."""
        c = self.cache
        if c is None or c.batch != batch or c.max_seq_len < max_length:
            g = self.geometry
            if self.spec is None:
                c = DenseKVCache(g.num_layers, batch, max_length, g.num_kv_heads, g.head_dim, self.device, self.dtype)
            else:
                dtype = self.dtype if self.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
                c = QuantizedKVCache(g.num_layers, batch, max_length, g.num_kv_heads, g.head_dim, self.spec,
                                     device=self.device, dtype=dtype)
            self.cache = c
        c.reset()
        self.binding.cache = c
        return c

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                num_new: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, T, V]`` of ``input_ids`` ``[B, T]`` at ``position_ids``, appending their keys and
        values to the cache: ``num_new`` (``[B]``) of the ``T`` are real per row (right padding)."""
        if self.binding.cache is None:
            raise RuntimeError("CachedDecoder.forward before allocate(batch, max_length)")
        self.binding.num_new = num_new
        _, args, kwargs = self.compiled.graph_call((), {"input_ids": input_ids, "position_ids": position_ids})
        with torch.no_grad():
            return _logits(self.graph_module(*args, **kwargs))

    __call__ = forward
