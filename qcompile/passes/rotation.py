"""Rotation folding (QuaRot / SpinQuant R1, R2, R3/R4): exact rewrites that spread outlier
channels over all channels before quantization. This file holds R1 and the family's shared
vocabulary; R2 is ``rotation_heads.py``, R3/R4 ``rotation_online.py``.

An orthogonal ``Q`` (``QQᵀ = I``) changes no function when it is folded on both sides of a
product: ``x Wᵀ = (xQ)(WQ)ᵀ``. Three passes, each exact (verified in float64 by the manager):

- ``rotate_residual`` (R1): one ``Q`` for the whole residual stream of a pre-norm decoder. The
  stream is found structurally, from the embeddings through the residual adds: every embedding
  feeding it (``E ← E·Q``), every linear writing it (``W ← QᵀW``, ``b ← bQ``: o_proj, down_proj),
  every linear reading it (``W ← W·Q``: q/k/v, gate/up, the LM head), through norms without a
  per-channel scale (``rms(xQ) = rms(x)·Q`` since ``‖xQ‖ = ‖x‖``: so it needs
  ``fold_norm_scales(when="always")`` first). LayerNorm models (GPT-2, OPT) are made rotation
  invariant as SliceGPT does: every write into the stream is centered (``E ← E·C``, ``W ← C·W``,
  ``C = I − 11ᵀ/n``), so the stream has zero mean, ``LayerNorm(x) = LayerNorm(xC) = RMSNorm(xC)``
  exactly, and the LayerNorms become RMSNorms; then ``Q`` folds as above (``M = C·Q`` on the write
  side). Post-norm models (BERT) and streams read by anything else are skipped, with the reason in
  the stats.
- ``rotate_heads`` (R2): per KV head, an orthogonal ``R_g`` of the head dimension folded into
  v_proj's output rows (``W_v,g ← R_gᵀ W_v,g``) and o_proj's input columns (``W_o,h ← W_o,h R_g``
  for every query head ``h`` of group ``g``): attention is linear in V per head, so ``P·(V R) =
  (P·V) R``. Grouped-query attention: query heads of a group share their KV head's rotation.
- ``rotate_online`` (R3/R4): ``x ← x·Q`` inserted as ``qcompile::hadamard_transform`` before chosen
  linears (``W ← W·Q``): where no producer can absorb ``Q`` (down_proj's input is SiLU(gate)·up),
  and for post-norm encoders before every quantized linear (one transform per shared input).

Every rotation comes from ``formats.orthogonal.rotation_factors(size, seed, kind)`` and is recorded
in the affected linears' decisions (``extras["rotate_residual" | "rotate_heads" | "rotate_online"]
= {"kind", "seed", "size", ...}``). At load (``on_load = restore``) the passes rediscover the same
structure, read kind, seed and size from the restored decisions and rebuild the same graph: the
same attribute names, the online transform nodes with their buffers rebuilt from the seed. The
rotated weights themselves are not recomputed: they come from the artifact's state dict (the
rebuilt model's weights are random), so restore only allocates them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from qcompile.formats.orthogonal import (
    KINDS,
    Rotation,
    covered,
    grouped_rotation_factors,
    rotation_factors,
)
from qcompile.ir.annotations import decision_of, set_decision
from qcompile.ir.graph import (
    erase_dead_attrs,
    get_attr,
    is_linear,
    module_path,
    new_attr_name,
    set_attr,
)
from qcompile.ir.ops import LAYER_NORM, NORM_OPS, RMS_NORM
from qcompile.passes.base import OnLoad, Pass, PassContext, PassResult, register_pass

aten = torch.ops.aten

class RotationError(ValueError):
    """A rotation pass cannot apply to this graph as it is (the message says what to change)."""


def make_rotation(size: int, seed: int, kind: str, group: int | None = None) -> Rotation:
    """The rotation every pass here uses (one place, so that tests can swap it); ``group``: the
    block-diagonal ``I ⊗ Q_group`` (``formats.orthogonal.grouped_rotation_factors``)."""
    if group is not None and group < size:
        return grouped_rotation_factors(size, group, seed, kind)
    return rotation_factors(size, seed, kind)


# ----------------------------------------------------------------------------- graph vocabulary
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_ROWS = {aten.slice.Tensor, aten.select.int, aten.unsqueeze.default, aten.squeeze.dim, aten.expand.default}
_SAME = {aten.clone.default, aten.contiguous.default, aten.alias.default}
_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default, aten.to.device}
_SCALAR_MUL = {aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar}
_SHAPE_ONLY = {aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int}
_ACTIVATIONS = {aten.gelu.default, aten.silu.default, aten.relu.default, aten.tanh.default, aten.sigmoid.default}
"""Producers of a ``down``-type linear's input (besides a gating product of two tensors)."""
_TRANSPOSES = {aten.transpose.int, aten.permute.default}
_ATTENTION = {aten.scaled_dot_product_attention.default}
_MATMUL = {aten.matmul.default}


