"""The attention op of a generation graph: append this call's keys and values to a static cache
layer, then attend this call's queries over everything the layer holds.

``passes/kv_cache_attention.py`` puts one ``qcompile::cached_attention`` op per layer in place of the
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

import itertools
import weakref
from typing import Any

import torch
import torch.nn.functional as F

from qcompile.formats.hadamard import rotate
from qcompile.formats.kv import apply_rope


class CacheBinding:
    """What a generation graph's attention ops read at each call: the cache, and how many of the
    call's ``T`` tokens are real in each row (``num_new``, ``[B]``; ``None``: all of them). The ops
    attend over the cache's host-side length bound (``cache.full_bounds()``: the whole static
    length, what a captured CUDA graph needs). Graphs name their binding by ``key`` (an op takes
    no Python objects); the graph module holds the binding, the registry only a weak reference."""

    _next_key = itertools.count()

    def __init__(self) -> None:
        self.cache = None
        self.num_new: torch.Tensor | None = None
        self.logit_rows: torch.Tensor | None = None
        """``[B]``: the one position per row whose logits a prefill graph computes (``qcompile::logit_rows``)."""
        self.paths: dict[str, int] = {}
        """How often each attention path ran (``empty``, ``kernel``, ``masked``): for reports and tests."""
        self.key = next(self._next_key)
        _BINDINGS[self.key] = self


_BINDINGS: weakref.WeakValueDictionary[int, CacheBinding] = weakref.WeakValueDictionary()


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


@torch.library.custom_op("qcompile::cached_attention", mutates_args=())
def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, binding: int, layer: int,
                     sm_scale: float | None) -> torch.Tensor:
    """Layer ``layer``'s attention over the cache bound to binding ``binding``: append ``k``, ``v``
    (``[B, Hkv, T, D]``) and attend ``q`` (``[B, Hq, T, D]``, RoPE applied); returns ``q``'s shape.
    Opaque to ``torch.compile`` (its cache is state the compiled graph does not see)."""
    owner = _BINDINGS.get(binding)
    if owner is None or owner.cache is None:
        raise RuntimeError(f"cached attention of layer {layer}: no KV cache is bound (run the generation graph "
                           "through CompiledModel.generate or qcompile.runtime.CachedDecoder)")
    return _attend(owner, layer, q, k, v, sm_scale)


@cached_attention.register_fake
def _(q, k, v, binding, layer, sm_scale):
    return torch.empty_like(q)


CACHED_ATTENTION = torch.ops.qcompile.cached_attention.default


def _attend(binding: CacheBinding, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            sm_scale: float | None) -> torch.Tensor:
    """The path is chosen before the append (it depends on what the layer held), so that only the
    masked path pays for a copy of the row lengths (a captured decode step runs this once a layer)."""
    cache, num_new = binding.cache, binding.num_new
    path = "masked"
    if cache.max_length_bound(layer) == 0:
        path = "empty"
    elif cache.spec is not None and q.is_cuda and num_new is None:
        from qcompile.codegen.attention import MAX_QUERY_TOKENS  # noqa: I001 (Triton: CUDA only)

        path = "kernel" if q.shape[2] <= MAX_QUERY_TOKENS else path
    start = cache.lengths[layer].clone() if path == "masked" else None
    cache.append(layer, k, v, num_new)
    _count(binding, path)
    if path == "empty":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=sm_scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    if path == "kernel":
        from qcompile.codegen.attention import decode_attention

        return decode_attention(q.to(cache.dtype), cache, layer, sm_scale=sm_scale).to(q.dtype)
    return attend_over_cache(q, cache, layer, start, sm_scale).to(v.dtype)


def attend_over_cache(q: torch.Tensor, cache: Any, layer: int, start: torch.Tensor, sm_scale: float | None
                      ) -> torch.Tensor:
    """``q`` (``[B, Hq, T, D]``, query ``t`` of row ``b`` at position ``start_b + t``) over everything
    ``layer`` holds, after the block was appended: the ``masked`` path. Compressed caches are
    dequantized in float32 (rotated keys: the queries rotated alike; pre-RoPE keys: RoPE at their slot)."""
    upto = cache.max_length_bound(layer)
    if cache.spec is None:
        keys, values = cache.keys_values(layer, upto)
    else:
        keys, values = (t[:, :, :upto] for t in cache.dequantize(layer, torch.float32))
        if cache.spec.pre_rope:
            keys = apply_rope(keys, torch.arange(upto, device=keys.device), cache.spec.rope_theta)
        if cache.spec.rotate_keys:
            q = rotate(q.float())
    return masked_cache_attention(q, keys, values, start, cache.lengths[layer], sm_scale)


@torch.library.custom_op("qcompile::logit_rows", mutates_args=())
def logit_rows(hidden: torch.Tensor, binding: int) -> torch.Tensor:
    """``hidden`` ``[B, T, H]`` at one position per row, ``[B, 1, H]``: the positions the binding's
    ``logit_rows`` names (``passes/last_logits.py`` puts this op in front of the LM head)."""
    owner = _BINDINGS.get(binding)
    if owner is None or owner.logit_rows is None:
        raise RuntimeError("logit_rows: no rows are bound (CachedDecoder.forward(..., logit_rows=...) sets them)")
    rows = owner.logit_rows.to(device=hidden.device, dtype=torch.long)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), rows][:, None]


@logit_rows.register_fake
def _(hidden, binding):
    return hidden.new_empty((hidden.shape[0], 1, *hidden.shape[2:]))


LOGIT_ROWS = torch.ops.qcompile.logit_rows.default


def _count(binding: CacheBinding, path: str) -> None:
    binding.paths[path] = binding.paths.get(path, 0) + 1
