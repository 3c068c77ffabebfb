"""An architecture skeleton: the model without its weights, for re-tracing a compiled model.

A compiled model re-traces its model when called with an input structure it was not traced
with (``CompiledModel``), and a re-trace needs the architecture, never the float weights (the
compiled tensors are restored from the compiled graph). Holding the user's model would keep a
second copy of the weights alive and would see later changes to it; the skeleton is a deep copy
taken at compile time whose parameters and persistent buffers live on the meta device (no
memory). Non-persistent buffers (rotary frequencies, position ids) are copied: they are not in
a state dict, so the re-traced graph takes them from the skeleton; they are small. A 0-dim one
off the CPU (Gemma's ``embed_scale`` on CUDA) is copied to the CPU: traced against meta weights, a
0-dim CUDA tensor is a device mismatch, a 0-dim CPU tensor is a scalar; the re-traced graph moves it
back with the other buffers.
"""

from __future__ import annotations

import copy

import torch


def architecture_skeleton(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model`` with meta parameters and persistent buffers (``model`` itself
    when it has no tensor off the meta device among them). ``model`` is not changed."""
    memo: dict[int, torch.Tensor] = {}
    for p in model.parameters():
        if not p.is_meta:
            memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for module in model.modules():
        for name, b in module._buffers.items():
            if b is None or b.is_meta:
                continue
            if name not in module._non_persistent_buffers_set:
                memo[id(b)] = torch.empty_like(b, device="meta")
            elif b.dim() == 0 and b.device.type != "cpu":
                memo[id(b)] = b.detach().cpu().clone()
    if not memo:
        return model
    return copy.deepcopy(model, memo)
