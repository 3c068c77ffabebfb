"""Running a graph node by node: flat inputs, recorded intermediates, float64 copies."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def flat_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list[Any]:
    """The placeholder values for ``gm(*args, **kwargs)``, flattened as torch.export does."""
    codegen = gm.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is None or info.in_spec is None:
        return list(args) + list(kwargs.values())
    spec = info.in_spec
    children = spec.children() if callable(getattr(spec, "children", None)) else spec.children_specs
    if len(children) == 2 and children[1].type is dict:
        order = children[1].context
        kwargs = {k: kwargs[k] for k in order if k in kwargs}
    return pytree.tree_leaves((tuple(args), kwargs))


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, keep: set[str] | None, transform=None):
        super().__init__(gm)
        self.keep = keep
        self.transform = transform
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if self.keep is None or n.name in self.keep:
            self.values[n.name] = self.transform(out) if self.transform is not None else out
        return out


def run_recording(
    gm: fx.GraphModule, args: tuple, kwargs: dict, names: Iterable[str] | None = None, transform=None
) -> tuple[list[Any], dict[str, Any]]:
    """Run ``gm`` on the inputs; return its flat outputs and the values of ``names``
    (every node when ``names`` is None), passed through ``transform`` if given."""
    rec = _Recorder(gm, None if names is None else set(names), transform)
    with torch.no_grad():
        outputs = rec.run(*flat_inputs(gm, args, kwargs))
    return pytree.tree_leaves(outputs), rec.values


def capture_inputs(
    gm: fx.GraphModule, args: tuple, kwargs: dict, nodes: Iterable[fx.Node], max_rows: int | None = None
) -> dict[str, torch.Tensor]:
    """The first input (the activation) of each node as a 2-D ``[rows, features]``
    tensor, keyed by node name: calibration data. ``max_rows`` keeps evenly spaced
    rows so that long examples do not hold every activation of a large model."""

    def rows(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        t = t.detach().reshape(-1, t.shape[-1])
        if max_rows is not None and t.shape[0] > max_rows:
            t = t[torch.linspace(0, t.shape[0] - 1, max_rows).long()]
        return t

    sources: dict[str, list[str]] = {}
    for n in nodes:
        sources.setdefault(n.args[0].name, []).append(n.name)
    _, values = run_recording(gm, args, kwargs, sources, transform=rows)
    return {name: values[src] for src, names in sources.items() for name in names}


def to_float64(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` computing in float64: floating weights upcast and every
    explicit float cast in the graph retargeted to float64."""
    gm64 = copy.deepcopy(gm)
    for module in gm64.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.dtype in _FLOAT_DTYPES:
                module._parameters[name] = torch.nn.Parameter(p.detach().double(), requires_grad=False)
        for name, b in list(module._buffers.items()):
            if b is not None and b.dtype in _FLOAT_DTYPES:
                module._buffers[name] = b.double()
    up = lambda a: torch.float64 if a in _FLOAT_DTYPES else a  # noqa: E731
    for node in list(gm64.graph.nodes):
        if node.op == "call_function" and node.target == torch.ops.aten._assert_tensor_metadata.default:
            gm64.graph.erase_node(node)  # dtype asserts pin the dtypes this copy changes
            continue
        node.args = pytree.tree_map(up, node.args)
        node.kwargs = pytree.tree_map(up, node.kwargs)
    gm64.recompile()
    return gm64


