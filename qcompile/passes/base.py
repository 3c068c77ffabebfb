"""The pass framework.

A :class:`Pass` is a small class with a clear result. It declares:

- ``exact``: it does not change the function (the manager checks this in float64);
- ``runs_after`` / ``runs_before``: names of passes it must follow / precede when both are in a
  pipeline (the manager sorts the pipeline by them, keeping the given order otherwise, and rejects
  a contradiction naming the passes);
- ``requires`` / ``ensures``: properties of the graph (``"canonical"``, ``"quant_decisions"``,
  ``"quant_results"``, ``"lowered"``) it needs and provides; an ensurer is ordered before a
  requirer, and a requirement nothing earlier ensures is an error naming the pass history;
- ``fills_in``: the manager adds this pass to a pipeline that requires a property it ensures
  but lists no pass ensuring it (``assign_quant_specs``: a custom pipeline that names only the
  quantizer still gets the recipe's decisions);
- ``on_load``: what ``qcompile.load`` does with it: ``rerun`` it (structural, weight-independent
  rewrites), ``restore`` its saved choices from the artifact (data-dependent passes: they must not
  be recomputed on the random weights of a model rebuilt for loading) or ``skip`` it (its effect is
  already in the saved tensors).
"""

from __future__ import annotations

import copy
import heapq
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import fx

from qcompile.ir.verify import VerificationError, compare, first_divergence

if TYPE_CHECKING:
    from qcompile.passes.calibration import ActivationStats, Calibration


class OnLoad(str, Enum):
    """What loading an artifact does with a pass (recorded per pass in the manifest)."""

    RERUN = "rerun"
    RESTORE = "restore"
    SKIP = "skip"


class PassOrderError(ValueError):
    """The declared constraints of a pipeline contradict each other."""


class PassRequirementError(RuntimeError):
    """A pass ran without a property it requires."""


@dataclass
class PassResult:
    """What a pass did: whether the graph changed, and numbers worth reporting (JSON values, in
    the report's pass records). ``stats["notes"]``, a list of strings, also become report notes:
    what a user should read without opening the pass records."""

    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """What passes may read besides the graph.

    ``example_args``/``example_kwargs``: the trace inputs (verification runs on them).
    ``calibration``: batches of the same form, for statistics (defaults to the trace inputs);
    ask :meth:`activation_stats`, which computes each statistic once per graph state.
    ``target``, ``recipe``: what the user asked for. ``artifact``: at load time, the artifact
    being restored (passes that declare ``on_load = RESTORE`` read their choices from it).
    """

    example_args: tuple = ()
    example_kwargs: dict = field(default_factory=dict)
    target: Any = None
    recipe: Any = None
    progress: Any = None
    options: dict[str, Any] = field(default_factory=dict)
    calibration: Calibration | None = None
    artifact: Any = None
    history: list[str] = field(default_factory=list)
    """Names of the passes run so far, in order."""
    properties: set[str] = field(default_factory=set)
    """Properties ensured so far (see :class:`Pass`)."""
    graph_version: int = 0
    """Bumped by the manager after every pass that changed the graph (invalidates statistics)."""
    _stats_cache: Any = None

    def __post_init__(self) -> None:
        from qcompile.passes.calibration import Calibration, StatsCache

        if self.calibration is None:
            self.calibration = Calibration([(tuple(self.example_args), dict(self.example_kwargs))], source="trace inputs")
        self._stats_cache = StatsCache()

    def activation_stats(self, gm: fx.GraphModule, nodes: Iterable[fx.Node], *, hessian: bool = False,
                         sample_rows: int = 256) -> dict[str, ActivationStats]:
        """Input statistics of each node (keyed by node name) over the calibration set:
        per-channel max |x| and mean |x|, ``XᵀX`` when ``hessian``, and up to ``sample_rows``
        evenly spaced input rows. Cached: asked again at the same graph state, nothing reruns."""
        return self._stats_cache.get(gm, list(nodes), self, hessian=hessian, sample_rows=sample_rows)


