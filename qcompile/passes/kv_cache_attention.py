"""Cached attention: a causal LM's graph → its generation graph, whose attention reads and writes a
static KV cache.

:class:`CacheAttention` rewrites every ``aten.scaled_dot_product_attention`` of a graph traced with
``position_ids`` (so that RoPE or learned positions come from the caller) into a
``qcompile::cached_attention`` op (``runtime/cached_attention.py``), layer ``i`` for the ``i``-th
attention in graph order, all bound to one ``CacheBinding`` (held by the graph module as
``kv_cache_binding``). Rules:

- the keys and values the op appends are the model's own ``[B, Hkv, T, D]`` tensors: a GQA
  ``repeat_kv`` in front of SDPA (``unsqueeze`` → ``slice`` → ``expand`` → ``reshape``) is skipped,
  so the cache holds ``Hkv`` heads and the op groups queries itself;
- the attention mask the model built is dropped (the op masks causally over what the cache holds),
  and with it every node that only computed the mask;
- an SDPA with dropout, or whose query heads are not a multiple of its key heads, is an error
  naming the node; so is a graph with no SDPA (a model whose attention is not SDPA: ``eager``
  implementations, soft-capped or sliding-window attention).

Not exact in the pass manager's sense (the op has state): ``tests/runtime/test_generate.py``
checks that greedy generation through it equals Hugging Face's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from qcompile.passes.base import Pass, PassContext, PassResult, register_pass
from qcompile.runtime.cached_attention import CACHED_ATTENTION, CacheBinding

SDPA = torch.ops.aten.scaled_dot_product_attention.default
_REPEAT_CHAIN = (torch.ops.aten.reshape.default, torch.ops.aten.expand.default)


@dataclass(frozen=True)
class CacheGeometry:
    """What a generation graph's cache must hold per layer."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_heads: int


def _shape(node: Any) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _before_repeat_kv(node: fx.Node) -> fx.Node:
    """``x`` if ``node`` is ``repeat_kv(x)`` (``x[:, :, None].expand(...).reshape(...)``), else ``node``."""
    if node.target != _REPEAT_CHAIN[0] or not isinstance(node.args[0], fx.Node):
        return node
    expand = node.args[0]
    if expand.target != _REPEAT_CHAIN[1] or not isinstance(expand.args[0], fx.Node):
        return node
    src = expand.args[0]
    while src.target == torch.ops.aten.slice.Tensor:
        src = src.args[0]
    if src.target != torch.ops.aten.unsqueeze.default or src.args[1] != 2:
        return node
    x = src.args[0]
    shape = _shape(x)
    return x if shape is not None and len(shape) == 4 else node


@register_pass("kv_cache_attention")
class CacheAttention(Pass):
    """Every SDPA → a ``qcompile::cached_attention`` of ``binding`` (see the module docstring for the rules).
    After ``run``, ``geometry`` says what the cache must hold."""

    exact = False

    def __init__(self, binding: CacheBinding | None = None) -> None:
        self.binding = binding if binding is not None else CacheBinding()
        self.geometry: CacheGeometry | None = None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        sdpa = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == SDPA]
        if not sdpa:
            raise ValueError("kv_cache_attention: the graph has no scaled_dot_product_attention, so there is no attention "
                             "to give a KV cache (load the model with attn_implementation='sdpa'; eager, soft-capped and "
                             "sliding-window attention are not supported)")
        geometry = None
        for layer, node in enumerate(sdpa):
            q, k, v = node.args[:3]
            dropout = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
            if dropout:
                raise ValueError(f"kv_cache_attention: {node.name} (layer {layer}) has dropout_p={dropout}")
            k, v = _before_repeat_kv(k), _before_repeat_kv(v)
            qs, ks = _shape(q), _shape(k)
            if qs is None or ks is None or len(qs) != 4 or len(ks) != 4 or ks != _shape(v):
                raise ValueError(f"kv_cache_attention: {node.name} (layer {layer}): query/key/value shapes "
                                 f"{qs}, {ks}, {_shape(v)} are not [B, H, T, D] alike")
            if not isinstance(qs[1], int) or not isinstance(ks[1], int) or qs[1] % ks[1]:
                raise ValueError(f"kv_cache_attention: {node.name} (layer {layer}): {qs[1]} query heads are not a "
                                 f"multiple of {ks[1]} key heads")
            here = CacheGeometry(len(sdpa), int(ks[1]), int(ks[3]), int(qs[1]))
            if geometry is not None and here != geometry:
                raise ValueError(f"kv_cache_attention: layer {layer} ({node.name}) has {here}, layer 0 has {geometry}; "
                                 "one static cache needs every layer alike")
            geometry = here
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(CACHED_ATTENTION, (q, k, v, self.binding.key, layer,
                                                                node.kwargs.get("scale")))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
        gm.graph.eliminate_dead_code()
        gm.kv_cache_binding = self.binding
        self.geometry = geometry
        return PassResult(True, {"layers": len(sdpa), "num_kv_heads": geometry.num_kv_heads,
                                 "head_dim": geometry.head_dim})
