"""A lowered graph under ``torch.compile``: the decode step's and, opt-in, ``cm(...)``'s.

Inductor fuses the elementwise work between the quantized GEMMs (RoPE, residual adds, casts) into a
few kernels. qcompile's quantized linears and cached attention stay opaque custom ops (their
Triton kernels are already fused); the canonical norms are handed over as their plain torch bodies
(``ir/ops.rms_norm_math``, ``layer_norm_math``: the same arithmetic) so that Inductor fuses them
with their neighbours.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from qcompile.ir.ops import LAYER_NORM, RMS_NORM, layer_norm_math, rms_norm_math

TRACEABLE = {RMS_NORM: rms_norm_math, LAYER_NORM: layer_norm_math}
"""Canonical ops whose bodies ``torch.compile`` may see (they are exact torch code)."""


def inductor_compiled(gm: fx.GraphModule, dynamic: bool | None = False) -> Callable[..., Any]:
    """``gm`` (not changed) through ``torch.compile(fullgraph=True)``, with the norms as plain torch
    code. ``dynamic=False``: compiled per input shape on its first call; ``None``: torch's automatic
    dynamic shapes (a dimension seen with a second size is recompiled symbolic once, so a decode
    step compiles for batch 1 and once for every larger batch)."""
    copied = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    for node in copied.graph.nodes:
        if node.target in TRACEABLE:
            node.target = TRACEABLE[node.target]
    copied.recompile()
    return torch.compile(copied, fullgraph=True, dynamic=dynamic)
