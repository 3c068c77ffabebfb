"""The compiled model users hold: callable like the original, with its report and artifact."""

from __future__ import annotations

import time
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx

from qcompile.formats import QuantSpec
from qcompile.formats.kv import KVCacheSpec
from qcompile.frontend.graph_inputs import GraphInputs, traced_inputs
from qcompile.frontend.signature import BoundCall, CallSignature
from qcompile.frontend.skeleton import architecture_skeleton
from qcompile.frontend.torch_export import ExportError
from qcompile.recipes import Recipe
from qcompile.report import Report
from qcompile.runtime.captured_forward import CapturedForward
from qcompile.targets import Target

MAX_RETRACED = 8
"""Re-traced graphs a compiled model keeps (besides the compiled one); the oldest is dropped."""


class CompiledModel:
    """A lowered model, callable like the original (same arguments, same output
    structure), with its report and an artifact writer.

    ``manifest``: how it was built (model class, target, recipe, passes with their load rules,
    pinned keyword arguments, example input shapes); ``save`` adds the per-layer decisions and
    results and the tensors.

    Calls are bound to the model's ``forward`` signature (``model``: the traced module, from which
    the signature and an architecture skeleton without weights are taken): positional or keyword,
    optional arguments present or absent. A call whose structure (which arguments, tensor ranks,
    constant values) no graph was traced with is re-traced once on the skeleton, through the load
    path (``artifact.rebuild``: structural passes re-run, decisions and quantized tensors restored
    from the compiled graph, never recomputed), sharing the compiled tensors; a warning says so
    and how long it took. Shapes are checked against each graph's static dimensions and limits
    first, with errors naming the argument and dimension.
    """

    def __init__(self, gm: fx.GraphModule, *, pinned_kwargs: dict, target: Target, recipe: Recipe,
                 report: Report | None, manifest: dict[str, Any], model: torch.nn.Module | None = None,
                 kv_cache: KVCacheSpec | None = None):
        self.pinned_kwargs = pinned_kwargs
        self.kv_cache = kv_cache
        """The KV-cache format ``generate`` uses (``compile(kv_cache=...)``); ``None``: uncompressed."""
        self._decoder: Any = None
        self._captured = CapturedForward()
        self.target = target
        self.recipe = recipe
        self._report = report
        self.manifest = manifest
        self._signature = CallSignature.of(model, pinned_kwargs) if model is not None else None
        self._skeleton, self._no_skeleton = None, "no model was given"
        if model is not None:
            try:
                self._skeleton = architecture_skeleton(model)
            except Exception as e:  # noqa: BLE001 - a model copy.deepcopy cannot copy: said at re-trace time
                self._no_skeleton = f"the model could not be copied for re-tracing ({type(e).__name__}: {e})"
        self.graph_module = gm

    @property
    def graph_module(self) -> fx.GraphModule:
        """The compiled graph (the one traced at compile time)."""
        return self._graph_module

    @graph_module.setter
    def graph_module(self, gm: fx.GraphModule) -> None:
        self._graph_module = gm
        self._graphs: OrderedDict[tuple, tuple[fx.GraphModule, GraphInputs]] = OrderedDict()
        self._primary: tuple[tuple, GraphInputs] | None = None
        if self._signature is not None:
            inputs = GraphInputs.of(gm, self._signature)
            traced = traced_inputs(gm)
            if inputs is not None and traced is not None:
                key = self._signature.bind(*traced).key
                self._primary = (key, inputs)

    @property
    def architecture(self) -> torch.nn.Module | None:
        """The model's architecture without weights (parameters on the meta device) that re-traces
        use; ``None`` when no model was given."""
        return self._skeleton

    def input_dims(self) -> GraphInputs | None:
        """The compiled graph's argument form and input dimensions (static sizes, limits)."""
        return self._primary[1] if self._primary is not None else None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the compiled model: the original model's arguments, positional or keyword, bound to its
        ``forward`` signature (a new call structure is re-traced once, with a warning); under
        ``torch.no_grad``. On CUDA a call shape seen twice is captured as a CUDA graph and replayed
        from then on (``runtime/captured_forward.py``; :attr:`cuda_graphs`)."""
        gm, call_args, call_kwargs = self.graph_call(args, kwargs)
        with torch.no_grad():
            return self._captured(gm, call_args, call_kwargs)

    @property
    def cuda_graphs(self) -> bool:
        """Whether CUDA calls are captured and replayed per call shape (default ``True``; the
        environment's ``QCOMPILE_CUDA_GRAPHS=0`` turns it off for every model). Setting it ``False``
        drops the captured graphs."""
        return self._captured.enabled

    @cuda_graphs.setter
    def cuda_graphs(self, enabled: bool) -> None:
        self._captured.enabled = bool(enabled)
        if not enabled:
            self._captured.clear()

    @property
    def compile_forward(self) -> bool:
        """Whether CUDA calls run the graph through ``torch.compile`` (Inductor fuses the elementwise ops
        around the quantized GEMMs; compiled once per call shape, seconds to minutes each) before the
        capture. Default ``False`` (``QCOMPILE_COMPILE_FORWARD=1`` turns it on)."""
        return self._captured.compile

    @compile_forward.setter
    def compile_forward(self, enabled: bool) -> None:
        self._captured.compile = bool(enabled)
        self._captured.clear()

    def graph_call(self, args: tuple, kwargs: dict) -> tuple[fx.GraphModule, tuple, dict]:
        """The graph that serves a call of the model with ``(args, kwargs)`` and the call in that
        graph's argument form, shapes checked: what ``__call__`` runs (a new call structure is
        re-traced once, with a warning). Exporters (``export_onnx``) trace the same graph."""
        if self._primary is None:  # no signature to bind to: the graph's own calling convention
            return self.graph_module, tuple(args), {**self.pinned_kwargs, **kwargs}
        call = self._signature.bind(args, kwargs)
        gm, inputs = self._graph_for(call)
        call_args, call_kwargs = self._signature.arguments(call, inputs.form)
        inputs.check(call_args, call_kwargs)
        return gm, call_args, call_kwargs

    forward = __call__

    def _graph_for(self, call: BoundCall) -> tuple[fx.GraphModule, GraphInputs]:
        key, inputs = self._primary
        if call.key == key:
            return self.graph_module, inputs
        if call.key in self._graphs:
            self._graphs.move_to_end(call.key)
            return self._graphs[call.key]
        traced = self._signature.bind(*traced_inputs(self.graph_module)).describe(self.pinned_kwargs)
        wanted = call.describe(self.pinned_kwargs)
        if self._skeleton is None:
            raise TypeError(f"{self._signature.owner}: called with ({wanted}), but the compiled graph takes "
                            f"({traced}) and cannot be re-traced: {self._no_skeleton}")
        start = time.perf_counter()
        try:
            entry = self._retrace(call)
        except ExportError as e:
            raise ExportError(f"{self._signature.owner}: re-tracing for a call with ({wanted}) failed: {e}") from e
        warnings.warn(f"{self._signature.owner}: called with ({wanted}); the compiled graph takes ({traced}): "
                      f"re-traced in {time.perf_counter() - start:.2f} s (compiled tensors shared, not copied; "
                      "cached for later calls like this)", stacklevel=3)
        self._graphs[call.key] = entry
        if len(self._graphs) > MAX_RETRACED:
            self._graphs.popitem(last=False)
        return entry

    def _retrace(self, call: BoundCall) -> tuple[fx.GraphModule, GraphInputs]:
        from qcompile.artifact import layer_records, rebuild

        form = self._signature.trace_form(call)
        args, kwargs = self._signature.arguments(call, form)
        state = self.graph_module.state_dict()
        manifest = {**self.manifest, "layers": layer_records(self.graph_module)}
        gm = rebuild(manifest, state, self._skeleton, args, kwargs).graph_module
        devices = {t.device for t in state.values()}
        if len(devices) == 1:
            gm.to(next(iter(devices)))  # the skeleton's non-persistent buffers; shared tensors stay
        left = [n for n, t in [*gm.named_parameters(), *gm.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"{self._signature.owner}: re-tracing left tensors without values {left[:4]} "
                               "(created from the weights' device at trace time)")
        inputs = GraphInputs.of(gm, self._signature)
        if inputs is None:
            raise RuntimeError(f"{self._signature.owner}: the re-traced graph records no input structure")
        return gm, inputs

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, *, attention_mask: torch.Tensor | None = None,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, streamer: Any = None, max_length: int | None = None,
                 prefill_chunk_size: int | None = None, generator: torch.Generator | None = None,
                 return_stats: bool = False) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """Generate from a compiled causal LM over its static KV cache (``compile(kv_cache=...)``):
        ``input_ids`` ``[B, T]`` followed by up to ``max_new_tokens`` tokens per row, as Hugging Face's
        ``generate`` returns them. Batched prompts of different lengths take an ``attention_mask``
        (left or right padding). Greedy by default; ``do_sample`` with ``temperature``, ``top_k``,
        ``top_p``. ``streamer``: an object with ``put(tokens)`` and ``end()`` (transformers'
        ``TextStreamer``). ``max_length``: tokens per row the cache holds (default: the longest
        prompt plus ``max_new_tokens``). ``return_stats`` also returns a
        ``runtime.generate.GenerationStats`` (prefill and decode times). docs/generate.md."""
        from qcompile.runtime.generate import generate

        if self._decoder is None:
            from qcompile.runtime.decoder import CachedDecoder

            self._decoder = CachedDecoder(self, self.kv_cache)
        out, stats = generate(self._decoder, input_ids, max_new_tokens, attention_mask=attention_mask,
                              do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                              eos_token_id=eos_token_id, pad_token_id=pad_token_id, streamer=streamer,
                              max_length=max_length, prefill_chunk_size=prefill_chunk_size, generator=generator)
        return (out, stats) if return_stats else out

    def report(self) -> Report | None:
        """The compile report (per-layer formats, bytes, errors, pass records, notes); ``None`` for an
        artifact saved without one."""
        return self._report

    def to(self, device: torch.device | str) -> CompiledModel:
        """Move the compiled tensors (and every re-traced graph) to ``device``; returns ``self``."""
        self.graph_module.to(device)
        for gm, _ in self._graphs.values():
            gm.to(device)
        self._decoder = None  # rebuilt (with its cache) on the new device
        return self

    def save(self, path: str | Path, *, compressed_tensors: bool = False) -> Path:
        """Write the artifact to the directory ``path`` (new, empty, or an earlier artifact);
        ``compressed_tensors`` also writes the transformers-readable compressed-tensors layout
        (``docs/artifacts.md``)."""
        from qcompile.artifact import save

        return save(self, path, compressed_tensors=compressed_tensors)

    def __repr__(self) -> str:
        model = self._report.model if self._report is not None else self.manifest.get("model_class", "?")
        return f"CompiledModel(model={model}, target={self.target.name}, recipe={self.recipe.name})"


def build_manifest(exported: Any, target: Target, recipe: Recipe, overrides: dict, passes: list) -> dict[str, Any]:
    """What an artifact records of how the model was compiled (``artifact.save`` adds layers)."""

    def describe(t: Any) -> Any:
        return {"shape": list(t.shape), "dtype": str(t.dtype)} if isinstance(t, torch.Tensor) else t

    return {
        "model_class": exported.model_class,
        "target": target.name,
        "recipe": recipe.to_dict(),
        "overrides": {k: (v.encode() if isinstance(v, QuantSpec) else v) for k, v in overrides.items()},
        "passes": [{"name": p.name, "on_load": p.on_load.value, "ensures": list(p.ensures), "options": p.options()}
                   for p in passes],
        "pinned_kwargs": exported.pinned_kwargs,
        "dynamic": exported.dynamic,
        "example_inputs": pytree.tree_map(describe, {
            "args": list(exported.args),
            "kwargs": {k: v for k, v in exported.kwargs.items() if k not in exported.pinned_kwargs}}),
    }
