"""The pass framework: a Pass is a small class with a clear result; the
PassManager runs passes in order, times them, lints the graph after each and,
for exact passes, checks that the function did not change."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import fx

from qcompile.ir.verify import VerificationError, compare, first_divergence


@dataclass
class PassResult:
    """What a pass did: whether the graph changed, and numbers worth reporting."""

    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """What passes may read besides the graph: example inputs (for calibration and
    verification), the target, the recipe, and a place to leave per-layer records."""

    example_args: tuple = ()
    example_kwargs: dict = field(default_factory=dict)
    target: Any = None
    recipe: Any = None
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    progress: Any = None
    options: dict[str, Any] = field(default_factory=dict)

    def layer(self, path: str) -> dict[str, Any]:
        return self.layers.setdefault(path, {})


class Pass:
    """Base class. Subclasses set ``name`` and ``exact`` and implement ``run``.

    ``exact`` passes promise not to change the function the graph computes; the
    PassManager holds them to it. Lossy passes report their error in ``stats``.
    """

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = True

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError

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
    return dict(_REGISTRY)


def make_pass(name: str, **options: Any) -> Pass:
    if name not in _REGISTRY:
        raise ValueError(f"unknown pass {name!r}; registered passes: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**options)


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


class PassManager:
    """Runs passes in order.

    ``verify``: after each exact pass that changed the graph, run the graph before
    and after on the example inputs in float64 and fail with the pass name and the
    first diverging node if the worst relative error exceeds ``tolerance``.
    """

    def __init__(self, passes: Iterable[Pass], verify: bool = True, tolerance: float = 1e-6):
        self.passes = list(passes)
        self.verify = verify
        self.tolerance = tolerance
        self.records: list[PassRecord] = []

    @classmethod
    def from_names(cls, names: Iterable[str], **kwargs: Any) -> PassManager:
        return cls([make_pass(n) for n in names], **kwargs)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        for p in self.passes:
            before = copy.deepcopy(gm) if (self.verify and p.exact) else None
            n_before = len(gm.graph.nodes)
            if ctx.progress is not None:
                ctx.progress.step(f"pass {p.name}")
            start = time.perf_counter()
            with torch.no_grad():
                result = p.run(gm, ctx)
            seconds = time.perf_counter() - start
            try:
                gm.graph.lint()
            except Exception as e:
                raise RuntimeError(f"pass {p.name!r} left a malformed graph: {e}") from e
            gm.recompile()
            record = PassRecord(p.name, p.exact, result.changed, seconds, n_before, len(gm.graph.nodes), result.stats)
            if before is not None and result.changed:
                record.verified_error = self._verify(p, before, gm, ctx)
            self.records.append(record)
        return gm

    def _verify(self, p: Pass, before: fx.GraphModule, after: fx.GraphModule, ctx: PassContext) -> float:
        eq = compare(before, after, ctx.example_args, ctx.example_kwargs, float64=True)
        if eq.max_rel_error > self.tolerance:
            where = first_divergence(before, after, ctx.example_args, ctx.example_kwargs, self.tolerance)
            raise VerificationError(
                f"exact pass {p.name!r} changed the model's output: max relative error "
                f"{eq.max_rel_error:.3e} > {self.tolerance:.0e} (float64). First divergence: {where}"
            )
        return eq.max_rel_error
