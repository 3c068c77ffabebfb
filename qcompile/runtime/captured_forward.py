"""``cm(...)`` on CUDA as CUDA-graph replays: one graph per call shape.

A lowered graph runs op by op: each op is a Python dispatch and one or more kernel launches, so a
one-token forward of a quantized model is launch-bound (``benchmarks/check_compile_gpu.py``
measured it slower than the bf16 model it came from). A CUDA graph replays the same kernels with
no host work. The first call of a shape runs eagerly (it compiles the Triton kernels); the second
captures the graph (one warm-up on a side stream, then the capture) and every later call copies
its tensors into the graph's static inputs, replays, and returns copies of the outputs (so that an
output a caller keeps is never overwritten by the next call).

Shapes are keyed exactly (no padding to buckets: padding would change an encoder's outputs). The
graphs share one memory pool and the least recently used is dropped past ``max_graphs``. A graph
that cannot be captured runs eagerly, with a warning naming the reason: one whose nodes need the
host (:func:`capture_blocker`: data-dependent shapes, ``.item()``, CPU constants) is refused
before any capture, since a capture that fails part-way can leave PyTorch's allocator in a state
later CUDA work trips over; any other capture error is caught as a last resort. ``QCOMPILE_CUDA_GRAPHS=0`` (or
``CompiledModel.cuda_graphs = False``) runs every call eagerly.

``compile=True`` (``QCOMPILE_COMPILE_FORWARD=1``, ``CompiledModel.compile_forward``) runs the graph
through ``torch.compile`` first (``runtime/inductor.py``), compiled once per call shape: Inductor's
fusion of the elementwise ops, at a compile of seconds to minutes per new shape. Off by default.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

MAX_GRAPHS = 8
"""Captured shapes a compiled model keeps; each holds its intermediates in the shared pool and its
static output (a prefill's logits: tokens x vocabulary)."""

MAX_COUNTED = 1024
"""Call shapes counted towards a capture; past it the counts restart (a caller whose shapes never
repeat must not grow this without bound)."""

CAPTURE_AFTER = 2
"""The call of a shape that captures it: the first runs eagerly (Triton compiles its kernels there)."""


def cuda_graphs_enabled() -> bool:
    """``QCOMPILE_CUDA_GRAPHS`` unset or anything but ``0``: the one switch for captured forwards and
    the captured decode step."""
    return os.environ.get("QCOMPILE_CUDA_GRAPHS", "1") != "0"


HOST_OPS = frozenset({
    "aten._local_scalar_dense.default", "aten.item.default", "aten.nonzero.default", "aten.nonzero_static.default",
    "aten.masked_select.default", "aten.unique.default", "aten._unique2.default", "aten.unique_consecutive.default",
    "aten.unique_dim.default", "aten.repeat_interleave.Tensor", "aten.bincount.default", "aten.histc.default",
    "aten.masked_scatter.default", "aten._assert_async.msg",
})
"""ATen ops that read device values on the host (a sync, or an output shape that depends on data):
not capturable in a CUDA graph."""


def capture_blocker(fn: Any) -> str | None:
    """Why ``fn`` (an FX graph module) cannot be captured in a CUDA graph, or ``None``: a node in
    :data:`HOST_OPS`, a boolean-mask index, or a non-scalar tensor constant on the CPU (its copy to
    the GPU inside the graph is a host transfer). Functions that are not graph modules are not
    inspected."""
    from torch import fx

    if not isinstance(fn, fx.GraphModule):
        return None
    for node in fn.graph.nodes:
        if node.op == "call_function" and str(node.target) in HOST_OPS:
            return f"node {node.name} ({node.target}) needs the host"
        if node.op == "call_function" and str(node.target) == "aten.index.Tensor":
            for index in node.args[1] if len(node.args) > 1 else ():
                value = index.meta.get("val") if isinstance(index, fx.Node) else None
                if isinstance(value, torch.Tensor) and value.dtype == torch.bool:
                    return f"node {node.name} indexes with a boolean mask (a data-dependent shape)"
        if node.op == "get_attr":
            value = getattr(fn, str(node.target), None)
            if isinstance(value, torch.Tensor) and value.device.type == "cpu" and value.dim() > 0:
                return f"tensor constant {node.target} is on the CPU"
    return None


@dataclass
class _Captured:
    fn: Callable[..., Any]         # held: the key's id(fn) stays this function's
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]     # the static inputs, in the order of the call's tensor leaves
    output: Any                    # the static output structure


