"""A compiled causal LM as a decoder over a static KV cache: its generation graph, the cache that
graph's attention ops are bound to, and one forward ``(input_ids, position_ids, num_new) → logits``.

The generation graph is the compiled graph traced again with ``position_ids`` as an input (through
``CompiledModel.graph_call``: the compiled layers are shared, not recomputed) and rewritten by
``passes/kv_cache_attention.py``. ``runtime/generate.py`` drives it.
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from qcompile.formats.kv import KV_FORMATS, KVCacheSpec
from qcompile.passes.base import PassContext, PassManager
from qcompile.passes.fusion import FuseEpilogues, FuseSiblingLinears
from qcompile.passes.kv_cache_attention import CacheAttention, CacheGeometry
from qcompile.passes.last_logits import LastLogits
from qcompile.runtime.cached_attention import CacheBinding
from qcompile.runtime.captured_forward import cuda_graphs_enabled
from qcompile.runtime.dense_cache import DenseKVCache
from qcompile.runtime.inductor import inductor_compiled
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


def attention_window(config: Any) -> int | None:
    """The sliding window any layer of a transformers ``config`` attends within (``None``: none).
    The cached attention op is full causal attention: the same as windowed attention while every
    row holds at most the window's tokens."""
    if config is None:
        return None
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is not None:
        return window if any(t != "full_attention" for t in types) else None
    return window if getattr(config, "use_sliding_window", True) else None


def _storage_dtype(gm: fx.GraphModule) -> torch.dtype:
    """The model's float dtype: that of its largest floating tensor (the embedding)."""
    floats = [t for t in gm.state_dict().values() if t.is_floating_point()]
    return max(floats, key=lambda t: t.numel()).dtype if floats else torch.float32


@dataclass
class CapturedStep:
    """One decode step captured as a CUDA graph: its static inputs and output."""

    graph: torch.cuda.CUDAGraph
    token: torch.Tensor
    position: torch.Tensor
    logits: torch.Tensor


