"""Batch and sequence stay dynamic whatever the example's sizes; a dimension the model fixes is a
report note and a named error; export failures are two lines, retried only for dynamic shapes."""

import warnings

import pytest
import torch

import qcompile
from qcompile.frontend import ExportError, export_model
from tests.tiny_models import VOCAB, DataDependent, tiny_model


def test_batch_one_example_serves_other_batches_and_lengths():
    model = tiny_model("llama")
    cm = qcompile.compile(model, (torch.randint(0, VOCAB, (1, 8)),), recipe="w8a16", progress=False, verify=False)
    assert not cm.input_dims().static_dims()
    assert not [n for n in cm.report().notes if "static" in n]
    for shape in [(4, 8), (4, 13), (1, 1), (3, 2)]:
        ids = torch.randint(0, VOCAB, shape)
        with torch.no_grad():
            ref = model(ids, use_cache=False).logits
        out = cm(ids).logits
        assert out.shape == ref.shape
        assert (out - ref).abs().max() < 0.05, shape


def test_inputs_that_must_agree_share_the_batch_dimension():
    ids = torch.randint(0, VOCAB, (1, 6))
    cm = qcompile.compile(tiny_model("bert"), {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                          recipe="w8a16", progress=False, verify=False)
    ids = torch.randint(0, VOCAB, (4, 6))
    with pytest.raises(ValueError, match=r"'attention_mask' dim 0 has size 3, but 'input_ids' dim 0 has size 4"):
        cm(ids, torch.ones(3, 6, dtype=torch.long))
    # BERT's position table bounds the sequence: a note, and a named error past it
    assert any("argument input_ids dim 1 accepts 0 to 512" in n for n in cm.report().notes)
    long = torch.randint(0, VOCAB, (1, 513))
    with pytest.raises(ValueError, match=r"'input_ids' dim 1 has size 513; the compiled graph accepts 0 to 512"):
        cm(long, torch.ones_like(long))


class FixedBatch(torch.nn.Module):
    """Reshapes with a hard-coded batch: dim 0 must stay static."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.lin(x.reshape(2, 16))


def test_static_dimension_is_noted_and_named_at_call_time():
    with pytest.warns(UserWarning, match=r"cannot all stay dynamic \(the model's code fixes batch at 2\)"):
        cm = qcompile.compile(FixedBatch(), (torch.randn(2, 16),), recipe="w8a16", progress=False, verify=False)
    assert any(n.startswith("argument x dim 0 is static at 2") for n in cm.report().notes)
    assert cm(torch.randn(2, 16)).shape == (2, 8)
    with pytest.raises(ValueError, match=r"argument 'x' dim 0 has size 3, but the compiled graph is static at 2"):
        cm(torch.randn(3, 16))


def test_untraceable_model_fails_in_two_lines_without_a_static_retry(capfd):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with pytest.raises(ExportError) as info:
            export_model(DataDependent(), (torch.randn(2, 4),))
    message = str(info.value)
    assert len(message.splitlines()) == 2
    assert "GuardOnDataDependentSymNode in aten.item" in message
    assert "tiny_models.py:" in message and "if x.sum() > 0:" in message  # the model's source line
    assert type(info.value.__cause__).__name__ == "GuardOnDataDependentSymNode"
    assert not [w for w in record if "retrying" in str(w.message) or "dynamic" in str(w.message)]
    assert "def forward" not in capfd.readouterr().err  # torch's partial-graph dumps are dropped


def test_dynamic_shape_failure_is_retried_with_a_warning():
    with pytest.warns(UserWarning, match="traced again with the dimensions the model allows dynamic"):
        exported = export_model(FixedBatch(), (torch.randn(2, 16),))
    assert exported.dynamic and exported.shape_fallback == "the model's code fixes batch at 2"


def test_a_lower_bound_of_two_from_dim_auto_is_not_enforced():
    """``Dim.AUTO`` gives [2, ∞) (0/1 specialization) though the graph runs batch 1: not refused."""
    from qcompile.frontend.graph_inputs import GraphInputs
    from qcompile.frontend.signature import CallSignature

    model = torch.nn.Linear(8, 8)
    ep = torch.export.export(model, (torch.randn(2, 8),), dynamic_shapes={"input": {0: torch.export.Dim.AUTO}},
                             strict=False)
    assert [(int(r.lower)) for r in ep.range_constraints.values()] == [2]
    inputs = GraphInputs.of(ep.module(), CallSignature.of(model, {}))
    (batch,) = [d for d in inputs.dims if d.dim == 0]
    assert batch.static is None and batch.low == 0
    inputs.check((torch.randn(1, 8),), {})
    assert not inputs.limited_dims()
