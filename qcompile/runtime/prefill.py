"""Prefill: torch SDPA for the math on the uncompressed block, the cache written compressed.

A runtime step rather than a kernel: SDPA plus ``QuantizedKVCache.append`` (whose Triton kernels
are ``qcompile.codegen.attention.append``). A block onto a non-empty layer (chunked prefill)
attends over the dequantized cache (``cached_attention.attend_over_cache``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qcompile.formats.kv import apply_rope
from qcompile.runtime.cached_attention import attend_over_cache


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache, layer: int,
                      num_new: torch.Tensor | list[int] | None = None,
                      sm_scale: float | None = None) -> torch.Tensor:
    """Causal attention of a prompt block and its append to a cache layer.

    ``q``: ``[B, Hq, T, D]`` (RoPE'd); ``k``, ``v``: ``[B, Hkv, T, D]`` (keys RoPE'd, or before
    RoPE when ``cache.spec.pre_rope``); rows right-padded, ``num_new`` the real lengths. On a
    layer that already holds tokens, query ``t`` of row ``b`` sits after the row's cached tokens.
    """
    if cache.max_length_bound(layer) != 0:
        start = cache.lengths[layer].clone()
        cache.append(layer, k, v, num_new)
        return attend_over_cache(q, cache, layer, start, sm_scale).to(q.dtype)
    cache.append(layer, k, v, num_new)
    if cache.spec.pre_rope:
        k = apply_rope(k, torch.arange(k.shape[2], device=k.device), cache.spec.rope_theta)
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), is_causal=True,
                                          scale=sm_scale, enable_gqa=q.shape[1] != k.shape[1])