class CachedDecoder:
    """The generation graph of a compiled causal LM and its static cache (allocated per batch size
    and length by :meth:`allocate`, reused while it fits).

    ``cuda_graphs``: on CUDA, :meth:`decode_step` captures the one-token step once per cache (batch
    size and length) and replays it; ``False`` runs it eagerly (``QCOMPILE_CUDA_GRAPHS=0`` too).
    ``fuse``: merge sibling quantized linears (Q/K/V, gate/up) into one GEMM each and move SiLU·mul
    and residual adds into the GEMMs' epilogues (``passes/fusion.py``; the merged tensors are
    copies, about the attention and MLP input projections' bytes again).
    ``compile_step``: the one-token step runs the generation graph through ``torch.compile``
    (Inductor fuses the elementwise ops, norms included; quantized linears and cached attention
    stay opaque ops; ``runtime/inductor.py``) before it is captured. Default: on for CUDA graphs
    (the H200 decode step of an 8B W4A16 model went from 4.74 to 3.35 ms,
    docs/benchmarks/generate-h200.md), at a one-time compile per batch bucket (23–44 s there);
    ``QCOMPILE_COMPILE_STEP=0`` / ``1`` overrides the default. If compiling fails, a warning says
    why and the step is captured without it."""

    def __init__(self, compiled: Any, kv_cache: str | KVCacheSpec | None = None, *,
                 cuda_graphs: bool | None = None, compile_step: bool | None = None, fuse: bool = True) -> None:
        self.compiled = compiled
        if cuda_graphs is None:
            cuda_graphs = cuda_graphs_enabled()
        self.cuda_graphs = cuda_graphs
        self._step_fn: Any = None
        self._captured: CapturedStep | None = None   # the step captured on the current cache
        self.spec = kv_cache_spec(kv_cache)
        self.binding = CacheBinding()
        gm = compiled.graph_module
        self.dtype = _storage_dtype(gm)
        devices = {t.device for t in gm.state_dict().values()}
        self.device = next(iter(devices)) if len(devices) == 1 else torch.device("cpu")
        if compile_step is None:
            env = os.environ.get("QCOMPILE_COMPILE_STEP", "")
            compile_step = env == "1" if env in ("0", "1") else (cuda_graphs and self.device.type == "cuda")
        self.compile_step = compile_step
        ids = torch.zeros(2, 3, dtype=torch.long, device=self.device)  # not 1: torch.export specializes size-1 dims
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*re-traced in.*")
            traced, _, _ = compiled.graph_call((), {"input_ids": ids, "position_ids": ids})
        self.graph_module = fx.GraphModule(traced, copy.deepcopy(traced.graph))
        attention = CacheAttention(self.binding)
        ctx = PassContext((), {}, compiled.target, compiled.recipe)
        ctx.properties.add("lowered")
        manager = PassManager([attention, *([FuseSiblingLinears(), FuseEpilogues()] if fuse else [])], verify=False)
        manager.run(self.graph_module, ctx)
        self.geometry: CacheGeometry = attention.geometry
        self.prefill_graph = fx.GraphModule(self.graph_module, copy.deepcopy(self.graph_module.graph))
        """The generation graph with the LM head at one position per row (``passes/last_logits.py``):
        what a prefill runs, so that it never computes ``[B, T, vocabulary]`` logits."""
        last = PassManager([LastLogits(self.binding)], verify=False)
        last.run(self.prefill_graph, ctx)
        self.last_logits = bool(last.records[-1].stats.get("found"))
        """Whether the LM head was found (else a prefill computes every position's logits and picks)."""
        self.fusions: list[list[str]] = next((r.stats["fused"] for r in manager.records
                                              if r.name == FuseSiblingLinears.name), [])
        """The sibling linears merged into one GEMM each (``passes/fusion.py``), by module path."""
        self.epilogues: dict[str, list[str]] = next(({k: v for k, v in r.stats.items() if k != "notes"}
                                                     for r in manager.records if r.name == FuseEpilogues.name), {})
        """The linears that took the SiLU·mul or the residual add as their epilogue, by kind."""
        if self.spec is not None:
            self.spec.check_head_dim(self.geometry.head_dim)
        arch = compiled.architecture
        self.window = attention_window(getattr(arch, "config", None))
        """The model's sliding attention window: caches longer than it are refused."""
        self.cache: QuantizedKVCache | DenseKVCache | None = None

    def allocate(self, batch: int, max_length: int) -> QuantizedKVCache | DenseKVCache:
        """An empty cache for ``batch`` rows of up to ``max_length`` tokens: the current one when it
        has exactly ``batch`` rows and room for ``max_length`` (reset), else a new one."""
        if self.window is not None and max_length > self.window:
            raise ValueError(f"the model attends within a sliding window of {self.window} tokens, which the cached "
                             f"attention does not implement: a cache of {max_length} tokens per row would need it "
                             f"(keep prompt plus new tokens within {self.window})")
        c = self.cache
        if c is None or c.batch != batch or c.max_seq_len < max_length:
            self._captured = None   # a graph holds the old cache's addresses
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
                num_new: torch.Tensor | None = None, *, compiled: bool = False,
                logit_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, T, V]`` of ``input_ids`` ``[B, T]`` at ``position_ids``, appending their keys and
        values to the cache: ``num_new`` (``[B]``) of the ``T`` are real per row (right padding).
        ``compiled``: through :meth:`compiled_graph` (``torch.compile``). ``logit_rows`` (``[B]``):
        only the logits at that position of each row, ``[B, V]`` (:attr:`prefill_graph`)."""
        if self.binding.cache is None:
            raise RuntimeError("CachedDecoder.forward before allocate(batch, max_length)")
        self.binding.num_new = num_new
        _, args, kwargs = self.compiled.graph_call((), {"input_ids": input_ids, "position_ids": position_ids})
        with torch.no_grad():
            if logit_rows is None:
                graph = self.compiled_graph() if compiled else self.graph_module
                return _logits(graph(*args, **kwargs))
            rows = logit_rows.to(device=input_ids.device, dtype=torch.long)
            if not self.last_logits:
                return _logits(self.graph_module(*args, **kwargs))[torch.arange(len(rows), device=rows.device), rows]
            self.binding.logit_rows = rows
            try:
                return _logits(self.prefill_graph(*args, **kwargs))[:, 0]
            finally:
                self.binding.logit_rows = None

    def compiled_graph(self) -> Any:
        """The generation graph under ``torch.compile`` (``runtime/inductor.py``; automatic dynamic
        shapes: batch 1, then one symbolic compile for the other batch sizes)."""
        if self._step_fn is None:
            self._step_fn = inductor_compiled(self.graph_module, dynamic=None)
        return self._step_fn

    __call__ = forward

    def decode_step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, V]`` after appending one token per row (``token``, ``position``: ``[B]``): a
        replay of the captured step on CUDA (captured on first use), else an eager forward. A replay
        returns the graph's static output: the next step overwrites it (clone what you keep)."""
        cache = self.binding.cache
        if not (self.cuda_graphs and self.device.type == "cuda"):
            return self.forward(token[:, None], position[:, None].long(), compiled=self.compile_step)[:, -1]
        if self._captured is None:
            self._captured = self._capture(token, position)
        step = self._captured
        step.token.copy_(token[:, None])
        step.position.copy_(position[:, None])
        step.graph.replay()
        cache.advance_bounds(1)
        return step.logits

    def _warm_up(self, tok: torch.Tensor, pos: torch.Tensor, lengths: torch.Tensor) -> None:
        """One forward before the capture, through ``torch.compile`` when asked; a failed compile is
        said, the cache's ``lengths`` restored and the forward run without it."""
        if self.compile_step:
            try:
                self.forward(tok, pos, compiled=True)
                return
            except Exception as e:  # noqa: BLE001 - said, then the step is captured without torch.compile
                warnings.warn(f"torch.compile of the decode step failed ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); the step is captured without it "
                              "(QCOMPILE_COMPILE_STEP=0 skips the attempt)", RuntimeWarning, stacklevel=4)
                self.compile_step = False
                self._step_fn = None
                self.binding.cache.lengths.copy_(lengths)
        self.forward(tok, pos)

    def _capture(self, token: torch.Tensor, position: torch.Tensor) -> CapturedStep:
        """Capture the one-token step on the bound cache (warm-up runs on a side stream, then the
        lengths they advanced restored)."""
        cache = self.binding.cache
        tok, pos = token[:, None].clone(), position[:, None].long().clone()
        lengths = cache.lengths.clone()
        with cache.full_bounds():
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):   # Triton (and torch.compile) compile and autotune outside the capture
                    self._warm_up(tok, pos, lengths)
                    cache.lengths.copy_(lengths)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = self.forward(tok, pos, compiled=self.compile_step)[:, -1]
        cache.lengths.copy_(lengths)
        return CapturedStep(graph, tok, pos, logits)
