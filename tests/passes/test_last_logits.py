"""passes/last_logits.py: the LM head found behind single-input ops, or the graph left alone."""

import torch

from qcompile.passes.base import PassContext
from qcompile.passes.last_logits import LastLogits, lm_head
from qcompile.recipes import get_recipe
from qcompile.runtime.cached_attention import LOGIT_ROWS, CacheBinding
from qcompile.targets import get_target


class _Head(torch.nn.Module):
    def __init__(self, softcap=False):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 16, bias=False)
        self.softcap = softcap

    def forward(self, x):
        logits = self.head(torch.relu(self.proj(x)))
        return torch.tanh(logits / 30.0) * 30.0 if self.softcap else logits


def _graph(module):
    return torch.export.export(module, (torch.randn(2, 5, 8),)).module()


def _run(gm, binding):
    ctx = PassContext((), {}, get_target("cpu"), get_recipe("none"))
    return LastLogits(binding).run(gm, ctx)


def test_the_head_behind_soft_capping_is_found_and_fed_one_row_per_batch():
    module = _Head(softcap=True)
    gm = _graph(module)
    assert lm_head(gm) is not None
    binding = CacheBinding()
    assert _run(gm, binding).stats["found"]
    assert any(n.target == LOGIT_ROWS for n in gm.graph.nodes)
    x = torch.randn(2, 5, 8)
    binding.logit_rows = torch.tensor([4, 1])
    torch.testing.assert_close(gm(x), module(x)[torch.arange(2), torch.tensor([4, 1])][:, None])


def test_a_graph_whose_output_is_not_a_linear_is_left_alone():
    class NoHead(torch.nn.Module):
        def forward(self, x):
            return x.cumsum(1) + x

    gm = _graph(NoHead())
    result = _run(gm, CacheBinding())
    assert not result.changed and result.stats == {"found": False}
    assert not any(n.target == LOGIT_ROWS for n in gm.graph.nodes)
