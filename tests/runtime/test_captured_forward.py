"""cm(...) as CUDA-graph replays per call shape (runtime/captured_forward.py): transparent on CPU; on
CUDA equal to the eager graph, outputs never overwritten by later calls, failures said and run
eagerly, and the switches."""

import warnings

import pytest
import torch

import qcompile
from qcompile.runtime.captured_forward import CapturedForward
from tests.tiny_models import VOCAB, tiny_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def _compile(model, recipe, device):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return qcompile.compile(model, {"input_ids": torch.randint(0, VOCAB, (2, 8), device=device)}, recipe=recipe,
                                progress=False)


def test_cpu_calls_run_the_graph_directly():
    runner = CapturedForward()
    calls = []

    def fn(x, scale=2.0):
        calls.append(x)
        return x * scale

    x = torch.arange(4.0)
    for _ in range(3):
        assert torch.equal(runner(fn, (x,), {"scale": 3.0}), x * 3)
    assert len(calls) == 3 and calls[0] is x and runner.replays == 0


def test_the_switches_are_on_by_default_and_settable():
    cm = _compile(tiny_model("llama"), "w8a16", "cpu")
    assert cm.cuda_graphs and not cm.compile_forward
    cm.cuda_graphs = False
    assert not cm.cuda_graphs
    ids = torch.randint(0, VOCAB, (2, 8))
    assert cm(ids).logits.shape == (2, 8, VOCAB)


@cuda
def test_replays_equal_the_eager_graph_and_outputs_are_not_overwritten():
    runner = CapturedForward()
    w = torch.randn(64, 64, device="cuda")

    def fn(x):
        return {"y": torch.relu(x @ w) + 1, "n": x.shape[0]}

    xs = [torch.randn(8, 64, device="cuda") for _ in range(4)]
    outs = [runner(fn, (x,), {}) for x in xs]
    assert runner.replays == 3                      # the first call of the shape runs eagerly
    for x, out in zip(xs, outs, strict=True):
        assert torch.equal(out["y"], fn(x)["y"]) and out["n"] == 8
    other = runner(fn, (torch.randn(3, 64, device="cuda"),), {})   # a new shape: eager again
    assert other["y"].shape == (3, 64) and runner.replays == 3


def _graph(fn):
    return torch.fx.symbolic_trace(fn)


def test_graphs_that_need_the_host_are_refused_before_any_capture():
    from qcompile.runtime.captured_forward import capture_blocker

    exported = torch.export.export(_NonZero(), (torch.ones(4),)).module()
    assert "needs the host" in capture_blocker(exported)
    assert capture_blocker(_graph(lambda x: torch.relu(x) * 2)) is None
    assert capture_blocker(lambda x: x) is None                         # not a graph: not inspected
    with_constant = _graph(_WithConstant())
    assert "on the CPU" in capture_blocker(with_constant)


class _NonZero(torch.nn.Module):
    def forward(self, x):
        return torch.nonzero(x)


class _WithConstant(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.arange(4.0))

    def forward(self, x):
        return x + self.table


@cuda
def test_a_graph_that_needs_the_host_warns_and_runs_eagerly():
    runner = CapturedForward()
    fn = torch.export.export(_NonZero(), (torch.ones(4, device="cuda"),)).module()
    x = torch.tensor([0.0, 1.0, 0.0, 2.0], device="cuda")
    runner(fn, (x,), {})
    with pytest.warns(UserWarning, match="not captured"):
        assert torch.equal(runner(fn, (x,), {}), torch.nonzero(x))
    assert runner.replays == 0 and runner.reasons


@cuda
@pytest.mark.parametrize("recipe", ["none", "w4a16", "w8a8"])
def test_compiled_model_replays_equal_eager_calls(recipe):
    cm = _compile(tiny_model("llama").to(torch.bfloat16).cuda(), recipe, "cuda")
    ids = torch.randint(0, VOCAB, (2, 8), device="cuda")
    cm.cuda_graphs = False
    eager = cm(ids).logits
    cm.cuda_graphs = True
    replayed = [cm(ids).logits for _ in range(3)]
    assert cm._captured.replays == 2
    for r in replayed:
        torch.testing.assert_close(r, eager)


@cuda
def test_clearing_and_capturing_again_works():
    runner = CapturedForward()
    w = torch.randn(16, 16, device="cuda")
    x = torch.randn(4, 16, device="cuda")

    def fn(x):
        return x @ w

    for _ in range(2):                        # the pool goes with the last graph: the next capture works
        for _ in range(3):
            torch.testing.assert_close(runner(fn, (x,), {}), x @ w)
        runner.clear()
    assert runner.replays == 4