def _leaf_key(leaf: Any) -> Any:
    if isinstance(leaf, torch.Tensor):
        return ("tensor", tuple(leaf.shape), leaf.stride(), leaf.dtype, leaf.device)
    hash(leaf)   # an unhashable constant: the caller runs the call eagerly
    return ("value", type(leaf), leaf)


class CapturedForward:
    """Runs ``fn(*args, **kwargs)`` through per-shape CUDA graphs when its tensors are on CUDA, and
    directly otherwise. ``fn`` must be a pure function of its tensors (a lowered graph is)."""

    def __init__(self, max_graphs: int = MAX_GRAPHS, compile: bool | None = None) -> None:
        self.max_graphs = max_graphs
        self.enabled = True
        self.compile = os.environ.get("QCOMPILE_COMPILE_FORWARD", "0") == "1" if compile is None else compile
        self._compiled: dict[int, tuple[Callable[..., Any], Callable[..., Any]]] = {}
        self._graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self._calls: dict[tuple, int] = {}
        self._eager: dict[tuple, str] = {}   # keys that run eagerly, and why
        self._pool: Any = None
        self.replays = 0

    @property
    def reasons(self) -> dict[tuple, str]:
        """Why calls of these shapes run eagerly."""
        return dict(self._eager)

    def __call__(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        if not (tensors and all(t.is_cuda for t in tensors)):
            return fn(*args, **kwargs)
        if self.compile:
            fn = self._inductor(fn)
        if not (self.enabled and cuda_graphs_enabled()):
            return fn(*args, **kwargs)
        try:
            key = (id(fn), spec, tuple(_leaf_key(x) for x in leaves))
        except TypeError:
            return fn(*args, **kwargs)
        if key in self._eager:
            return fn(*args, **kwargs)
        captured = self._graphs.get(key)
        if captured is not None and captured.fn is not fn:
            self._drop(key)
            captured = None
        if captured is None:
            if len(self._calls) >= MAX_COUNTED:
                self._calls.clear()
            self._calls[key] = self._calls.get(key, 0) + 1
            if self._calls[key] < CAPTURE_AFTER:
                return fn(*args, **kwargs)
            blocker = capture_blocker(fn)
            if blocker is not None:
                self._refuse(key, blocker)
                return fn(*args, **kwargs)
            captured = self._capture(key, fn, leaves, spec)
            if captured is None:
                return fn(*args, **kwargs)
        self._graphs.move_to_end(key)
        for static, t in zip(captured.inputs, tensors, strict=True):
            static.copy_(t)
        captured.graph.replay()
        self.replays += 1
        return pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, captured.output)

    def _inductor(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        from qcompile.runtime.inductor import inductor_compiled

        entry = self._compiled.get(id(fn))
        if entry is None or entry[0] is not fn:
            entry = (fn, inductor_compiled(fn))
            self._compiled[id(fn)] = entry
        return entry[1]

    def _capture(self, key: tuple, fn: Callable[..., Any], leaves: list, spec: Any) -> _Captured | None:
        static = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
        args, kwargs = pytree.tree_unflatten(static, spec)
        device = next(x.device for x in static if isinstance(x, torch.Tensor))
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                fn(*args, **kwargs)
            torch.cuda.current_stream(device).wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                output = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any capture failure: this shape runs eagerly, said once
            self._refuse(key, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
            return None
        out_leaves = pytree.tree_leaves(output)
        if not any(isinstance(x, torch.Tensor) for x in out_leaves):
            self._refuse(key, f"its output ({type(output).__name__}) holds no tensor that pytree can see")
            return None
        captured = _Captured(fn, graph, [x for x in static if isinstance(x, torch.Tensor)], output)
        self._graphs[key] = captured
        if len(self._graphs) > self.max_graphs:
            self._drop(next(iter(self._graphs)))
        return captured

    def _drop(self, key: tuple) -> None:
        """Forget one graph; with the last one the pool goes too (a pool no live graph holds is freed
        by PyTorch, and capturing into its stale handle trips an allocator assertion)."""
        del self._graphs[key]
        if not self._graphs:
            self._pool = None

    def _refuse(self, key: tuple, reason: str) -> None:
        self._eager[key] = reason
        warnings.warn(f"the compiled forward is not captured as a CUDA graph for this call shape; it runs "
                      f"eagerly ({reason})", stacklevel=4)

    def clear(self) -> None:
        """Drop every captured graph (their memory returns to the pool)."""
        self._graphs.clear()
        self._pool = None
        self._calls.clear()
        self._compiled.clear()
