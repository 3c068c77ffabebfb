"""Declared pass order: sorting, contradictions, requirements, fill-ins."""

import pytest

from qcompile.passes import (
    Pass,
    PassManager,
    PassOrderError,
    PassRequirementError,
    PassResult,
    make_pass,
    order_passes,
)


def _pass(name, **decl):
    cls = type(name, (Pass,), {"name": name, "exact": False, **decl,
                               "run": lambda self, gm, ctx: PassResult(False)})
    return cls()


def test_contradictory_order_is_rejected_naming_both_passes():
    a = _pass("alpha", runs_after=("beta",))
    b = _pass("beta", runs_after=("alpha",))
    with pytest.raises(PassOrderError, match=r"'alpha'.*'beta'|'beta'.*'alpha'") as e:
        order_passes([a, b])
    assert "alpha" in str(e.value) and "beta" in str(e.value)


def test_order_follows_constraints_and_keeps_the_rest():
    names = ["canonicalize", "lower", "quantize_weights", "assign_quant_specs", "fold_norm_scales"]
    ordered = [p.name for p in order_passes([make_pass(n) for n in names])]
    assert ordered == ["canonicalize", "assign_quant_specs", "fold_norm_scales", "quantize_weights", "lower"]


def test_reordering_warns():
    with pytest.warns(UserWarning, match="reordered"):
        PassManager([make_pass("canonicalize"), make_pass("lower"), make_pass("assign_quant_specs"),
                     make_pass("quantize_weights")])


def test_duplicate_pass_is_rejected():
    with pytest.raises(PassOrderError, match="more than once: canonicalize"):
        order_passes([make_pass("canonicalize"), make_pass("canonicalize")])


def test_unmet_requirement_names_pass_and_history():
    import torch

    from qcompile.frontend import export_model
    from qcompile.passes import PassContext

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    ex = export_model(model, (torch.randn(2, 4),))
    needy = _pass("needy", requires=("magic",))
    with pytest.raises(PassRequirementError, match=r"'needy' requires 'magic'.*history: canonicalize"):
        PassManager([make_pass("canonicalize"), needy], verify=False).run(ex.gm, PassContext(ex.args, ex.kwargs))


def test_missing_decisions_are_filled_in():
    pm = PassManager([make_pass("canonicalize"), make_pass("quantize_weights"), make_pass("lower")], verify=False)
    assert [p.name for p in pm.passes] == ["canonicalize", "assign_quant_specs", "quantize_weights", "lower"]
    assert [p.name for p in pm.inserted] == ["assign_quant_specs"]
