"""How much error each option adds to each layer, measured on the calibration set.

Three proxies, each a ``[layers, options]`` matrix (rows: the layers mixed precision decides,
columns: the candidate options; 16-bit costs 0):

- ``layer``: the layer's own relative squared output error ``‖XWᵀ − Q(X)Q(W)ᵀ‖² / ‖XWᵀ‖²`` on
  its calibration rows (the statistics' sample). Cheap; blind to how the rest of the model
  amplifies or damps the error.
- ``model``: the model's relative squared output error ``Σ‖Y − Ŷ‖² / Σ‖Y‖²`` over the
  calibration batches (first floating output, as the report's cosine) when *only* that layer
  takes that option. One forward of the calibration set per layer and option.
- ``hessian``: HAWQ's trace-weighted weight error ``tr(H)/K · ‖W − Q(W)‖²`` with ``H = XᵀX/n``
  (the input's second moment): the error a layer adds if its inputs were uncorrelated.

The final error of a mixed assignment is predicted as the sum over layers (errors of
independent layers add in squared norm); :func:`proxy_correlations` measures how well each
proxy's sum predicts the measured end-to-end error over random assignments.

Weights are quantized by the pipeline's own quantizer (``WeightQuantizer.quantize_weight``:
RTN, or GPTQ on the float model's Hessians), so the error measured is the error the compile
will make, up to GPTQ's sequential updates (which only lower it).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import fx

from qcompile.formats import QuantizedTensor, QuantSpec
from qcompile.ir.annotations import LayerDecision
from qcompile.ir.graph import get_attr, module_path
from qcompile.ir.interpret import flat_inputs
from qcompile.passes.calibration import ActivationStats, Calibration
from qcompile.passes.mixed_precision_options import PrecisionOption, handlers_for

PROXIES = ("model", "layer", "hessian")
"""Sensitivity proxies, the default first."""



@dataclass(frozen=True)
class Product:
    """A layer's product under one option: a quantized weight (with the option's activation spec)
    or, for options whose extras bring their own computation, ``forward`` (``x ↦ x Ŵᵀ``, no bias)."""

    qt: QuantizedTensor | None = None
    activation: QuantSpec | None = None
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def weight_only(self) -> bool:
        """A plain dequantized weight reproduces it (so the probe can swap the weight in)."""
        return self.forward is None and self.activation is None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x Ŵᵀ`` without bias."""
        if self.forward is not None:
            return self.forward(x)
        from qcompile.codegen.quantized_linear import reference_quantized_linear

        return reference_quantized_linear(x, self.qt, None, self.activation)


def _first_float(outputs: object) -> torch.Tensor:
    for t in pytree.tree_leaves(outputs):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.detach().double()
    raise ValueError("the model has no floating-point output to measure errors on")


class _Substituted(fx.Interpreter):
    """Runs the graph with some linears' products replaced (their bias kept)."""

    def __init__(self, gm: fx.GraphModule, products: dict[str, Product]):
        super().__init__(gm)
        self.products = products

    def run_node(self, n: fx.Node) -> object:
        product = self.products.get(n.name)
        if product is None:
            return super().run_node(n)
        x = self.env[n.args[0]]
        y = product(x)
        bias = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
        if isinstance(bias, fx.Node):
            y = y + self.env[bias].to(y.dtype)
        return y