def _val(node: Any) -> torch.Tensor | None:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _last(node: Any) -> int | None:
    v = _val(node)
    if v is None or v.dim() == 0:
        return None
    try:
        return int(v.shape[-1])
    except TypeError:  # a symbolic last dimension
        return None


def _is_scalar(a: Any) -> bool:
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return True
    v = _val(a)
    return v is not None and v.dim() == 0


def _passthrough(node: fx.Node, src: fx.Node, n: int) -> bool:
    """``node`` reads ``src`` as its first argument and maps each last-dimension vector (of size
    ``n``) to itself, a copy or a scalar multiple: a right multiplication by ``Q`` commutes."""
    if node.op != "call_function" or not node.args or node.args[0] is not src or _last(node) != n or _last(src) != n:
        return False
    t = node.target
    if t in _VIEWS or t in _SAME:
        return True
    if t in _ROWS:
        v = _val(src)
        if t in (aten.slice.Tensor, aten.select.int):
            dim = node.args[1] if len(node.args) > 1 else 0
            return v is not None and dim % v.dim() != v.dim() - 1
        return True
    if t in _CASTS:
        out = _val(node)
        return out is not None and out.is_floating_point()
    if t is aten.dropout.default:
        return len(node.args) > 2 and node.args[2] is False
    if t in _SCALAR_MUL:
        return len(node.args) == 2 and _is_scalar(node.args[1])
    return t is aten.neg.default


def _users(node: fx.Node) -> list[fx.Node]:
    """Users that read values (shape queries do not)."""
    return [u for u in node.users if not (u.op == "call_function" and u.target in _SHAPE_ONLY)]


def _weight_node(lin: fx.Node) -> fx.Node:
    return lin.args[1]


def _bias_node(lin: fx.Node) -> fx.Node | None:
    b = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
    if b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr"):
        raise RotationError(f"linear {module_path(lin) or lin.name}: its bias is computed in the graph, not a parameter")
    return b


def _set_bias(lin: fx.Node, node: fx.Node) -> None:
    if len(lin.args) > 2:
        lin.update_arg(2, node)
    else:
        lin.update_kwarg("bias", node)


def _linear_readers(node: fx.Node, n: int) -> list[fx.Node] | None:
    """The linears reading ``node`` through row-only ops, or None if anything else reads it."""
    linears, frontier = [], [node]
    while frontier:
        cur = frontier.pop()
        users = _users(cur)
        if not users:
            return None
        for u in users:
            if is_linear(u) and u.args[0] is cur and u.args[1] is not cur:
                linears.append(u)
            elif _passthrough(u, cur, n) and u.target is not aten.neg.default:
                frontier.append(u)
            else:
                return None
    return linears


def _post_norm(gm: fx.GraphModule) -> tuple[fx.Node, fx.Node] | None:
    """A (norm, residual add) pair where a norm's output feeds a residual add: a post-norm model."""
    for norm in gm.graph.nodes:
        if not (norm.op == "call_function" and norm.target in NORM_OPS):
            continue
        n, frontier = _last(norm), [norm]
        while frontier:
            cur = frontier.pop()
            for u in _users(cur):
                if u.op == "call_function" and u.target is aten.add.Tensor and all(isinstance(a, fx.Node) for a in u.args[:2]):
                    return norm, u
                if n is not None and _passthrough(u, cur, n):
                    frontier.append(u)
    return None


def _describe(node: fx.Node) -> str:
    path = module_path(node)
    return f"{node.name} ({node.target}{', ' + path if path else ''})"


