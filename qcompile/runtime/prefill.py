"""Prefill: torch SDPA for the math on the uncompressed block, the cache written compressed.

A runtime step rather than a kernel: SDPA plus ``QuantizedKVCache.append`` (whose Triton kernels
are ``qcompile.codegen.attention.append``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qcompile.formats.kv import apply_rope


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache, layer: int,
                      num_new: torch.Tensor | list[int] | None = None,
                      sm_scale: float | None = None) -> torch.Tensor:
    """Causal attention of a prompt block and its append to an empty cache layer.

    ``q``: ``[B, Hq, T, D]`` (RoPE'd); ``k``, ``v``: ``[B, Hkv, T, D]`` (keys RoPE'd, or before
    RoPE when ``cache.spec.pre_rope``); rows right-padded, ``num_new`` the real lengths.
    Chunked prefill on a non-empty layer is not supported yet.
    """
    if cache.max_length_bound(layer) != 0:
        raise NotImplementedError(
            f"prefill_attention needs an empty cache layer (layer {layer} holds tokens); "
            "chunked prefill is not supported yet: use decode_attention for <= 8 tokens")
    cache.append(layer, k, v, num_new)
    if cache.spec.pre_rope:
        k = apply_rope(k, torch.arange(k.shape[2], device=k.device), cache.spec.rope_theta)
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), is_causal=True,
                                          scale=sm_scale, enable_gqa=q.shape[1] != k.shape[1])