@contextlib.contextmanager
def _swapped_weights(gm: fx.GraphModule, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """The graph's weight attributes ``weights`` (by get_attr target) replaced for the duration,
    the original objects put back after (never written in place)."""
    saved = []
    try:
        for target, value in weights.items():
            *path, name = target.split(".")
            owner = gm.get_submodule(".".join(path))
            table = owner._parameters if name in owner._parameters else owner._buffers
            saved.append((table, name, table[name]))
            table[name] = torch.nn.Parameter(value, requires_grad=False) if table is owner._parameters else value
        yield
    finally:
        for table, name, old in reversed(saved):
            table[name] = old


PREFIX_CACHE_BYTES = 2 << 30
"""The most memory the probe keeps for the float model's intermediate values (every node's, per
proxy batch); above it each measurement reruns the whole model."""


class OutputProbe:
    """The model's output error on the calibration set for any set of substituted layers
    (the float outputs computed once). ``batches``: only the first that many calibration batches
    (the model proxy costs one forward of them per layer and option; the Hessians and the
    quantizer still see every batch).

    With one layer substituted (the model proxy), only the nodes that depend on it are rerun: the
    float model's value of every node is kept from one interpreted forward (``prefix_cache``, when
    it fits in :data:`PREFIX_CACHE_BYTES`), so a layer late in the model costs a fraction of a
    forward. The ops are the same, so the errors are the full forward's."""

    def __init__(self, gm: fx.GraphModule, calibration: Calibration, batches: int | None = None,
                 prefix_cache: bool = True):
        self.gm = gm
        self.batches = list(calibration.batches)[:batches]
        self.inputs = [flat_inputs(gm, args, kwargs) for args, kwargs in self.batches]
        self.weight_of = {n.name: n.args[1].target for n in gm.graph.nodes
                          if n.op == "call_function" and len(n.args) > 1 and getattr(n.args[1], "op", "") == "get_attr"}
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.envs: list[dict[fx.Node, object]] | None = None
        """Every node's float value, per batch (``None``: not kept, too large or not asked)."""
        with torch.no_grad():
            if prefix_cache:
                self.envs = []
                for inp in self.inputs:  # stop as soon as the values outgrow the limit
                    interp = fx.Interpreter(gm, garbage_collect_values=False)
                    interp.run(*inp)
                    self.envs.append(interp.env)
                    if _env_bytes(self.envs) > PREFIX_CACHE_BYTES:
                        self.envs = None
                        break
            if self.envs is not None:
                out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
                self.reference = [_first_float(_output_value(env, out_node)) for env in self.envs]
            else:
                self.reference = [_first_float(gm(*args, **kwargs)) for args, kwargs in self.batches]
        self.energy = sum(float((r * r).sum()) for r in self.reference)
        self.runs = 0
        """Forwards of the calibration set so far (the report's cost of measuring)."""
        self.rerun_fraction = 0.0
        """Summed fraction of the graph's nodes rerun by the measurements that reused the prefix."""
        self.suffix_runs = 0
        """Measurements that reused the float prefix."""
        self._descendants: dict[tuple[str, ...], set[fx.Node]] = {}

    def _downstream(self, seeds: Sequence[fx.Node]) -> set[fx.Node]:
        key = tuple(sorted(n.name for n in seeds))
        if key not in self._descendants:
            out: set[fx.Node] = set()
            todo = [u for n in seeds for u in n.users]
            while todo:
                n = todo.pop()
                if n not in out:
                    out.add(n)
                    todo.extend(n.users)
            self._descendants[key] = out
        return self._descendants[key]

    def _suffix(self, name: str, product: Product, w_hat: torch.Tensor | None) -> list[torch.Tensor]:
        """The first floating output per batch with one layer substituted, rerunning only what
        depends on it (a weight-only product replaces the weight attribute's value everywhere it is
        read, as the full forward's swap does)."""
        node = next(n for n in self.order if n.name == name)
        if product.weight_only:
            target = self.weight_of[name]
            seeds = [n for n in self.order if n.op == "get_attr" and n.target == target]
        else:
            seeds = [node]
        rerun = self._downstream(seeds)
        self.rerun_fraction += len(rerun) / max(len(self.order), 1)
        self.suffix_runs += 1
        outs = []
        for env, inp in zip(self.envs, self.inputs):
            start = {n: v for n, v in env.items() if n not in rerun and n.op != "output"}
            if product.weight_only:
                for seed in seeds:
                    start[seed] = w_hat
                outs.append(_first_float(fx.Interpreter(self.gm).run(*inp, initial_env=start)))
            else:
                del start[node]
                outs.append(_first_float(_Substituted(self.gm, {name: product}).run(*inp, initial_env=start)))
        return outs

    def measure(self, products: dict[str, Product],
                dequantized: dict[str, torch.Tensor] | None = None) -> tuple[float, float]:
        """``(relative squared error, cosine)`` of the first floating output against float, over
        every calibration batch, with ``products`` substituted (by linear node name).
        ``dequantized``: weights already dequantized, by node name (saves unpacking them again)."""
        from qcompile.formats import dequantize

        err = dot = norm = 0.0
        swap = all(p.weight_only for p in products.values())
        given = dequantized or {}
        weights = {self.weight_of[name]: given[name] if name in given else dequantize(p.qt)
                   for name, p in products.items()} if swap else {}
        with torch.no_grad():
            if self.envs is not None and len(products) == 1:
                (name, product), = products.items()
                outs = self._suffix(name, product, weights.get(self.weight_of.get(name)) if swap else None)
            else:
                with _swapped_weights(self.gm, weights):
                    outs = [_first_float(self.gm(*args, **kwargs) if swap else
                                         _Substituted(self.gm, products).run(*inp))
                            for inp, (args, kwargs) in zip(self.inputs, self.batches)]
            for ref, out in zip(self.reference, outs):
                err += float(((out - ref) ** 2).sum())
                dot += float((out * ref).sum())
                norm += float((out * out).sum())
        self.runs += 1
        cosine = dot / math.sqrt(max(norm * self.energy, 1e-300))
        return err / max(self.energy, 1e-300), cosine


def _output_value(env: dict[fx.Node, object], out_node: fx.Node) -> object:
    """The graph's output from a full environment (as the output node would return it)."""
    return fx.node.map_arg(out_node.args[0], lambda n: env[n])


def _env_bytes(envs: list[dict[fx.Node, object]]) -> int:
    """Bytes of the distinct tensor storages in ``envs`` (views counted once, the module's own
    weights not counted: they are held anyway)."""
    seen: dict[int, int] = {}
    for env in envs:
        for n, v in env.items():
            if n.op == "get_attr":
                continue
            for t in pytree.tree_leaves(v):
                if isinstance(t, torch.Tensor):
                    st = t.untyped_storage()
                    seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


@dataclass
class SensitivityTable:
    """Per layer (``paths``, graph order) and option (``options``): each proxy's matrix (see the
    module docstring), the quantized weights behind them (``quantized``, ``None`` for 16-bit or an
    extras product) and the measured seconds."""

    paths: list[str]
    options: list[PrecisionOption]
    proxies: dict[str, np.ndarray]
    products: list[list[Product | None]] = field(repr=False, default_factory=list)
    seconds: float = 0.0

    def proxy(self, name: str) -> np.ndarray:
        """The ``[layers, options]`` matrix of proxy ``name``; ``ValueError`` lists those measured."""
        if name not in self.proxies:
            raise ValueError(f"sensitivity proxy {name!r} was not measured; measured: {', '.join(self.proxies)}")
        return self.proxies[name]

    def assignment_products(self, choice: Sequence[int], node_names: Sequence[str]) -> dict[str, Product]:
        """The substituted products of an assignment (16-bit layers are left as they are)."""
        return {name: self.products[i][o] for i, (name, o) in enumerate(zip(node_names, choice))
                if self.products[i][o] is not None}


def layer_products(weight: torch.Tensor, stats: ActivationStats | None, option: PrecisionOption,
                   quantize: Callable[[torch.Tensor, LayerDecision, ActivationStats | None], QuantizedTensor]
                   ) -> tuple[Product | None, torch.Tensor | None]:
    """One layer under one option: its product and its dequantized weight (``None, None`` for 16-bit).
    A registered extras ``forward`` replaces the plain quantized product."""
    if option.weight is None:
        return None, None
    from qcompile.formats import dequantize

    for handler in handlers_for(option):
        if handler.forward is not None:
            return Product(forward=handler.forward(weight, stats, option)), None
    qt = quantize(weight, LayerDecision(option.weight, option.activation, dict(option.extras)), stats)
    return Product(qt, option.activation), dequantize(qt)


def measure_sensitivity(gm: fx.GraphModule, nodes: Sequence[fx.Node], options: Sequence[PrecisionOption],
                        stats: dict[str, ActivationStats], probe: OutputProbe | None,
                        quantize: Callable[[torch.Tensor, LayerDecision, ActivationStats | None], QuantizedTensor],
                        proxies: Sequence[str] = PROXIES, progress: object = None) -> SensitivityTable:
    """Measure ``proxies`` for every layer in ``nodes`` and option in ``options`` (``stats``:
    calibration statistics by node name, with Hessians when ``hessian`` is asked; ``probe``:
    needed for ``model``). ``quantize`` is the pipeline's quantizer's per-layer hook."""
    import time

    unknown = [p for p in proxies if p not in PROXIES]
    if unknown:
        raise ValueError(f"unknown sensitivity proxies {unknown}; valid: {', '.join(PROXIES)}")
    start = time.perf_counter()
    shape = (len(nodes), len(options))
    out = {p: np.zeros(shape) for p in proxies}
    products: list[list[Product | None]] = []
    for i, node in enumerate(nodes):
        weight = get_attr(gm, node.args[1].target).detach().float()
        st = stats.get(node.name)
        row: list[Product | None] = []
        for j, option in enumerate(options):
            try:
                product, w_hat = layer_products(weight, st, option, quantize)
            except ValueError as e:
                raise ValueError(f"layer {module_path(node)}: option {option.name}: {e}") from e
            row.append(product)
            if product is None:
                continue
            if "layer" in out and st is not None:
                x = st.sample.float()
                ref = x @ weight.t()
                y = x @ w_hat.t() if product.weight_only and w_hat is not None else product(x)
                out["layer"][i, j] = float(((y - ref) ** 2).sum() / (ref * ref).sum().clamp_min(1e-30))
            if "hessian" in out:
                if st is None or st.hessian is None:
                    raise ValueError(f"layer {module_path(node)}: the hessian proxy needs the input Hessian")
                diff = (w_hat - weight) if w_hat is not None else None
                if diff is None:
                    x = st.sample.float()
                    diff_out = product(x) - x @ weight.t()
                    out["hessian"][i, j] = float((diff_out ** 2).sum() / max(x.shape[0], 1))
                else:
                    trace = float(torch.diagonal(st.hessian).sum()) / max(st.rows, 1)
                    out["hessian"][i, j] = trace / weight.shape[1] * float((diff ** 2).sum())
            if "model" in out:
                if probe is None:
                    raise ValueError("the model proxy needs an OutputProbe")
                given = {node.name: w_hat} if w_hat is not None else None
                out["model"][i, j] = probe.measure({node.name: product}, given)[0]
        products.append(row)
        if progress is not None:
            progress.advance_layer()
    return SensitivityTable([module_path(n) for n in nodes], list(options), out, products,
                            time.perf_counter() - start)


@dataclass(frozen=True)
class ProxyCorrelation:
    """How well a proxy's per-layer sum predicts the measured end-to-end error over random
    assignments: Spearman (rank) and Pearson (linear) correlation, and the number of assignments."""

    proxy: str
    spearman: float
    pearson: float
    assignments: int

    def to_dict(self) -> dict[str, float | int | str]:
        """JSON form."""
        return {"proxy": self.proxy, "spearman": self.spearman, "pearson": self.pearson,
                "assignments": self.assignments}


def proxy_correlations(table: SensitivityTable, node_names: Sequence[str], probe: OutputProbe,
                       assignments: int = 12, seed: int = 0) -> list[ProxyCorrelation]:
    """Measure ``assignments`` random mixed assignments end to end (each layer an option drawn
    uniformly) and correlate each proxy's predicted sum with the measured relative squared error."""
    from scipy.stats import pearsonr, spearmanr

    rng = np.random.default_rng(seed)
    n_layers, n_options = len(table.paths), len(table.options)
    measured, predicted = [], {p: [] for p in table.proxies}
    for _ in range(assignments):
        choice = rng.integers(0, n_options, n_layers)
        measured.append(probe.measure(table.assignment_products(choice, node_names))[0])
        for p, m in table.proxies.items():
            predicted[p].append(float(m[np.arange(n_layers), choice].sum()))
    return [ProxyCorrelation(p, float(spearmanr(v, measured).statistic), float(pearsonr(v, measured).statistic),
                             assignments) for p, v in predicted.items()]
