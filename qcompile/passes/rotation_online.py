"""rotate_online (R3/R4): ``x ← x·Q`` inserted as ``qcompile::hadamard_transform`` before chosen
linears, ``W ← W·Q`` folded. The rotation family's shared vocabulary (graph helpers, weight folding,
load records, ``make_rotation``) is in ``rotation.py``; ``docs/rotation.md`` has the rules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from qcompile.formats.orthogonal import Rotation, covered, derive_seed
from qcompile.ir.annotations import decision_of
from qcompile.ir.graph import MODULE_PATH, erase_dead_attrs, is_linear, module_path
from qcompile.ir.ops import HADAMARD_TRANSFORM
from qcompile.passes import rotation
from qcompile.passes.base import PassResult, register_pass
from qcompile.passes.rotation import (
    _ACTIVATIONS,
    RotationError,
    _attr_node,
    _last,
    _passthrough,
    _post_norm,
    _record,
    _RotationPass,
    _saved_rotation,
    _val,
    _weight_node,
    _Weights,
)

aten = torch.ops.aten

TARGETS = ("auto", "down", "all")
"""``rotate_online(targets=...)``: ``down`` = linears whose input comes from an activation or a
gating product (down_proj, fc2, c_proj of the MLP, BERT's output.dense); ``all`` = every quantized
linear; ``auto`` = ``all`` for post-norm models (a norm feeds a residual add), else ``down``."""


def _is_down(lin: fx.Node) -> bool:
    """The linear's input comes, through row ops, from an activation or a gating product of two
    same-shaped tensors (down_proj, fc2, the MLP's c_proj, BERT's output.dense)."""
    node, n = lin.args[0], _last(lin.args[0])
    while isinstance(node, fx.Node) and node.op == "call_function" and node.args:
        if node.target in _ACTIVATIONS:
            return True
        if node.target is aten.mul.Tensor and len(node.args) == 2:
            out = _val(node)
            return out is not None and all(_val(a) is not None and tuple(_val(a).shape) == tuple(out.shape)
                                           for a in node.args)
        src = node.args[0]
        if not (isinstance(src, fx.Node) and n is not None and _passthrough(node, src, n)):
            return False
        node = src
    return False


def _online_buffers(rot: Rotation) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The transform's buffers: signs and a ``±1`` Hadamard block in float32 (exact), a random
    block in float64 (so that the float64 check sees the orthogonal matrix the weights absorbed)."""
    signs = rot.signs.float() if rot.signs is not None else None
    block = None
    if rot.block is not None:
        block = rot.block.float() if rot.block_is_hadamard else rot.block.double()
    return signs, block


@register_pass("rotate_online")
class RotateOnline(_RotationPass):
    """R3/R4: insert ``x ← x·Q`` (``qcompile::hadamard_transform``) before target linears and fold
    ``W ← W·Q``; one transform per shared input (Q/K/V share one).

    ``targets``: ``"down"`` (linears fed by an activation or gating product), ``"all"`` (every
    quantized linear), ``"auto"`` (``all`` for post-norm models, else ``down``). Only linears with a
    quantized decision are targets. Each transform has its own seed (derived from the pass seed and
    its index); its buffers are ``<path>.online_signs`` / ``<path>.online_block`` of the first
    linear it feeds.

    ``group_size``: rotate each run of that many consecutive input channels on its own
    (``Q = I ⊗ Q_g``, the op's ``groups``) where it divides the input size, else the whole input.
    For weight-only recipes whose quantization groups have that size it keeps the accuracy of the
    full rotation at a fraction of the online cost (docs/rotation.md); activation quantization
    over a whole row wants the full one (``None``, the default).
    """

    runs_after = ("assign_quant_specs", "fold_norm_scales", "rotate_residual", "rotate_heads")

    def __init__(self, kind: str = "hadamard", seed: int = 0, targets: str = "auto", group_size: int | None = None):
        super().__init__(kind, seed)
        if targets not in TARGETS:
            raise ValueError(f"rotate_online: targets must be one of {', '.join(TARGETS)}, got {targets!r}")
        if group_size is not None and (not isinstance(group_size, int) or group_size < 2):
            raise ValueError(f"rotate_online: group_size must be an integer of at least 2 or None, got {group_size!r}")
        self.targets = targets
        self.group_size = group_size

    def options(self) -> dict[str, Any]:
        return {**super().options(), "targets": self.targets, "group_size": self.group_size}

    def _targets(self, gm: fx.GraphModule) -> str:
        if self.targets != "auto":
            return self.targets
        return "all" if _post_norm(gm) is not None else "down"

    def _apply(self, gm: fx.GraphModule, compute: bool, saved: dict[fx.Node, dict] | None) -> PassResult:
        groups: dict[fx.Node, list[fx.Node]] = {}
        plan: list[tuple[fx.Node, list[fx.Node], str, int, int, int | None]] = []  # input, linears, kind, seed,
        # size, rotation group (None: the whole input)
        if saved is None:
            mode = self._targets(gm)
            for lin in [n for n in gm.graph.nodes if is_linear(n)]:
                d = decision_of(lin)
                if d is None or not d.quantized or _last(lin.args[0]) is None:
                    continue
                if mode == "all" or _is_down(lin):
                    groups.setdefault(lin.args[0], []).append(lin)
            for i, (x, lins) in enumerate(groups.items()):
                size, gs = _last(x), self.group_size
                plan.append((x, lins, self.kind, derive_seed(self.seed, "online", i), size,
                             gs if gs is not None and gs < size and size % gs == 0 else None))
        else:
            by_group: dict[int, list[fx.Node]] = {}
            for lin, info in saved.items():
                by_group.setdefault(info["group"], []).append(lin)
            mode = next(iter(saved.values())).get("targets", self.targets)
            for g in sorted(by_group):
                lins = sorted(by_group[g], key=_order(gm))
                if len({lin.args[0] for lin in lins}) != 1:
                    raise RotationError(f"rotate_online: recorded transform {g} feeds linears with different inputs")
                info = _saved_rotation(saved, lins, self.name)
                if _last(lins[0].args[0]) != info["size"]:
                    raise RotationError(f"rotate_online: recorded transform {g} has size {info['size']}, "
                                        f"its input {_last(lins[0].args[0])}")
                plan.append((lins[0].args[0], lins, info["kind"], info["seed"], info["size"], info.get("group_size")))
        weights = _Weights(gm, compute, "_r4")
        sizes: dict[str, str] = {}
        for g, (x, lins, kind, seed, size, group) in enumerate(plan):
            rot = rotation.make_rotation(size, seed, kind, group)  # rebuilt from the seed at load too
            signs, block = _online_buffers(rot)
            path = module_path(lins[0]) or lins[0].name
            s_node = _attr_node(gm, f"{path}.online_signs", signs) if signs is not None else None
            b_node = _attr_node(gm, f"{path}.online_block", block) if block is not None else None
            args = (x, s_node, b_node, float(rot.scale)) + ((rot.groups,) if rot.groups > 1 else ())
            with gm.graph.inserting_before(lins[0]):
                t = gm.graph.call_function(HADAMARD_TRANSFORM, args)
            if _val(x) is not None:
                t.meta["val"] = _val(x)
            t.meta[MODULE_PATH] = path
            for lin in lins:
                lin.update_arg(0, t)
                weights.replace(lin, _weight_node(lin), ("online", g), rot.apply, lambda n, li=lin: li.update_arg(1, n))
                _record(lin, self.name, {"kind": kind, "seed": seed, "size": size, "group": g, "targets": mode,
                                         "group_size": group})
            whole = covered(group or size) if kind == "hadamard" else "random"
            sizes[str(size)] = f"{size // group} groups of {group}: {whole}" if group else whole
        erase_dead_attrs(gm)
        stats = {"targets": mode, "transforms_inserted": len(plan), "linears": sum(len(p[1]) for p in plan),
                 "sizes": sizes}
        if not compute:
            stats["restored"] = True
        return PassResult(bool(plan), stats)


def _order(gm: fx.GraphModule) -> Callable[[fx.Node], int]:
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    return index.__getitem__
