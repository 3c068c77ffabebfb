"""Models whose activations carry planted outlier channels, the float function unchanged.

A few output rows of a linear are scaled up by ``s`` and the matching input columns of the linear
that consumes them scaled down by ``s``. The consumer is reached through an op that is linear per
channel (attention's ``P·V``; ``SiLU(gate) · up``), so the function is the same, and no norm can
fold the outlier away: the consumer's *input* carries channels ``s`` times larger than the rest,
which is what rotation, smoothing and GPTQ exist to handle.
"""

from __future__ import annotations

import torch

from tests.tiny_models import VOCAB, tiny_model

PAIRS = {  # producer -> consumer, by the module names of a Llama-family decoder layer
    "self_attn.v_proj": "self_attn.o_proj",
    "mlp.up_proj": "mlp.down_proj",
}


def plant_outliers(model: torch.nn.Module, channels: int = 3, scale: float = 40.0, seed: int = 0) -> torch.nn.Module:
    """Plant outliers in every decoder layer of a Llama-family ``model`` (in place; returns it)."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in list(modules):
            for producer, consumer in PAIRS.items():
                if not name.endswith(producer):
                    continue
                prod, cons = modules[name], modules[name[: -len(producer)] + consumer]
                idx = torch.randperm(prod.out_features, generator=gen)[:channels]
                prod.weight[idx] *= scale
                if prod.bias is not None:
                    prod.bias[idx] *= scale
                cons.weight[:, _consumer_columns(idx, prod.out_features, cons.in_features, head_dim)] /= scale
    return model


def _consumer_columns(idx: torch.Tensor, produced: int, consumed: int, head_dim: int) -> torch.Tensor:
    """The consumer's input columns fed by produced channels ``idx``: the same channels, or with
    grouped-query attention (``consumed = G · produced``) channel ``d`` of KV head ``h`` feeding
    channel ``d`` of each of the ``G`` query heads of its group."""
    if consumed == produced:
        return idx
    groups = consumed // produced
    h, d = idx // head_dim, idx % head_dim
    return torch.cat([(h * groups + g) * head_dim + d for g in range(groups)])


def outlier_llama(layers: int = 2) -> torch.nn.Module:
    return plant_outliers(tiny_model("llama", layers=layers))


def outlier_setup() -> tuple[torch.nn.Module, list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """``(outlier_llama(), 4 calibration batches, a distinct evaluation batch, its float logits)``: the
    planted-outlier accuracy tests' shared data."""
    model = outlier_llama()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, VOCAB, (4, 32), generator=g) for _ in range(4)]
    evaluation = torch.randint(0, VOCAB, (4, 32), generator=g)  # distinct from the calibration batches
    with torch.no_grad():
        ref = model(evaluation).logits
    return model, calib, evaluation, ref
