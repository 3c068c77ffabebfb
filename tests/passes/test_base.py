import pytest
import torch
from torch import fx

from qcompile.frontend import export_model
from qcompile.ir.graph import get_attr, linear_nodes, set_attr
from qcompile.ir.verify import VerificationError
from qcompile.passes.base import (
    Pass,
    PassContext,
    PassManager,
    PassResult,
    make_pass,
    register_pass,
)


class BreaksTheModel(Pass):
    """Claims to be exact but scales one weight: the manager must catch it."""

    name = "breaks_the_model"
    exact = True

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        node = linear_nodes(gm)[-1]
        set_attr(gm, node.args[1].target, get_attr(gm, node.args[1].target) * 1.01)
        return PassResult(True)


def _mlp():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    ex = export_model(model, (torch.randn(3, 8),))
    return ex, PassContext(ex.args, ex.kwargs)


def test_verification_names_pass_and_node():
    ex, ctx = _mlp()
    with pytest.raises(VerificationError, match=r"breaks_the_model.*First divergence: node linear_1"):
        PassManager([BreaksTheModel()], verify=True).run(ex.gm, ctx)


def test_verification_off_lets_it_through():
    ex, ctx = _mlp()
    pm = PassManager([BreaksTheModel()], verify=False)
    pm.run(ex.gm, ctx)
    assert pm.records[0].changed and pm.records[0].verified_error is None


def test_records_time_nodes_and_stats():
    ex, ctx = _mlp()
    pm = PassManager.from_names(["canonicalize", "fold_norm_scales"])
    pm.run(ex.gm, ctx)
    assert [r.name for r in pm.records] == ["canonicalize", "fold_norm_scales"]
    assert all(r.seconds >= 0 and r.nodes_after > 0 for r in pm.records)


def test_registry():
    @register_pass("test_noop")
    class Noop(Pass):
        exact = True

        def run(self, gm, ctx):
            return PassResult(False)

    assert isinstance(make_pass("test_noop"), Noop)
    with pytest.raises(ValueError, match="unknown pass 'nope'.*canonicalize"):
        make_pass("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_pass("test_noop")(type("Other", (Pass,), {}))