class Pass:
    """Base class. Subclasses set ``name`` (or get it from :func:`register_pass`), ``exact``,
    the ordering and load declarations above, and implement ``run``.

    Passes declaring ``on_load = OnLoad.RESTORE`` implement :meth:`restore` as well.
    """

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    runs_after: ClassVar[tuple[str, ...]] = ()
    runs_before: ClassVar[tuple[str, ...]] = ()
    requires: ClassVar[tuple[str, ...]] = ()
    ensures: ClassVar[tuple[str, ...]] = ()
    fills_in: ClassVar[bool] = False
    uses_calibration: ClassVar[bool] = False
    """Its result depends on calibration data (GPTQ, smoothing): ``compile`` warns when the user
    gave none and the example inputs stand in."""
    on_load: ClassVar[OnLoad] = OnLoad.RERUN

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Rewrite ``gm`` in place (or return a new graph in the result) and say what changed; ``ctx``
        gives the example inputs, calibration statistics, target, recipe and history."""
        raise NotImplementedError

    def restore(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """At load: re-apply the saved choices from ``ctx.artifact`` instead of recomputing them."""
        raise NotImplementedError(f"pass {self.name!r} declares on_load=restore but implements no restore()")

    def options(self) -> dict[str, Any]:
        """Constructor options to record in the manifest (JSON-serializable)."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, exact={self.exact})"


_REGISTRY: dict[str, Callable[..., Pass]] = {}


def register_pass(name: str) -> Callable[[type[Pass]], type[Pass]]:
    """Class decorator: make a pass available by name to recipes and ``PassManager.from_names``."""

    def wrap(cls: type[Pass]) -> type[Pass]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"a pass named {name!r} is already registered ({_REGISTRY[name].__name__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def registered_passes() -> dict[str, Callable[..., Pass]]:
    """Name -> pass factory, for every pass registered with :func:`register_pass`."""
    return dict(_REGISTRY)


