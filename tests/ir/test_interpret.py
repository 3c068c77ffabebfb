"""ResumableRun: staged runs over calibration batches equal full runs, and see weights written between stages."""

import pytest
import torch
import torch.nn.functional as F
from torch import fx

from qcompile.ir import interpret
from qcompile.ir.interpret import ResumableRun, run_recording


class Chain(torch.nn.Module):
    """Linears as ``F.linear`` on parameters: the weights are ``get_attr`` nodes, as in the canonical IR."""

    def __init__(self):
        super().__init__()
        for name in "abc":
            setattr(self, f"w_{name}", torch.nn.Parameter(torch.randn(8, 8)))
            setattr(self, f"b_{name}", torch.nn.Parameter(torch.randn(8)))

    def forward(self, x):
        h = torch.relu(F.linear(x, self.w_a, self.b_a))
        g = torch.relu(F.linear(h, self.w_b, self.b_b)) + h
        return F.linear(g, self.w_c, self.b_c)


def _graph() -> fx.GraphModule:
    torch.manual_seed(0)
    return fx.symbolic_trace(Chain().eval())


def _node(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.target is F.linear and n.args[1].target == f"w_{name}")


def _batches(n: int = 3) -> list[tuple[tuple, dict]]:
    return [((torch.randn(4, 8),), {}) for _ in range(n)]


def test_stages_equal_a_full_run_and_run_each_node_once(monkeypatch):
    gm, batches = _graph(), _batches()
    names = [_node(gm, t).name for t in ("a", "b", "c")]
    run = ResumableRun(gm, batches)
    calls = []
    real = interpret._BoundAttrInterpreter.run_node
    monkeypatch.setattr(interpret._BoundAttrInterpreter, "run_node", lambda self, n: calls.append(n.name) or real(self, n))
    staged = [run.advance([name]) for name in names]
    for i, (args, kwargs) in enumerate(batches):
        _, full = run_recording(gm, args, kwargs, names)
        for stage, name in zip(staged, names, strict=True):
            torch.testing.assert_close(stage[i][name], full[name], rtol=0, atol=0)
    assert len(calls) == len(set(calls)) * len(batches)  # every node once per batch, none re-run


def test_a_weight_written_between_stages_reaches_later_nodes_only():
    gm, batches = _graph(), _batches(2)
    a, b, c = (_node(gm, t) for t in ("a", "b", "c"))
    run = ResumableRun(gm, batches)
    before = run.advance([b.args[0].name])  # b's input: relu(a(x)), b has not run
    gm.w_b.data = gm.w_b.data * 0  # write b's weight, as GPTQ does after measuring its input
    after = run.advance([c.args[0].name])
    for i, (args, kwargs) in enumerate(batches):
        _, full = run_recording(gm, args, kwargs, [b.args[0].name, c.args[0].name])
        torch.testing.assert_close(before[i][b.args[0].name], full[b.args[0].name])
        torch.testing.assert_close(after[i][c.args[0].name], full[c.args[0].name])  # relu(0 + bias) + h
    assert run.executed(b) and not run.executed(c)


def test_bound_weights_replace_the_modules():
    gm, batches = _graph(), _batches(1)
    b = _node(gm, "b")
    zero = {"w_b": torch.zeros(8, 8)}
    out = ResumableRun(gm, batches, weights=zero).advance([b.name])[0][b.name]
    torch.testing.assert_close(out, gm.b_b.detach().expand(4, 8))


def test_past_the_memory_limit_it_reruns_from_the_inputs_with_the_same_values():
    gm, batches = _graph(), _batches()
    names = [_node(gm, t).name for t in ("a", "b", "c")]
    run = ResumableRun(gm, batches, max_bytes=0)
    staged = [run.advance([name]) for name in names]
    assert run.restart and "re-run the graph from the inputs" in run.note
    for i, (args, kwargs) in enumerate(batches):
        _, full = run_recording(gm, args, kwargs, names)
        for stage, name in zip(staged, names, strict=True):
            torch.testing.assert_close(stage[i][name], full[name], rtol=0, atol=0)


def test_a_node_freed_before_the_stop_is_an_error_that_names_it():
    gm, batches = _graph(), _batches(1)
    a, c = _node(gm, "a"), _node(gm, "c")
    run = ResumableRun(gm, batches)
    run.advance([c.name])
    with pytest.raises(RuntimeError, match=a.name):
        run.advance([a.name])


def test_a_batch_that_does_not_fit_names_the_batch_and_the_input():
    """Checked against the traced input's static sizes before any stage (a stage may stop before a
    node reads the input); without traced shapes, the node that fails is named."""
    from qcompile.frontend import export_model

    exported = export_model(Chain().eval(), (torch.randn(4, 8),), {})
    with pytest.raises(ValueError, match=r"calibration batch 0 \(input shapes \[\(4, 5\)\]\) does not fit .*has shape"):
        ResumableRun(exported.gm, [((torch.randn(4, 5),), {})])
    gm = _graph()
    run = ResumableRun(gm, [((torch.randn(4, 5),), {})])
    with pytest.raises(ValueError, match=r"calibration batch 0 .* does not fit the traced model \(at node linear\)"):
        run.advance([_node(gm, "c").name])