def inputs_to_float64(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    up = lambda t: t.double() if isinstance(t, torch.Tensor) and t.dtype in _FLOAT_DTYPES else t  # noqa: E731
    return pytree.tree_map(up, args), pytree.tree_map(up, kwargs)


RESUMABLE_MAX_BYTES = 4 << 30
"""Live activations a :class:`ResumableRun` keeps between stages (all batches together) before it
falls back to re-running each stage from the inputs."""


class ResumableRun:
    """Runs ``gm`` over a list of input batches in stages, never computing a node twice.

    ``advance(names)`` executes, for every batch, the nodes after the previous stop up to the last
    of ``names`` and returns those nodes' values; between stages it keeps only the values that later
    nodes read. A sequential pass (GPTQ: measure a layer's inputs, quantize it, measure the next
    layer's) so costs one pass over the graph in all instead of one per layer.

    Rules:
    - Attribute reads (weights) are fetched afresh at every stage, so a weight written between
      stages is what the nodes of later stages see; a node already executed is not re-run, so a
      caller may only write weights that no executed node has read (GPTQ writes the weights of the
      linears after the stop: their inputs were the stop).
    - ``weights`` (attribute target → tensor) are bound in place of the module's attributes.
    - Asking for a node before the previous stop returns its value if it is still live, else raises.
    - Past ``max_bytes`` of live values (all batches), it frees them and re-runs each later stage
      from the inputs (the old cost, same results); ``note`` then says so.
    """

    def __init__(self, gm: fx.GraphModule, batches: list[tuple[tuple, dict]],
                 weights: dict[str, torch.Tensor] | None = None, max_bytes: int | None = None) -> None:
        self.gm, self.batches, self.weights = gm, batches, weights
        self.max_bytes = RESUMABLE_MAX_BYTES if max_bytes is None else max_bytes
        self.nodes = [n for n in gm.graph.nodes if n.op != "output"]
        self.position = {n: i for i, n in enumerate(self.nodes)}
        self._by_name = {n.name: n for n in self.nodes}
        last = len(self.nodes)  # read by the output: live to the end
        self.last_use = {n: max((self.position.get(u, last) for u in n.users), default=-1) for n in self.nodes}
        self.stop = -1
        self.restart = False
        self.note: str | None = None
        self._envs: list[dict[fx.Node, Any]] = [self._bound_inputs(a, k) for a, k in batches]
        self._check_inputs()
        self._interp = _BoundAttrInterpreter(gm, weights)

    def _bound_inputs(self, args: tuple, kwargs: dict) -> dict[fx.Node, Any]:
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        return dict(zip(placeholders, flat_inputs(self.gm, args, kwargs), strict=True))

    def _check_inputs(self) -> None:
        """Each batch's inputs against the traced inputs' ranks and static sizes: a stage may stop
        before any node reads an input, so a wrong shape must be caught here, not by a kernel."""
        for i, env in enumerate(self._envs):
            for node, value in env.items():
                traced = node.meta.get("val")
                if not (isinstance(traced, torch.Tensor) and isinstance(value, torch.Tensor)):
                    continue
                static = [_static_size(d) for d in traced.shape]
                if value.dim() != len(static) or any(d is not None and d != v for d, v in zip(static, value.shape)):
                    shapes = [tuple(t.shape) for t in env.values() if isinstance(t, torch.Tensor)]
                    want = tuple(d if d is not None else "*" for d in static)
                    raise ValueError(f"calibration batch {i} (input shapes {shapes}) does not fit the traced model: "
                                     f"input {node.name} has shape {tuple(value.shape)}, the graph takes {want}")

    def advance(self, names: Iterable[str]) -> list[dict[str, Any]]:
        """Per batch, ``{name: value}`` of the nodes ``names`` (run up to the last of them)."""
        wanted = [self._by_name[name] for name in names]
        end = max(self.position[n] for n in wanted)
        start = self.stop + 1
        if self.restart:
            start = 0
        elif end < self.stop:
            end = self.stop
        out = []
        with torch.no_grad():
            for i, (env, (args, kwargs)) in enumerate(zip(self._envs, self.batches, strict=True)):
                if self.restart:
                    env = self._bound_inputs(args, kwargs)
                else:
                    for n in env:
                        if n.op == "get_attr":
                            env[n] = self._interp.fetch_attr(n.target)
                self._interp.env = env
                try:
                    for node in self.nodes[start:end + 1]:
                        if node.op != "placeholder":  # bound from the batch
                            env[node] = self._interp.run_node(node)
                except Exception as e:
                    shapes = [tuple(t.shape) for t in flat_inputs(self.gm, args, kwargs) if isinstance(t, torch.Tensor)]
                    raise ValueError(f"calibration batch {i} (input shapes {shapes}) does not fit the traced model "
                                     f"(at node {node.name}): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                                     ) from e
                missing = [n.name for n in wanted if n not in env]
                if missing:
                    raise RuntimeError(f"node(s) {', '.join(missing)} ran before stage {self.stop} and are no longer "
                                       "kept: ask for nodes in graph order")
                out.append({n.name: env[n] for n in wanted})
                for n in [n for n in env if self.last_use[n] <= end and n.op != "placeholder"]:
                    del env[n]
                if self.restart:
                    self._envs[i] = {}
        self.stop = end
        if not self.restart and self._live_bytes() > self.max_bytes:
            self.restart_from_inputs(f"live activations passed {self.max_bytes / 2**30:.1f} GiB after node "
                                     f"{self.nodes[end].name}: later stages re-run the graph from the inputs")
        return out

    def executed(self, node: fx.Node) -> bool:
        """Whether ``node`` already ran (a weight it reads, written now, would not reach it)."""
        return not self.restart and self.position[node] <= self.stop

    def restart_from_inputs(self, reason: str) -> None:
        """From now on, every stage re-runs the graph from the inputs (``note`` says why)."""
        self.restart, self.note = True, reason
        self._envs = [{} for _ in self._envs]

    def _live_bytes(self) -> int:
        seen: set[int] = set()
        total = 0
        for env in self._envs:
            for n, v in env.items():
                if n.op == "get_attr" or not isinstance(v, torch.Tensor) or id(v) in seen:
                    continue
                seen.add(id(v))
                total += v.numel() * v.element_size()
        return total


def _static_size(d: Any) -> int | None:
    """A traced dimension's size if it is fixed (an int, or a SymInt that is a constant), else None."""
    if isinstance(d, int):
        return d
    node = getattr(d, "node", None)
    return node.maybe_as_int() if node is not None and hasattr(node, "maybe_as_int") else None


class _BoundAttrInterpreter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, weights: dict[str, torch.Tensor] | None):
        super().__init__(gm)
        self.weights = weights

    def fetch_attr(self, target: str) -> Any:
        if self.weights is not None and target in self.weights:
            return self.weights[target]
        return super().fetch_attr(target)
