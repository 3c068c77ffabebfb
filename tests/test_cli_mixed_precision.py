"""The command line's mixed-precision flags: budgets, quality floors, --plot, errors before loading."""

from __future__ import annotations

import json

import pytest

import qcompile.models as models
from qcompile import cli
from tests.tiny_models import tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tiny_model("llama", layers=1).save_pretrained(root / "llama")
    return root / "llama"


def _refuse_load(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the flags were checked")
    monkeypatch.setattr(models, "load_source", refuse)


def test_budget_bits_with_plot(model_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "mp.png"
    assert cli.main(["compile", str(model_dir), "--budget-bits", "5", "--plot", str(png), "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    rec = next(p["stats"] for p in report["passes"] if p["name"] == "mixed_precision")
    assert rec["budget"] == {"bits": 5.0} and rec["totals"]["bits"] <= 5.0
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(("flags", "message"), [
    (["--budget-bits", "-1"], "budget 'bits' must be a positive finite number, got -1.0"),
    (["--quality-cosine", "1.2"], "quality cosine 1.2 is above what 16-bit"),
    (["--plot", "x.png"], "--plot draws the mixed-precision front: give --budget-bits"),
    (["--budget-bits", "4", "--plot", "nodir/x.png"], "--plot: plot path 'nodir/x.png'"),
])
def test_bad_flags_fail_before_the_model_is_loaded(flags, message, model_dir, monkeypatch, capsys):
    _refuse_load(monkeypatch)
    assert cli.main(["compile", str(model_dir), *flags]) == 2
    err = capsys.readouterr().err
    assert f"qcompile: error: {message}" in err, err
