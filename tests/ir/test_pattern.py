import torch
from torch import fx

from qcompile.ir.pattern import Attr, Cast, Op, Var, find_all, match, strip_casts

aten = torch.ops.aten


def _graph(fn, *args):
    return torch.export.export(fn, args, strict=False).module()


class AddMul(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4))

    def forward(self, x):
        y = x.to(torch.float32) + 1.0
        return self.w * y, x * x


def test_match_binds_vars_and_attrs_commutatively():
    gm = _graph(AddMul(), torch.randn(2, 4, dtype=torch.float16))
    pattern = Op(aten.mul.Tensor, Cast(Op(aten.add.Tensor, Var("x"), Var("c"))), Attr("w"), commutative=True)
    matches = find_all(gm, pattern)
    assert len(matches) == 1
    m = matches[0]
    assert m["c"] == 1.0
    assert m["w"].op == "get_attr"
    assert strip_casts(m["x"]).op == "placeholder"


def test_same_var_must_bind_same_node():
    gm = _graph(AddMul(), torch.randn(2, 4))
    square = Op(aten.mul.Tensor, Var("a"), Var("a"))
    roots = [m.root for m in find_all(gm, square)]
    assert len(roots) == 1 and roots[0].args[0] is roots[0].args[1]


def test_no_match_returns_none():
    gm = _graph(AddMul(), torch.randn(2, 4))
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    assert match(Op(aten.rsqrt.default, Var("x")), node) is None
    assert isinstance(node, fx.Node)
