"""Report.plot: a PNG of the mixed-precision front and bits per layer; clear errors, nothing
written on failure; the report's mixed-precision table."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import qcompile
from qcompile.report import Report


@pytest.fixture(scope="module")
def compiled():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8)).eval()
    calib = [(torch.randn(16, 32),)]
    return qcompile.compile(model, calib[0], budget={"bits": 4.5}, calibration=calib, progress=False,
                            mixed_precision={"candidates": ["int8", "int4-g32-asym", "int2-g32-asym", None]})


def test_plot_writes_a_png(compiled, tmp_path):
    pytest.importorskip("matplotlib")
    out = compiled.report().plot(tmp_path / "mp.png")
    data = (tmp_path / "mp.png").read_bytes()
    assert out == str(tmp_path / "mp.png") and data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert [p.name for p in tmp_path.iterdir()] == ["mp.png"]  # no temporary file left


def test_plot_errors_name_the_problem_and_write_nothing(compiled, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="expected a .png file"):
        compiled.report().plot(tmp_path / "mp.jpg")
    with pytest.raises(ValueError, match="does not exist"):
        compiled.report().plot(tmp_path / "missing" / "mp.png")
    plain = Report("M", "cpu", "w4a16", layers=[])
    with pytest.raises(ValueError, match="no mixed-precision record to plot: compile with budget= or quality="):
        plain.plot(tmp_path / "mp.png")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"needs matplotlib.*pip install 'qcompile\[plot\]'"):
        compiled.report().plot(tmp_path / "mp.png")
    assert list(tmp_path.iterdir()) == []


def test_report_shows_the_mixed_precision_table_and_survives_json(compiled):
    text = str(compiled.report())
    assert "mixed precision: budget {'bits': 4.5}" in text and "predicted layer err" in text
    again = Report.from_dict(compiled.report().to_dict())
    assert again.mixed_precision["choice"] == compiled.report().mixed_precision["choice"]