def make_pass(name: str, **options: Any) -> Pass:
    """An instance of the registered pass ``name`` with ``options``; ``ValueError`` lists the
    registered names for an unknown one."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown pass {name!r}; registered passes: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**options)


def order_passes(passes: list[Pass]) -> list[Pass]:
    """The pipeline sorted by its declared constraints, otherwise in the given order.

    Edges: ``a.runs_before`` ∋ b, ``b.runs_after`` ∋ a, and a ensures what b requires (unless b
    ensures it itself). Raises :class:`PassOrderError` naming the passes of a contradiction.
    """
    index = {p.name: i for i, p in enumerate(passes)}
    if len(index) != len(passes):
        dupes = sorted({p.name for p in passes if sum(q.name == p.name for q in passes) > 1})
        raise PassOrderError(f"pipeline lists passes more than once: {', '.join(dupes)}")
    edges: dict[str, set[str]] = {p.name: set() for p in passes}
    why: dict[tuple[str, str], str] = {}

    def edge(a: str, b: str, reason: str) -> None:
        if a in index and b in index and a != b:
            edges[a].add(b)
            why.setdefault((a, b), reason)

    for p in passes:
        for b in p.runs_before:
            edge(p.name, b, f"{p.name!r} declares runs_before {b!r}")
        for a in p.runs_after:
            edge(a, p.name, f"{p.name!r} declares runs_after {a!r}")
        for prop in p.requires:
            if prop in p.ensures:
                continue
            for q in passes:
                if prop in q.ensures and prop not in q.requires:
                    edge(q.name, p.name, f"{p.name!r} requires {prop!r}, which {q.name!r} ensures")
    indegree = {n: 0 for n in edges}
    for targets in edges.values():
        for b in targets:
            indegree[b] += 1
    ready = [(index[n], n) for n, d in indegree.items() if d == 0]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        _, n = heapq.heappop(ready)
        order.append(n)
        for b in edges[n]:
            indegree[b] -= 1
            if indegree[b] == 0:
                heapq.heappush(ready, (index[b], b))
    if len(order) < len(passes):
        stuck = [n for n in edges if n not in order]
        cycle = [why[(a, b)] for a in stuck for b in edges[a] if b in stuck]
        raise PassOrderError(f"no order satisfies the pipeline's constraints between passes {', '.join(map(repr, stuck))}: "
                             + "; ".join(cycle))
    by_name = {p.name: p for p in passes}
    return [by_name[n] for n in order]


def _fill_ins(passes: list[Pass]) -> list[Pass]:
    """Registered ``fills_in`` passes that ensure what the pipeline requires but does not ensure."""
    ensured = {prop for p in passes for prop in p.ensures}
    names = {p.name for p in passes}
    added: list[Pass] = []
    for p in passes:
        for prop in p.requires:
            if prop in ensured:
                continue
            for name, cls in _REGISTRY.items():
                if cls.fills_in and prop in cls.ensures and name not in names:
                    added.append(cls())
                    names.add(name)
                    ensured.update(cls.ensures)
    return added


@dataclass
class PassRecord:
    name: str
    exact: bool
    changed: bool
    seconds: float
    nodes_before: int
    nodes_after: int
    stats: dict[str, Any]
    verified_error: float | None = None
    restored: bool = False


class PassManager:
    """Runs passes in their declared order.

    ``verify``: after each exact pass that changed the graph, run the graph before and after on
    the example inputs in float64 and fail with the pass name and the first diverging node if the
    worst relative error exceeds ``tolerance``. ``load=True`` (used by ``qcompile.load``) applies
    each pass's ``on_load`` rule instead of running it.
    """

    def __init__(self, passes: Iterable[Pass], verify: bool = True, tolerance: float = 1e-6, *, load: bool = False):
        given = list(passes)
        self.inserted = [] if load else _fill_ins(given)
        self.passes = order_passes(given + self.inserted)
        self.verify = verify
        self.tolerance = tolerance
        self.load = load
        self.records: list[PassRecord] = []
        kept = [p for p in self.passes if p in given]
        if any(p is not q for p, q in zip(given, kept)):
            warnings.warn(f"passes reordered by their declared constraints: {' → '.join(p.name for p in self.passes)}",
                          stacklevel=2)

    @classmethod
    def from_names(cls, names: Iterable[str], **kwargs: Any) -> PassManager:
        """A manager over registered passes by name, each with default options."""
        return cls([make_pass(n) for n in names], **kwargs)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        """Run the passes in their declared order on ``gm``: check each one's requirements, verify
        exact ones in float64 when asked, record timings and stats in ``records``, and at load apply
        each pass's ``on_load`` rule instead."""
        for p in self.passes:
            missing = [prop for prop in p.requires if prop not in ctx.properties]
            if missing:
                raise PassRequirementError(
                    f"pass {p.name!r} requires {', '.join(map(repr, missing))}, which no earlier pass ensured "
                    f"(history: {', '.join(ctx.history) or 'none'}; passes that ensure it: "
                    f"{', '.join(n for n, c in _REGISTRY.items() if set(missing) & set(c.ensures)) or 'none registered'})")
            action = p.on_load if self.load else OnLoad.RERUN
            if action is OnLoad.SKIP:
                ctx.properties.update(p.ensures)
                ctx.history.append(p.name)
                continue
            before = copy.deepcopy(gm) if (self.verify and p.exact and action is OnLoad.RERUN) else None
            n_before = len(gm.graph.nodes)
            if ctx.progress is not None:
                ctx.progress.step(f"pass {p.name}" + (" (restored from the artifact)" if action is OnLoad.RESTORE else ""))
            start = time.perf_counter()
            try:
                with torch.no_grad():
                    result = p.run(gm, ctx) if action is OnLoad.RERUN else p.restore(gm, ctx)
            except (VerificationError, PassRequirementError, PassOrderError):
                raise
            except Exception as e:
                if hasattr(e, "add_note"):  # Python >= 3.11
                    e.add_note(f"in pass {p.name!r} (history: {', '.join(ctx.history) or 'none'})")
                raise
            seconds = time.perf_counter() - start
            try:
                gm.graph.lint()
            except Exception as e:
                raise RuntimeError(f"pass {p.name!r} left a malformed graph (history: {', '.join(ctx.history)}): {e}") from e
            gm.recompile()
            record = PassRecord(p.name, p.exact, result.changed, seconds, n_before, len(gm.graph.nodes), result.stats,
                                restored=action is OnLoad.RESTORE)
            if before is not None and result.changed:
                record.verified_error = self._verify(p, before, gm, ctx)
            if result.changed:
                ctx.graph_version += 1
            ctx.properties.update(p.ensures)
            ctx.history.append(p.name)
            self.records.append(record)
        return gm

    def _verify(self, p: Pass, before: fx.GraphModule, after: fx.GraphModule, ctx: PassContext) -> float:
        eq = compare(before, after, ctx.example_args, ctx.example_kwargs, float64=True)
        if eq.max_rel_error > self.tolerance:
            where = first_divergence(before, after, ctx.example_args, ctx.example_kwargs, self.tolerance)
            raise VerificationError(
                f"exact pass {p.name!r} changed the model's output: max relative error "
                f"{eq.max_rel_error:.3e} > {self.tolerance:.0e} (float64). First divergence: {where} "
                f"(history: {', '.join(ctx.history) or 'none'})"
            )
        return eq.max_rel_error