# ----------------------------------------------------------------------------- weight rewriting
class _Weights:
    """Replaces weight attributes of linears and embeddings by rotated copies under fresh names
    (``<target><suffix>``: ``_r1``, ``_r2``, ``_r4``), never in place. ``compute=False`` (restore):
    the same names and shapes, zero-filled, for the artifact's state dict to fill; no arithmetic on
    the rebuilt weights."""

    def __init__(self, gm: fx.GraphModule, compute: bool, suffix: str):
        self.gm, self.compute, self.suffix = gm, compute, suffix
        self.cache: dict[tuple[str, Any], fx.Node] = {}
        self.folds = 0

    def replace(self, user: fx.Node, attr: fx.Node, key: Any, fn: Callable[[torch.Tensor], torch.Tensor],
                setter: Callable[[fx.Node], None]) -> None:
        ck = (attr.target, key)
        if ck not in self.cache:
            old = get_attr(self.gm, attr.target)
            new = _fold(fn, old) if self.compute else torch.zeros_like(old)
            self.folds += 1
            self.cache[ck] = _attr_node(self.gm, attr.target + self.suffix, new)
        setter(self.cache[ck])
        if not attr.users:
            self.gm.graph.erase_node(attr)


def _fold(fn: Callable[[torch.Tensor], torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    """``fn`` applied in float64, cast back to the weight's dtype."""
    return fn(w.detach().double()).to(w.dtype).contiguous()


def _attr_node(gm: fx.GraphModule, base: str, value: torch.Tensor) -> fx.Node:
    """Register ``value`` under a fresh name near ``base``; its get_attr node goes first in the graph
    (it may be read by nodes anywhere, e.g. a tied embedding and LM head)."""
    name = new_attr_name(gm, base)
    set_attr(gm, name, value)
    with gm.graph.inserting_before(next(iter(gm.graph.nodes))):
        return gm.graph.get_attr(name)


def _record(node: fx.Node, name: str, info: dict[str, Any]) -> None:
    d = decision_of(node)
    if d is not None:
        set_decision(node, d.replace(extras={**d.extras, name: info}))


def _recorded(gm: fx.GraphModule, name: str) -> dict[fx.Node, dict[str, Any]]:
    out = {}
    for n in gm.graph.nodes:
        d = decision_of(n)
        if d is not None and name in d.extras:
            out[n] = d.extras[name]
    return out


class _RotationPass(Pass):
    exact = True
    requires: tuple[str, ...] = ("quant_decisions",)
    runs_after: tuple[str, ...] = ("assign_quant_specs", "fold_norm_scales")
    runs_before = ("quantize_weights", "gptq", "smooth_quant", "awq", "os_shift")
    on_load = OnLoad.RESTORE

    def __init__(self, kind: str = "hadamard", seed: int = 0):
        if kind not in KINDS:
            raise ValueError(f"{self.name}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"{self.name}: seed must be an integer, got {seed!r}")
        self.kind, self.seed = kind, seed

    def options(self) -> dict[str, Any]:
        return {"kind": self.kind, "seed": self.seed}

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return self._apply(gm, compute=True, saved=None)

    def restore(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        saved = _recorded(gm, self.name)
        if not saved:
            return PassResult(False, {"restored": 0})
        return self._apply(gm, compute=False, saved=saved)

    def _apply(self, gm: fx.GraphModule, compute: bool, saved: dict[fx.Node, dict] | None) -> PassResult:
        raise NotImplementedError


def _saved_rotation(saved: dict[fx.Node, dict], nodes: list[fx.Node], where: str) -> dict[str, Any]:
    """The one recorded rotation of ``nodes`` (restore): all must carry the same kind/seed/size."""
    infos = [saved[n] for n in nodes if n in saved]
    if len(infos) != len(nodes):
        missing = [module_path(n) or n.name for n in nodes if n not in saved]
        raise RotationError(f"{where}: the artifact records no rotation for {missing[:4]}, although the rebuilt graph "
                            f"has the same structure (was the artifact built from another architecture?)")
    keys = {(i["kind"], i["seed"], i["size"]) for i in infos}
    if len(keys) != 1:
        raise RotationError(f"{where}: inconsistent recorded rotations {sorted(keys)[:3]}")
    return infos[0]


# ----------------------------------------------------------------------------- R1: residual stream
@dataclass
class _Stream:
    n: int
    embeddings: list[fx.Node] = field(default_factory=list)
    writers: list[fx.Node] = field(default_factory=list)
    readers: list[fx.Node] = field(default_factory=list)
    norms: list[fx.Node] = field(default_factory=list)
    centered: bool = False


def _find_stream(gm: fx.GraphModule) -> _Stream | str:
    """The residual stream from the embeddings through the residual adds, or why there is none
    a rotation can pass (a reason string)."""
    embeds = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is aten.embedding.default
              and isinstance(n.args[0], fx.Node) and n.args[0].op == "get_attr"]
    if not embeds:
        return "no embedding (aten.embedding of a weight) starts a residual stream"
    token = max(embeds, key=lambda e: get_attr(gm, e.args[0].target).shape[0])
    n = _last(token)
    if n is None:
        return f"embedding {_describe(token)} has no static hidden size"
    stream = _Stream(n, embeddings=[e for e in embeds if _last(e) == n])
    members: set[fx.Node] = set()
    work = list(stream.embeddings)
    readers: dict[fx.Node, None] = {}
    norms: dict[fx.Node, None] = {}
    while work:
        node = work.pop()
        if node in members:
            continue
        members.add(node)
        for u in _users(node):
            if u.op == "output":
                return f"the residual stream is a model output ({_describe(node)})"
            if is_linear(u) and u.args[0] is node and u.args[1] is not node:
                readers[u] = None
            elif u.op == "call_function" and u.target in NORM_OPS and u.args[0] is node:
                norms[u] = None
            elif _is_residual_add(u, n) or _passthrough(u, node, n):
                work.append(u)
            else:
                return (f"the residual stream is read by {_describe(u)}, which does not commute with a rotation "
                        f"(if it is a norm, canonicalize did not recognize it)")
    writers: dict[fx.Node, None] = {}
    for add in [m for m in members if m.target is aten.add.Tensor]:
        for operand in add.args[:2]:
            if operand in members:
                continue
            writer = _trace_writer(operand, add, n)
            if isinstance(writer, str):
                return writer
            writers[writer] = None
    for norm in norms:
        consumers = _linear_readers(norm, n)
        if consumers is None:
            return f"the output of norm {_describe(norm)} is read by something other than linears"
        readers.update(dict.fromkeys(consumers))
    stream.readers, stream.norms, stream.writers = list(readers), list(norms), list(writers)
    kinds = {nm.target for nm in stream.norms}
    if LAYER_NORM in kinds:
        if RMS_NORM in kinds:
            return "the residual stream is read by both LayerNorm and RMSNorm"
        direct = [r for r in readers if r.args[0] in members]
        if direct:
            return f"LayerNorm stream read by linear {_describe(direct[0])} without a norm: centering would change its input"
        stream.centered = True
    if not stream.writers:
        return "no linear writes into the residual stream (no residual adds found)"
    return stream


def _is_residual_add(u: fx.Node, n: int) -> bool:
    return (u.op == "call_function" and u.target is aten.add.Tensor and len(u.args) == 2 and not u.kwargs.get("alpha")
            and all(isinstance(a, fx.Node) for a in u.args) and _last(u) == n)


def _trace_writer(node: Any, add: fx.Node, n: int) -> fx.Node | str:
    """The linear whose output reaches the residual ``add`` through pass-through ops (each read
    only on this path, since the values on it become rotated), or why not."""
    chain_next = add
    while True:
        if not isinstance(node, fx.Node):
            return f"residual add {_describe(add)} adds a constant"
        if _users(node) != [chain_next]:
            return (f"{_describe(node)} writes into the residual stream at {add.name} but is also read elsewhere "
                    f"({', '.join(u.name for u in _users(node) if u is not chain_next)})")
        if is_linear(node):
            return node if _last(node) == n else f"linear {_describe(node)} writes {_last(node)} channels into a {n}-wide stream"
        if node.op == "call_function" and node.args and isinstance(node.args[0], fx.Node) and _passthrough(node, node.args[0], n):
            chain_next, node = node, node.args[0]
            continue
        return (f"residual add {_describe(add)} adds {_describe(node)}, which is neither the stream nor a linear's output")


def _centered(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(-1, keepdim=True)


@register_pass("rotate_residual")
class RotateResidual(_RotationPass):
    """R1: fold one orthogonal ``Q`` into the residual stream of a pre-norm decoder (module doc).

    Rules: the stream is everything reached from the embeddings through residual adds and
    pass-through ops (casts, views, row slices, eval dropout, scalar multiples); it may be read only
    by linears and by norms whose outputs feed only linears, and written only by embeddings and
    linears (each writer's output read only on its way into the add). Norms on the stream must have
    no per-channel scale (``fold_norm_scales(when="always")`` first; a kept scale is an error).
    LayerNorm streams are centered first and their LayerNorms become RMSNorms (exact, SliceGPT).
    Tied embeddings are no special case: each use gets its own rotated copy, and uses needing the
    same copy (embedding ``E·Q`` and an LM head ``W·Q`` on one tensor) share it. Skipped, with the
    reason under ``stats["skipped"]``: post-norm models, streams read by anything else (a
    non-canonical norm such as Gemma's ``(1 + w)`` RMSNorm, a model output).
    """

    requires = ("quant_decisions", "norms_folded")

    def _apply(self, gm: fx.GraphModule, compute: bool, saved: dict[fx.Node, dict] | None) -> PassResult:
        post = _post_norm(gm)
        if post is not None:
            reason = (f"post-norm model: norm {_describe(post[0])} feeds the residual add {post[1].name}, and a "
                      f"rotation cannot pass a norm (rotate_online(targets='all') rotates each linear's input instead)")
            return self._skip(reason, saved)
        stream = _find_stream(gm)
        if isinstance(stream, str):
            return self._skip(stream, saved)
        scaled = [nm for nm in stream.norms if any(a is not None for a in nm.args[1:(2 if nm.target is RMS_NORM else 3)])]
        if scaled:
            raise RotationError(
                f"rotate_residual: norm {_describe(scaled[0])} on the residual stream still has a per-channel scale "
                f"({len(scaled)} such norms); run fold_norm_scales(when='always') before it (when='if_better' keeps "
                f"norms whose folding would not pay off for plain quantizers)")
        linears = stream.readers + stream.writers
        if saved is not None:
            info = _saved_rotation(saved, [lin for lin in linears if decision_of(lin) is not None], self.name)
            if info["size"] != stream.n:
                raise RotationError(f"rotate_residual: the artifact's rotation has size {info['size']}, the stream {stream.n}")
            kind, seed = info["kind"], info["seed"]
        else:
            kind, seed = self.kind, self.seed
        rot = make_rotation(stream.n, seed, kind) if compute else None
        weights = _Weights(gm, compute, "_r1")

        def right(w: torch.Tensor) -> torch.Tensor:  # rows · Q
            return rot.apply(w)

        def right_centered(w: torch.Tensor) -> torch.Tensor:  # rows · M, M = C·Q (or Q)
            return rot.apply(_centered(w) if stream.centered else w)

        def left(w: torch.Tensor) -> torch.Tensor:  # Mᵀ · W
            return right_centered(w.t()).t()

        for emb in stream.embeddings:
            weights.replace(emb, emb.args[0], "right_m" if stream.centered else "right",
                            right_centered, lambda node, e=emb: e.update_arg(0, node))
        for lin in stream.readers:
            weights.replace(lin, _weight_node(lin), "right", right, lambda node, li=lin: li.update_arg(1, node))
        for lin in stream.writers:
            weights.replace(lin, _weight_node(lin), "left", left, lambda node, li=lin: li.update_arg(1, node))
            bias = _bias_node(lin)
            if bias is not None:
                weights.replace(lin, bias, "right_m", right_centered, lambda node, li=lin: _set_bias(li, node))
        for norm in stream.norms:
            if norm.target is LAYER_NORM:
                with gm.graph.inserting_before(norm):
                    rms = gm.graph.call_function(RMS_NORM, (norm.args[0], None, float(norm.args[3])))
                rms.meta.update(norm.meta)
                norm.replace_all_uses_with(rms)
                gm.graph.erase_node(norm)
        erase_dead_attrs(gm)
        info = {"kind": kind, "seed": seed, "size": stream.n, "centered": stream.centered}
        for lin in stream.readers:
            _record(lin, self.name, {**info, "side": "input"})
        for lin in stream.writers:
            _record(lin, self.name, {**info, "side": "output"})
        stats = {"rotated": True, "size": stream.n, "kind": kind, "seed": seed,
                 "construction": covered(stream.n) if kind == "hadamard" else "random",
                 "embeddings": len(stream.embeddings), "readers": len(stream.readers), "writers": len(stream.writers),
                 "layer_norms_to_rms": sum(nm.target is LAYER_NORM for nm in stream.norms), "centered": stream.centered,
                 "weights_rewritten": weights.folds}
        if not compute:
            stats = {"restored": len(linears), "size": stream.n, "kind": kind, "seed": seed}
        return PassResult(True, stats)

    def _skip(self, reason: str, saved: dict | None) -> PassResult:
        if saved:
            raise RotationError(f"rotate_residual: the artifact rotated the residual stream, but the rebuilt graph has "
                                f"none to rotate: {reason}")
        return PassResult(False, {"rotated": False, "skipped": reason})
