"""The attention op of a generation graph: append this call's keys and values to a static cache
layer, then attend this call's queries over everything the layer holds.

``passes/kv_cache_attention.py`` puts one :class:`CachedAttention` module per layer in place of the
model's ``scaled_dot_product_attention``: the graph keeps computing RoPE (from its ``position_ids``
input) and the projections; the op owns the cache update, GQA and the causal mask over the cache.
The cache itself is bound at run time (:class:`CacheBinding`, one per generation graph), because its
batch and length are the caller's, not the model's.

Which attention runs (each a documented path, none a silent fallback):

- the layer is empty (a prompt's first block): SDPA over the block itself, causal: the same
  computation as the model without a cache;
- a compressed cache (``QuantizedKVCache``) on CUDA and at most ``MAX_QUERY_TOKENS`` new tokens in
  every row: the Triton decode kernel over the compressed cache (``codegen/attention``);
- otherwise (CPU, the uncompressed cache, chunked prefill): SDPA over the dequantized cache with
  a mask that keeps, for query ``t`` of row ``b``, the positions ``<= start_b + t`` that the row holds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qcompile.codegen.attention import MAX_QUERY_TOKENS
from qcompile.formats.hadamard import rotate


class CacheBinding:
    """What a generation graph's attention ops read at each call: the cache, and how many of the
    call's ``T`` tokens are real in each row (``num_new``, ``[B]``; ``None``: all of them). The ops
    attend over the cache's host-side length bound (``cache.full_bounds()``: the whole static
    length, what a captured CUDA graph needs)."""

    def __init__(self) -> None:
        self.cache = None
        self.num_new: torch.Tensor | None = None
        self.paths: dict[str, int] = {}
        """How often each attention path ran (``empty``, ``kernel``, ``masked``): for reports and tests."""


def masked_cache_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor,
                           lengths: torch.Tensor, sm_scale: float | None) -> torch.Tensor:
    """``q`` ``[B, Hq, T, D]`` at positions ``start_b + t`` over ``k``, ``v`` ``[B, Hkv, S, D]`` of which
    row ``b`` holds ``lengths_b``: causal, GQA by head groups. Slot 0 is always visible, so that a
    row with nothing to attend (a padding-only row of a chunk) gives finite values, never NaN."""
    S, T = k.shape[2], q.shape[2]
    pos = torch.arange(S, device=q.device)
    q_pos = start.to(q.device).long()[:, None] + torch.arange(T, device=q.device)          # [B, T]
    keep = (pos[None, None, :] <= q_pos[:, :, None]) & (pos < lengths.to(q.device).long()[:, None, None])
    keep |= pos[None, None, :] == 0
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=keep[:, None], scale=sm_scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


class CachedAttention(torch.nn.Module):
    """``scaled_dot_product_attention`` of one layer, over the bound cache: ``forward(q, k, v)`` with
    ``q`` ``[B, Hq, T, D]`` (RoPE applied), ``k``, ``v`` ``[B, Hkv, T, D]``, returns ``[B, Hq, T, D]``."""

    def __init__(self, layer: int, binding: CacheBinding, sm_scale: float | None) -> None:
        super().__init__()
        self.layer, self.binding, self.sm_scale = layer, binding, sm_scale

    def extra_repr(self) -> str:
        return f"layer={self.layer}, sm_scale={self.sm_scale}"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cache, num_new, layer = self.binding.cache, self.binding.num_new, self.layer
        if cache is None:
            raise RuntimeError(f"cached attention of layer {layer}: no KV cache is bound (run the generation graph "
                               "through CompiledModel.generate or qcompile.runtime.CachedDecoder)")
        empty = cache.max_length_bound(layer) == 0
        start = cache.lengths[layer].clone()
        cache.append(layer, k, v, num_new)
        if empty:
            self._count("empty")
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.sm_scale,
                                                  enable_gqa=q.shape[1] != k.shape[1])
        if cache.spec is not None and q.is_cuda and num_new is None and q.shape[2] <= MAX_QUERY_TOKENS:
            from qcompile.codegen.attention import decode_attention

            self._count("kernel")
            return decode_attention(q.to(cache.dtype), cache, layer, sm_scale=self.sm_scale).to(q.dtype)
        self._count("masked")
        upto = cache.max_length_bound(layer)
        if cache.spec is None:
            keys, values = cache.keys_values(layer, upto)
        else:
            keys, values = (t[:, :, :upto] for t in cache.dequantize(layer, torch.float32))
            if cache.spec.rotate_keys:
                q = rotate(q.float())
        out = masked_cache_attention(q, keys, values, start, cache.lengths[layer], self.sm_scale)
        return out.to(v.dtype)

    def _count(self, path: str) -> None:
        self.binding.paths[path] = self.binding.paths.get(path, 0) + 1
