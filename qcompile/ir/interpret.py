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
